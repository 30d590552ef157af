"""Exact early abort: stop scoring a candidate once it provably cannot be selected.

A distance is the mean over all calibration positions of per-position terms that are all >= 0. After some of
the samples, the partial sum divided by the number of **all** positions is therefore a lower bound of the
candidate's distance. Once that bound is strictly greater than a complete distance, the candidate can neither
win nor tie, so the rest of its samples is skipped. A bound equal to a complete distance is not enough: the
remaining samples could add exactly zero, and an exact tie goes to the earliest unit in (block, attention
before FFN) order, which may be this one.

:func:`best_first` applies the bound in the most economical order: it always scores one more sample of the
candidate whose bound is smallest, and stops when that candidate is complete. A candidate is therefore scored
only while it could still be the winner, whatever order the candidates come in.

Sums are taken with :func:`math.fsum` (the correctly rounded sum), so a candidate's complete distance does not
depend on the order its samples were scored in, and a partial sum never exceeds the complete one.

Plain path: scoring every candidate on every sample (``exhaustive``); the tests prove both select the same.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from finercut.candidates import Unit


def sample_order(complete_sums: Sequence[Sequence[float]], num_batches: int) -> list[int]:
    """The order to score batches in: those that carried the largest share of the distance so far first.

    Args:
        complete_sums: per-batch distance sums of the candidates scored completely so far in this step.
        num_batches: number of calibration batches.

    Returns:
        Batch indices; by descending summed share (each candidate's sums divided by its total), ties and the
        start of a step in index order.
    """
    weights = [0.0] * num_batches
    for sums in complete_sums:
        total = math.fsum(sums)
        if total > 0:
            for index, value in enumerate(sums):
                weights[index] += value / total
    return sorted(range(num_batches), key=lambda index: (-weights[index], index))


def lower_bound(partial_sums: Sequence[float], num_positions: int) -> float:
    """The partial sum over the samples seen, divided by all ``num_positions`` positions."""
    return math.fsum(partial_sums) / num_positions


@dataclass(frozen=True)
class BoundedSum:
    """A candidate's per-batch distance sums: over all batches (complete) or over those scored before it was
    left behind (aborted), and for an aborted one the cheap bounds of batches it was not scored on exactly."""

    sums: dict[int, float]
    complete: bool
    bounds: dict[int, float] = field(default_factory=dict)

    def value(self, num_positions: int) -> float:
        """The distance if complete, else the lower bound."""
        return lower_bound([*self.sums.values(), *self.bounds.values()], num_positions)


def best_first(
    units: Sequence[Unit], batch_sum: Callable[[Unit, int], float], *, num_batches: int, num_positions: int,
    exhaustive: bool = False, hint: Sequence[Sequence[float]] = (), savings: Callable[[Unit], float] | None = None,
    score_of: Callable[[float], float] | None = None, batch_bound: Callable[[Unit, int], float] | None = None,
) -> dict[Unit, BoundedSum]:
    """Score ``units`` batch by batch, always advancing the one with the smallest lower bound, until a complete
    one is smallest: the unit :func:`finercut.candidates.select_least` would pick from the complete scores.

    Every unit starts with bound 0, so each is scored on a first batch unless a complete distance of exactly 0
    comes first. Units are ordered by ``(bound, sort_key)``: when a complete unit with distance ``d`` is on top,
    every other unit has a bound above ``d``, or equal to it with a later sort key, so it can neither be smaller
    nor win a tie. Each unit's next batch is the first it has not seen in :func:`sample_order` of the complete
    sums so far (before any, of ``hint``: e.g. the previous step's complete candidates).

    With ``savings`` (a cost target, :mod:`finercut.budgets`), units are ordered by ``(bound / saving,
    sort_key)`` instead, and the unit on top when complete is the one
    :func:`finercut.budgets.select_least_per_cost` would pick: a distance is at least its bound, and dividing by
    the same positive saving keeps the order (rounded division is monotone), so every unit left behind has a
    distance per cost above the winner's, or equal with a later sort key. The threshold is thus scaled per
    candidate; the abort stays exact.

    With ``score_of`` (a non-decreasing map of the mean: BlockPruner's ``exp``, perplexity from the mean
    negative log-likelihood), units are ordered by ``score_of(bound)``: the score is at least ``score_of`` of
    its bound, so the unit on top when complete is the one the selection picks from the mapped scores, ties
    in the mapped values included (two means one ulp apart may map to the same perplexity).

    With ``batch_bound`` (a cheaper lower bound of ``batch_sum``, e.g. :mod:`finercut.scoring.subset`), a unit
    is first bounded on its batches, in the same order, and then scored exactly batch by batch, each exact sum
    replacing its bound; its lower bound counts the exact sums where known and the bounds elsewhere. A bound
    is at most the exact sum (checked whenever both are known), so the argument above is unchanged.

    Args:
        batch_sum: ``(unit, batch index) -> sum over the batch's positions`` (must be >= 0).
        batch_bound: ``(unit, batch index) -> a lower bound >= 0 of batch_sum`` (not used when exhaustive).
        exhaustive: score every unit on every batch (the plain path).
        savings: ``unit -> cost its removal saves`` (> 0 for every unit): order by distance per cost saved.
        score_of: the non-decreasing map from a mean to the score the selection compares (default: none).

    Returns:
        Per unit, the sums it was scored on.
    """
    sums: dict[Unit, dict[int, float]] = {unit: {} for unit in units}
    bounds: dict[Unit, dict[int, float]] = {unit: {} for unit in units}
    complete_sums: list[list[float]] = []
    order = sample_order([sums for sums in hint if len(sums) == num_batches], num_batches)
    if exhaustive:
        batch_bound = None

    def advance(unit: Unit) -> None:
        nonlocal order
        if batch_bound is not None:
            unbounded = next((b for b in order if b not in sums[unit] and b not in bounds[unit]), None)
            if unbounded is not None:
                bounds[unit][unbounded] = _checked(batch_bound(unit, unbounded), unit, "bound")
                return
        index = next(b for b in order if b not in sums[unit])
        value = _checked(batch_sum(unit, index), unit, "sum")
        if index in bounds[unit] and bounds[unit].pop(index) > value:
            raise ValueError(f"the bound of {unit} on batch {index} exceeds its distance sum {value}: the early "
                             "abort would not be exact")
        sums[unit][index] = value
        if len(sums[unit]) == num_batches:
            complete_sums.append([sums[unit][b] for b in range(num_batches)])
            order = sample_order(complete_sums, num_batches)

    if exhaustive:
        for unit in units:
            while len(sums[unit]) < num_batches:
                advance(unit)
    else:
        if savings is not None and not all(savings(unit) > 0 for unit in units):
            raise ValueError("every candidate ranked by distance per cost must save a positive cost")

        def rank(unit: Unit) -> float:
            bound = lower_bound([*sums[unit].values(), *bounds[unit].values()], num_positions)
            if score_of is not None:
                bound = score_of(bound)
            # The same division select_least_per_cost makes (distance_per_cost), so a complete unit's key
            # equals its selection score bit for bit.
            return bound if savings is None else bound / savings(unit)

        heap = [(0.0, unit.sort_key, position) for position, unit in enumerate(units)]
        heapq.heapify(heap)
        while heap and len(sums[units[heap[0][2]]]) < num_batches:
            _, key, position = heapq.heappop(heap)
            advance(units[position])
            heapq.heappush(heap, (rank(units[position]), key, position))
    return {unit: BoundedSum(sums[unit], complete=len(sums[unit]) == num_batches, bounds=bounds[unit])
            for unit in units}


def _checked(value: float, unit: Unit, what: str) -> float:
    if not value >= 0:
        raise ValueError(f"distance {what} {value} of {unit} is negative or NaN: the lower bound would not hold")
    return value
