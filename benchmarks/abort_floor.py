"""How little an exact early abort could ever spend: the oracle floor of a search, from an exhaustive record.

    python benchmarks/abort_floor.py runs/exh-angular [--fast runs/fast-angular] [--head-blocks 8.0]

The fast scorer may leave a candidate behind only once a lower bound of its distance exceeds the step's best
complete distance. Every per-position term of the distance is >= 0, and on a sample where a candidate's output
has not been computed nothing excludes a term of 0 (removing a sub-layer may bring the output back towards the
original model's), so **any** exact abort must run the candidate's blocks on samples whose exact distances add
up to more than the winner's total. A cheaper bound on a computed sample (the JS vocabulary subset) is at most
the exact sum, so it needs at least as many samples.

From a record written with ``--exhaustive`` (every candidate complete, with its per-sample sums) this computes,
per step, in block-sample units and full-forward equivalents (FFE: one forward of the calibration set, head
included, ``L + head_blocks`` block-equivalents per sample):

* ``oracle``: what an abort that knew every sum in advance would spend. Each non-winner runs its largest
  samples first, as few as make its partial sum exceed the winner's total (reach it, where it sorts after the
  winner), the winner runs every sample, and each (candidate, sample) replays only ``L - max(b, q)`` blocks
  (``b`` its block, ``q`` the previous winner's: every replay state of the previous step kept). No cost is
  counted for refreshing the block inputs, for a head or for a distance. ``fractional`` also relaxes the sample
  granularity (the last sample counted by the fraction of it that suffices), an estimate for an abort within
  samples.
* ``policy``: the fast scorer's own order (:func:`finercut.scoring.bounds.best_first` with the previous step's
  complete sums as the hint) replayed on the recorded sums, with replay states for exactly the (candidate,
  sample) pairs it ran in the previous step (no memory budget) and the same free refresh, head and distance.

With ``--fast`` (a run of the same search with the fast scorer) its measured block work per step is shown
beside them (the record's ``block_executions``: refresh and strided replay states included).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from finercut.candidates import Unit
from finercut.scoring.bounds import best_first


def needed_samples(sums: list[float], threshold: float, *, ties_lose: bool) -> tuple[int, float]:
    """Fewest samples, largest first, whose sum exceeds ``threshold`` (or reaches it when ``ties_lose``), and
    that count with the last sample counted by the fraction of it needed; ``len(sums)`` if all do not suffice.

    >>> needed_samples([1.0, 3.0, 2.0], 4.0, ties_lose=False)
    (2, 1.5)
    """
    total = 0.0
    for count, value in enumerate(sorted(sums, reverse=True), start=1):
        before, total = total, total + value
        if total > threshold or (ties_lose and total >= threshold):
            fraction = (threshold - before) / value if value > 0 else 1.0
            return count, count - 1 + min(max(fraction, 0.0), 1.0)
    return len(sums), float(len(sums))


def replay_blocks(unit: Unit, num_blocks: int, previous_block: int | None, has_state: bool) -> int:
    """Blocks one (candidate, sample) replays: from the previous winner's block when a state of this
    candidate's previous-step replay of the sample is kept and lies after its own block, else from its block."""
    start = unit.block
    if has_state and previous_block is not None and previous_block > unit.block:
        start = previous_block
    return num_blocks - start


def oracle_step(step: dict, num_blocks: int, previous_block: int | None) -> tuple[int, float, float]:
    """The oracle's (candidate, sample) pairs, block-sample units and fractional units for one step."""
    winner = Unit.from_dict(step["removed"])
    sums = {Unit.from_dict(c): c["batch_sums"] for c in step["candidates"]}
    threshold = math.fsum(sums[winner])
    pairs, units, fractional_units = 0, 0.0, 0.0
    for unit, unit_sums in sums.items():
        if unit == winner:
            count, fractional = len(unit_sums), float(len(unit_sums))
        else:
            count, fractional = needed_samples(list(unit_sums), threshold, ties_lose=unit.sort_key > winner.sort_key)
        blocks = replay_blocks(unit, num_blocks, previous_block, has_state=True)
        pairs += count
        units += count * blocks
        fractional_units += fractional * blocks
    return pairs, units, fractional_units


def policy_step(step: dict, num_blocks: int, previous_block: int | None, previous_ran: dict[Unit, set[int]],
                hint: list[list[float]]) -> tuple[int, float, dict[Unit, set[int]], list[list[float]]]:
    """The fast scorer's order replayed on the recorded sums: pairs, block-sample units, the pairs it ran and
    the complete candidates' sums (the next step's hint)."""
    sums = {Unit.from_dict(c): c["batch_sums"] for c in step["candidates"]}
    num_batches = len(next(iter(sums.values())))
    ran: dict[Unit, set[int]] = {unit: set() for unit in sums}

    def batch_sum(unit: Unit, batch: int) -> float:
        ran[unit].add(batch)
        return sums[unit][batch]

    result = best_first(list(sums), batch_sum, num_batches=num_batches, num_positions=1, hint=hint)
    winner = Unit.from_dict(step["removed"])
    if not result[winner].complete:
        raise SystemExit(f"step {step['step']}: the replayed order did not complete the recorded winner {winner}")
    units = sum(replay_blocks(unit, num_blocks, previous_block, has_state=batch in previous_ran.get(unit, ()))
                for unit, batches in ran.items() for batch in batches)
    complete = [list(sums[unit]) for unit in sums if result[unit].complete]
    return sum(len(b) for b in ran.values()), units, ran, complete


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exhaustive", type=Path, help="run folder (or record.json) of an --exhaustive run")
    parser.add_argument("--fast", type=Path, help="run folder of the same search with the fast scorer")
    parser.add_argument("--head-blocks", type=float, default=8.0,
                        help="the output head's FLOPs in blocks per sample (SmolLM2-135M: 8.0)")
    args = parser.parse_args()

    def record_of(path: Path) -> dict:
        return json.loads((path / "record.json" if path.is_dir() else path).read_text())

    record = record_of(args.exhaustive)
    steps = record["steps"]
    if any(c.get("batch_sums") is None for step in steps for c in step["candidates"]):
        raise SystemExit("the record is not exhaustive (a candidate has no per-sample sums): prune with --exhaustive")
    fast_steps = record_of(args.fast)["steps"] if args.fast else []
    num_blocks = record["model"]["num_blocks"]
    num_samples = len(steps[0]["candidates"][0]["batch_sums"])
    ffe = num_samples * (num_blocks + args.head_blocks)  # block-sample units of one full forward
    print(f"metric {record.get('metric')}: {len(steps)} steps, {num_blocks} blocks, {num_samples} samples, head = "
          f"{args.head_blocks:g} blocks; FFE of block work per step")
    print("| step | removed | candidates | pairs: oracle / policy / all | oracle FFE | fractional | policy FFE |"
          + (" fast (measured) |" if fast_steps else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if fast_steps else ""))
    totals = {"oracle": 0.0, "fractional": 0.0, "policy": 0.0, "fast": 0.0}
    previous_block, previous_ran, hint = None, {}, []
    for index, step in enumerate(steps):
        oracle_pairs, oracle_units, fractional_units = oracle_step(step, num_blocks, previous_block)
        policy_pairs, policy_units, previous_ran, hint = policy_step(step, num_blocks, previous_block, previous_ran,
                                                                     hint)
        candidates = len(step["candidates"])
        totals["oracle"] += oracle_units / ffe
        totals["fractional"] += fractional_units / ffe
        totals["policy"] += policy_units / ffe
        row = (f"| {step['step'] + 1} | {Unit.from_dict(step['removed'])} | {candidates} | {oracle_pairs} / "
               f"{policy_pairs} / {candidates * num_samples} | {oracle_units / ffe:.2f} | "
               f"{fractional_units / ffe:.2f} | {policy_units / ffe:.2f} |")
        if fast_steps:
            fast_step = fast_steps[index]
            if fast_step["removed"] != step["removed"]:
                raise SystemExit(f"step {index + 1}: the fast run removed {fast_step['removed']}, the exhaustive "
                                 f"one {step['removed']}: not the same search")
            fast_ffe = fast_step["block_executions"] / (num_blocks + args.head_blocks)
            totals["fast"] += fast_ffe
            row += f" {fast_ffe:.2f} |"
        print(row)
        previous_block = Unit.from_dict(step["removed"]).block
    n = len(steps)
    print(f"per removed sub-layer: oracle {totals['oracle'] / n:.2f} FFE, fractional {totals['fractional'] / n:.2f}, "
          f"policy {totals['policy'] / n:.2f}" + (f", fast measured {totals['fast'] / n:.2f}" if fast_steps else "")
          + " (block work only)")


if __name__ == "__main__":
    main()
