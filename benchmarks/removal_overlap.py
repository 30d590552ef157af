"""How much finished runs agree with a reference run on what to remove.

For each run folder, against the reference (the first argument): the share of its removed sub-layers the reference
also removed, and the longest common prefix of the two removal orders (the steps on which both greedy searches
chose the same sub-layer):

    python benchmarks/removal_overlap.py runs/smollm2-25 docs/study/cache/runs/calib25-wikitext-seed1 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from finercut.candidates import Unit


def removal_order(folder: Path) -> list[str]:
    record = json.loads((folder / "record.json").read_text())
    return [str(Unit.from_dict(unit)) for unit in record["removed"]]


def overlap(reference: list[str], other: list[str]) -> float:
    """Share of ``other``'s removals that ``reference`` removed too (sets, order ignored)."""
    return len(set(reference) & set(other)) / len(other)


def common_prefix(reference: list[str], other: list[str]) -> int:
    """Steps, from the first, on which both orders removed the same unit."""
    steps = 0
    for mine, theirs in zip(reference, other):
        if mine != theirs:
            break
        steps += 1
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    reference = removal_order(args.reference)
    for folder in args.runs:
        order = removal_order(folder)
        print(f"{folder}: {overlap(reference, order):.0%} of its {len(order)} removals shared, same first "
              f"{common_prefix(reference, order)} steps; order {', '.join(order)}")


if __name__ == "__main__":
    main()
