"""FinerCut's iterative search (paper Algorithm 1).

Start from the full model; at each step score every remaining candidate by how far removing it (on top of what
is already removed) moves the output from the original model's, and remove the one that moves it least. How a
candidate is scored (prefix cache or full forwards) is the scorer's business, see :mod:`finercut.scoring`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from finercut.candidates import Unit, all_units, select_least, step_candidates
from finercut.distances import NonFiniteOutputError


@dataclass(frozen=True)
class Step:
    """One finished step of the search."""

    index: int
    unit: Unit
    distance: float | None
    """The selected unit's score (None for random removal)."""
    candidates: tuple[tuple[Unit, float], ...]
    """Every candidate's distance this step, in search order."""
    window_first_block: int
    block_executions: int
    seconds: float

    def to_dict(self) -> dict:
        return {
            "step": self.index,
            "removed": self.unit.to_dict(),
            "distance": self.distance,
            "window_first_block": self.window_first_block,
            "block_executions": self.block_executions,
            "seconds": self.seconds,
            "candidates": [{**unit.to_dict(), "distance": distance} for unit, distance in self.candidates],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Step":
        return cls(
            index=int(data["step"]),
            unit=Unit.from_dict(data["removed"]),
            distance=_optional_float(data["distance"]),
            candidates=tuple((Unit.from_dict(c), _optional_float(c["distance"])) for c in data["candidates"]),
            window_first_block=int(data["window_first_block"]),
            block_executions=int(data["block_executions"]),
            seconds=float(data["seconds"]),
        )


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


class Scorer(Protocol):
    block_executions: int

    def restore(self, removed: Sequence[Unit]) -> None:
        """Prepare to continue after ``removed`` (resuming) as if the steps had just run."""

    def score(
        self, removed: Sequence[Unit], candidates: Sequence[Unit], *,
        on_candidate: Callable[[Unit, float], None] | None = None,
    ) -> list[tuple[Unit, float]]: ...


def greedy_search(
    scorer: Scorer, *, num_blocks: int, granularity: str, target: int, window_until_ratio: float,
    window_first_block: int, completed: Sequence[Step] = (), on_step: Callable[[Step], None] | None = None,
    on_candidate: Callable[[Unit, float], None] | None = None, only: str | None = None,
) -> list[Step]:
    """Remove ``target`` units one at a time, each the one whose removal moves the output least.

    ``only`` (``"attention"`` / ``"ffn"``) restricts the candidates to one kind of sub-layer.

    Args:
        scorer: scores candidates given what is already removed.
        num_blocks: decoder blocks L of the model.
        granularity: ``"sublayer"`` (2L candidates) or ``"block"`` (L candidates).
        target: total units to have removed at the end.
        window_until_ratio: while at most this fraction of units is removed, only blocks from
            ``window_first_block`` on are candidates (paper: 0.4 and ceil(0.4 L)).
        completed: steps already done (resuming); they are not evaluated again.
        on_step: called after every step, e.g. to save progress.
        on_candidate: called after every scored candidate, e.g. for a progress bar.

    Returns:
        All steps, ``completed`` included, in order.
    """
    units = all_units(num_blocks, granularity, only)
    steps = list(completed)
    removed = [step.unit for step in steps]
    if removed and len(removed) < target:
        scorer.restore(removed)
    while len(removed) < target:
        remaining = [unit for unit in units if unit not in removed]
        candidates, first_block = step_candidates(
            remaining, removed_so_far=len(removed), total_units=len(units),
            window_until_ratio=window_until_ratio, window_first_block=window_first_block,
        )
        started, executions_before = time.perf_counter(), scorer.block_executions
        try:
            scored = scorer.score(removed, candidates, on_candidate=on_candidate)
        except NonFiniteOutputError as error:
            raise NonFiniteOutputError(f"step {len(steps) + 1}: {error}") from error
        unit, distance = select_least(scored)
        step = Step(
            index=len(steps), unit=unit, distance=distance, candidates=tuple(scored),
            window_first_block=first_block, block_executions=scorer.block_executions - executions_before,
            seconds=time.perf_counter() - started,
        )
        steps.append(step)
        removed.append(unit)
        if on_step:
            on_step(step)
    return steps
