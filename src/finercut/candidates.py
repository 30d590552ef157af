"""Pruning candidates and the pure rules of the search: targets, candidate window, selection."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from finercut.pruned_modeling import ATTENTION, BLOCK, FFN

KIND_ORDER = {ATTENTION: 0, FFN: 1, BLOCK: 0}
GRANULARITIES = ("sublayer", "block")


@dataclass(frozen=True, order=False)
class Unit:
    """One pruning candidate: the attention or FFN sub-layer of a block, or a whole block (block-level mode)."""

    block: int
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KIND_ORDER:
            raise ValueError(f"unknown unit kind {self.kind!r}; expected attention, ffn or block")

    @property
    def sort_key(self) -> tuple[int, int]:
        """Search order: by block, attention before FFN. Exact ties go to the earliest unit in this order."""
        return self.block, KIND_ORDER[self.kind]

    def sublayers(self) -> tuple["Unit", ...]:
        """The sub-layers this unit removes."""
        if self.kind == BLOCK:
            return Unit(self.block, ATTENTION), Unit(self.block, FFN)
        return (self,)

    def to_dict(self) -> dict:
        return {"block": self.block, "kind": self.kind}

    @classmethod
    def from_dict(cls, data: dict) -> "Unit":
        return cls(int(data["block"]), str(data["kind"]))

    def __str__(self) -> str:
        return f"{self.block}.{'attn' if self.kind == ATTENTION else self.kind}"


ONLY_KINDS = (ATTENTION, FFN)
"""What ``only`` may restrict the sub-layer candidates to."""


def all_units(num_blocks: int, granularity: str, only: str | None = None) -> list[Unit]:
    """Every candidate of a model with ``num_blocks`` blocks, in search order (2L sub-layers or L blocks).

    ``only`` (``"attention"`` or ``"ffn"``, sub-layer granularity) keeps the L sub-layers of that kind.
    """
    if only is not None:
        if only not in ONLY_KINDS or granularity != "sublayer":
            raise ValueError(f"only must be one of {ONLY_KINDS} with granularity sublayer, got {only!r}, "
                             f"{granularity!r}")
        return [Unit(b, only) for b in range(num_blocks)]
    if granularity == "sublayer":
        return [Unit(b, kind) for b in range(num_blocks) for kind in (ATTENTION, FFN)]
    if granularity == "block":
        return [Unit(b, BLOCK) for b in range(num_blocks)]
    raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")


def count_units(num_blocks: int, granularity: str, only: str | None = None) -> int:
    """Candidates of a model with ``num_blocks`` blocks: 2L sub-layers, or L blocks (or L sub-layers ``only``)."""
    return len(all_units(num_blocks, granularity, only))


def removed_sublayers(units: Iterable[Unit]) -> list[Unit]:
    """The sub-layers removed by ``units``, in removal order."""
    return [sub for unit in units for sub in unit.sublayers()]


def target_count(ratio: float, total_units: int) -> int:
    """Number of units a layer pruning ratio removes: round(ratio * total), halves rounded up."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}")
    return int(math.floor(ratio * total_units + 0.5 + 1e-9))


def first_window_block(num_blocks: int, window_fraction: float) -> int:
    """First candidate block while the window applies: ceil(window_fraction * L) (paper: 0.4 -> last 60%)."""
    return int(math.ceil(window_fraction * num_blocks - 1e-9))


def window_applies(removed_so_far: int, total_units: int, window_until_ratio: float) -> bool:
    """The window applies before a step while removed units are at most ``window_until_ratio`` of all units.

    Depending only on what was removed so far (not on the target) makes a shorter run a prefix of a longer one.
    """
    return removed_so_far <= window_until_ratio * total_units + 1e-9


def step_candidates(
    remaining: Sequence[Unit], *, removed_so_far: int, total_units: int, window_until_ratio: float,
    window_first_block: int,
) -> tuple[list[Unit], int]:
    """The candidates of one step and the first block they may come from.

    Falls back to all remaining units if the window holds none of them.
    """
    first_block = window_first_block if window_applies(removed_so_far, total_units, window_until_ratio) else 0
    candidates = [unit for unit in remaining if unit.block >= first_block]
    if not candidates:
        return list(remaining), 0
    return candidates, first_block


def select_least(scored: Sequence[tuple[Unit, float]]) -> tuple[Unit, float]:
    """The unit with the smallest distance; exact ties go to the earliest in (block, attention before FFN) order."""
    if not scored:
        raise ValueError("no candidates to select from")
    return min(scored, key=lambda item: (item[1], item[0].sort_key))
