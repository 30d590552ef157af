"""Exact scores of whole removal sets: the distance from the original model of the model with a set ``S`` of
units removed, on the calibration samples, by the run's metric (or an :class:`~finercut.scoring.replay.Objective`
such as BlockPruner's perplexity or a task's answer likelihood).

The searches over removal sets (:mod:`finercut.set_search`: beam, swap, EvoPress) score many sets that share
most of their units. The same shortcuts as the greedy scorer apply, generalised from "one more unit" to any set:

* **Prefix replay.** The input of block ``i`` depends only on the removals at blocks before ``i``. Every scored
  set keeps (within a memory budget, least recently used first out) its inputs to the blocks it replayed and
  the last block's output, per batch; a set ``S`` is scored from the kept state of the set ``C`` whose first
  difference from ``S`` (the smallest block of a unit in one and not the other) is latest, replaying only the
  blocks from there. Sets differing from a cached one at blocks ``>= p`` replay from block ``p``; a set scored
  before (its last output kept) runs no block at all. A kept state shares the tensors of the state it was
  replayed from for the blocks before the difference (counted once).
* **Replay states.** The states a candidate's replay passes through are the very inputs its set has: when the
  search keeps that set (a beam's kept sets, an accepted swap), its next extensions replay from them.
* **Exact early abort** against a ``threshold``: batches are scored one at a time and a set stops once the
  lower bound of its score (the partial sum over all positions, mapped by the objective's non-decreasing
  ``score_of``) is strictly above the threshold; the result says it was bounded. A set whose score is at most
  the threshold is always scored completely, so a decision "accept if the score is below (or at most) the
  threshold" is the same with or without the abort.
* Angular and Euclidean skip the vocabulary for a plain linear head, as the greedy scorer does; JS on a plain
  head is first bounded from a subset of the vocabulary on every batch (:mod:`finercut.scoring.subset`) when
  scored against a threshold, and runs the full head only while the set could still come in at or below it.

The order batches are scored in is the caller's (``order``) or the index order: never the history of the
scorer, so a result (a bound included) is the same whatever was cached, and a resumed search records the same
numbers. Batch sums are kept for every set scored (floats), so a set scored again costs nothing.

The same operations on the same inputs give the same numbers: whichever cached state a set is replayed from,
its block inputs are bit-identical to those of its own full forward through the blocks. The plain reference is
:meth:`finercut.scoring.naive.NaiveScorer.set_distance` (a full forward of the masked model); the tests prove
both equal in float64.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import AbstractSet, Callable, Iterable, Sequence

import torch

from finercut.candidates import Unit
from finercut.masking import masked
from finercut.scoring.context import ScoringContext, check_finite, run_block
from finercut.scoring.gram import GramReference, gram_applies
from finercut.scoring.replay import DEFAULT_REPLAY_STATE_BYTES, Objective, output_sum
from finercut.scoring.subset import SubsetBound, subset_size

RemovalSet = frozenset  # of Unit


@dataclass(frozen=True)
class SetScore:
    """The score of one removal set: complete (``distance``) or, stopped early, a ``lower_bound`` above the
    threshold it was scored against."""

    units: frozenset
    distance: float | None
    lower_bound: float | None = None
    samples: int = 0
    """Calibration samples the set was scored on (all of them, or those of ``batches``, when complete)."""

    @property
    def bounded(self) -> bool:
        return self.distance is None

    @property
    def value(self) -> float:
        """The distance, or the lower bound of a bounded score."""
        return self.distance if self.distance is not None else self.lower_bound


def first_difference(a: AbstractSet[Unit], b: AbstractSet[Unit], num_blocks: int) -> int:
    """The first block whose output differs between two removal sets (the smallest block of a unit in one set
    only); ``num_blocks`` when they are equal. The inputs to the blocks up to this one are the same for both."""
    return min((unit.block for unit in a ^ b), default=num_blocks)


def set_key(units: Iterable[Unit]) -> tuple:
    """A deterministic order of removal sets: by their units' search order, compared as sorted sequences (for
    sets that share all units but one, the set with the earlier differing unit first, as the greedy search
    breaks ties)."""
    return tuple(sorted(unit.sort_key for unit in units))


class SetScorer:
    """Scores arbitrary removal sets exactly, reusing the replays of the sets scored before.

    Args:
        objective: score by this instead of the output distance to the original model.
        state_bytes: memory for the kept block inputs and outputs of scored sets (the original model's own
            path is always kept).
    """

    def __init__(self, context: ScoringContext, *, objective: Objective | None = None,
                 state_bytes: int = DEFAULT_REPLAY_STATE_BYTES, subset_tokens: int | None = None) -> None:
        self.context = context
        self.objective = objective
        self.gram = GramReference(context) if objective is None and gram_applies(context) else None
        tokens = subset_size(context, subset_tokens) if objective is None and self.gram is None else 0
        self.subset = SubsetBound(context, tokens) if tokens else None
        self.num_blocks = context.adapter.num_blocks(context.model)
        self.num_positions = objective.num_positions if objective is not None else context.num_positions
        self.score_of: Callable[[float], float] = objective.score_of if objective is not None else _identity
        self.objective_score_of = objective.score_of if objective is not None else None
        """``score_of`` as :func:`finercut.scoring.bounds.best_first` takes it (None: the mean itself)."""
        self.state_bytes = state_bytes
        self.evaluations = 0
        """Calls of :meth:`score` so far (each set scored, served from kept sums or not)."""
        self._sums: dict[frozenset, dict[int, float]] = {}
        self._bounds: dict[frozenset, dict[int, float]] = {}
        self._paths: OrderedDict[frozenset, list[dict[int, torch.Tensor]]] = OrderedDict()
        self._refs: dict[int, list] = {}
        self._bytes = 0
        self._paths[frozenset()] = [{0: batch.first_block_input} for batch in context.batches]
        for path in self._paths[frozenset()]:
            self._retain(path[0])

    # -- scoring -------------------------------------------------------------------------------------------------

    @property
    def block_executions(self) -> int:
        return self.context.block_executions

    @property
    def num_batches(self) -> int:
        return len(self.context.batches)

    def batch_positions(self, batch_index: int) -> float:
        """Positions of one batch in the score's mean (the objective's share of its positions by samples)."""
        batch = self.context.batches[batch_index]
        if self.objective is None:
            return float(batch.input_ids.numel())
        return self.num_positions * batch.num_samples / self.context.num_samples

    def known(self, units: Iterable[Unit]) -> dict[int, float]:
        """The batch sums kept for a set (batch -> sum)."""
        return dict(self._sums.get(frozenset(units), {}))

    @torch.inference_mode()
    def score(self, units: Iterable[Unit], *, threshold: float | None = None, batches: Sequence[int] | None = None,
              order: Sequence[int] | None = None) -> SetScore:
        """The score of the model without ``units``: the mean over every position of ``batches`` (default all)
        of the distance to the original model, mapped by the objective's ``score_of``.

        With ``threshold``, scoring stops once the lower bound of the score over ``batches`` is strictly above
        it (a bounded result); a score at most ``threshold`` is always complete. ``order`` is the order the
        batches are scored in (default: index order); it changes when a bound stops, never a complete score.
        """
        units = frozenset(units)
        self.evaluations += 1
        chosen = list(range(self.num_batches)) if batches is None else list(batches)
        if order is not None:
            ranked = {b: i for i, b in enumerate(order)}
            chosen.sort(key=lambda b: (ranked.get(b, len(ranked)), b))
        positions = self.num_positions if len(set(chosen)) == self.num_batches else math.fsum(
            self.batch_positions(b) for b in chosen)
        known = self._sums.setdefault(units, {})
        bounds: dict[int, float] = {}
        with _Masking(self.context, units) as masking:
            if threshold is not None and self.subset is not None:
                # JS on a plain head: every batch first bounded from a vocabulary subset (its block output kept
                # with the set's states), the full head only while the set could still come in at or below the
                # threshold (the order of finercut.scoring.bounds.best_first for one set)
                kept = self._bounds.setdefault(units, {})
                for b in chosen:
                    if b in known:
                        continue
                    if b not in kept:
                        masking.enter()
                        hidden = self._replay(units, b)
                        kept[b] = check_finite(self.subset.bound_sum(b, hidden), _Named(units),
                                               self.context.model.dtype)
                    bounds[b] = kept[b]
                    lower = self._lower(chosen, known, bounds, positions)
                    if lower > threshold:
                        return SetScore(units, None, lower, self._samples(chosen, known))
            for count, b in enumerate(chosen, start=1):
                if b not in known:
                    masking.enter()
                    known[b] = self._batch_sum(units, b, self._replay(units, b))
                    bound = bounds.pop(b, None)
                    if bound is not None and bound > known[b]:
                        raise ValueError(f"the vocabulary-subset bound {bound} of a set exceeds its distance sum "
                                         f"{known[b]} on batch {b}: the early abort would not be exact")
                if threshold is not None and count < len(chosen):
                    lower = self._lower(chosen, known, bounds, positions)
                    if lower > threshold:
                        return SetScore(units, None, lower, self._samples(chosen, known))
        sums = [known[b] for b in chosen]
        samples = self._samples(chosen, known)
        value = self.score_of(math.fsum(sums) / positions)
        return SetScore(units, check_finite(value, _Named(units), self.context.model.dtype), None, samples)

    # -- one batch at a time (a best-first search over many sets: finercut.scoring.bounds.best_first) ----------

    def batch_sum(self, units: Iterable[Unit], batch_index: int) -> float:
        """The set's distance summed over one batch's positions (kept: a second call costs nothing)."""
        units = frozenset(units)
        known = self._sums.setdefault(units, {})
        if batch_index not in known:
            with masked(self.context.model, self.context.adapter, units), torch.inference_mode():
                known[batch_index] = self._batch_sum(units, batch_index, self._replay(units, batch_index))
            bound = self._bounds.get(units, {}).get(batch_index)
            if bound is not None and bound > known[batch_index]:
                raise ValueError(f"the vocabulary-subset bound {bound} of a set exceeds its distance sum "
                                 f"{known[batch_index]} on batch {batch_index}: the early abort would not be exact")
        return known[batch_index]

    def batch_bound(self, units: Iterable[Unit], batch_index: int) -> float:
        """A lower bound of :meth:`batch_sum` from the vocabulary subset (``subset`` must apply); the block output
        is kept with the set's states when memory allows, for its exact sum."""
        units = frozenset(units)
        bounds = self._bounds.setdefault(units, {})
        if batch_index not in bounds:
            with masked(self.context.model, self.context.adapter, units), torch.inference_mode():
                hidden = self._replay(units, batch_index)
                bounds[batch_index] = check_finite(self.subset.bound_sum(batch_index, hidden), _Named(units),
                                                   self.context.model.dtype)
        return bounds[batch_index]

    def known_bounds(self, units: Iterable[Unit]) -> dict[int, float]:
        """The vocabulary-subset bounds kept for a set (batch -> bound)."""
        return dict(self._bounds.get(frozenset(units), {}))

    def _lower(self, chosen: Sequence[int], known: dict[int, float], bounds: dict[int, float],
               positions: float) -> float:
        """The lower bound of a score over ``chosen`` batches: exact sums where known, subset bounds elsewhere."""
        parts = [known[b] if b in known else bounds[b] for b in chosen if b in known or b in bounds]
        return self.score_of(math.fsum(parts) / positions)

    def _samples(self, chosen: Sequence[int], known: dict[int, float]) -> int:
        return sum(self.context.batches[b].num_samples for b in chosen if b in known)

    def _batch_sum(self, units: frozenset, batch_index: int, hidden: torch.Tensor) -> float:
        total = output_sum(self.context, batch_index, hidden, gram=self.gram, objective=self.objective)
        total = check_finite(total, _Named(units), self.context.model.dtype)
        if not total >= 0:
            raise ValueError(f"distance sum {total} of {sorted(map(str, units))} is negative: the bound would "
                             "not hold")
        return total

    # -- the kept states -----------------------------------------------------------------------------------------

    def _source(self, units: frozenset, batch_index: int) -> tuple[frozenset, int]:
        """The kept set and block to replay ``units`` from on one batch: the latest block whose input is kept for
        a set that agrees with ``units`` on every block before it (the set itself with its last output: no
        block at all)."""
        own = self._paths.get(units)
        if own is not None and self.num_blocks in own[batch_index]:
            return units, self.num_blocks
        best, best_block = frozenset(), 0
        for key in reversed(self._paths):  # the most recently used first
            state = self._paths[key][batch_index]
            if not state:
                continue
            limit = first_difference(key, units, self.num_blocks)
            if limit <= best_block:
                continue
            if limit < self.num_blocks and limit in state:
                start = limit
            else:
                start = max((i for i in state if i <= limit and i < self.num_blocks), default=-1)
            if start > best_block:
                best, best_block = key, start
        return best, best_block

    def _replay(self, units: frozenset, batch_index: int) -> torch.Tensor:
        """The last block's output of the model without ``units`` (masked by the caller) on one batch."""
        source, start = self._source(units, batch_index)
        self._paths.move_to_end(source)
        source_state = self._paths[source][batch_index]
        if start == self.num_blocks:
            return source_state[self.num_blocks]
        limit = first_difference(source, units, self.num_blocks)
        state = {i: tensor for i, tensor in source_state.items() if i <= limit}
        hidden = source_state[start]
        blocks = self.context.adapter.blocks_of(self.context.model)
        calls = self.context.batches[batch_index].block_calls
        with self.context.work.timed("blocks"):
            for i in range(start, self.num_blocks):
                hidden = run_block(blocks[i], hidden, calls[i])
                state[i + 1] = hidden
        self._keep(units, batch_index, state)
        return hidden

    def _keep(self, units: frozenset, batch_index: int, state: dict[int, torch.Tensor]) -> None:
        path = self._paths.get(units)
        if path is None:
            path = self._paths[units] = [{} for _ in range(self.num_batches)]
        self._paths.move_to_end(units)
        old = path[batch_index]
        for tensor in state.values():
            self._retain(tensor)
        for tensor in old.values():
            self._release(tensor)
        path[batch_index] = state
        self._evict(protect=units)

    def _evict(self, protect: frozenset) -> None:
        for key in list(self._paths):
            if self._bytes <= self.state_bytes:
                return
            if key == protect or not key:
                continue
            for state in self._paths.pop(key):
                for tensor in state.values():
                    self._release(tensor)
        if self._bytes > self.state_bytes and protect:  # even the newest set's states do not fit: keep none
            for state in self._paths.pop(protect):
                for tensor in state.values():
                    self._release(tensor)

    def keep_recent(self, sets: Iterable[Iterable[Unit]]) -> None:
        """Mark the kept states of ``sets`` as recently used (a search's current sets: their extensions replay
        from them), so that they are the last to go."""
        for units in sets:
            key = frozenset(units)
            if key in self._paths:
                self._paths.move_to_end(key)

    def _retain(self, tensor: torch.Tensor) -> None:
        entry = self._refs.get(id(tensor))
        if entry is None:
            self._refs[id(tensor)] = [1, tensor.nbytes, tensor]
            self._bytes += tensor.nbytes
        else:
            entry[0] += 1

    def _release(self, tensor: torch.Tensor) -> None:
        entry = self._refs[id(tensor)]
        entry[0] -= 1
        if entry[0] == 0:
            del self._refs[id(tensor)]
            self._bytes -= entry[1]

    @property
    def kept_bytes(self) -> int:
        return self._bytes


def _identity(value: float) -> float:
    return value


class _Named:
    """A removal set as :func:`check_finite` names a candidate."""

    def __init__(self, units: Iterable[Unit]) -> None:
        self.text = "{" + ", ".join(str(u) for u in sorted(units, key=lambda u: u.sort_key)) + "}"

    def __str__(self) -> str:
        return self.text


class _Masking:
    """Mask the model for a set only once a batch actually needs its blocks (sets served from kept sums or
    outputs mask nothing)."""

    def __init__(self, context: ScoringContext, units: frozenset) -> None:
        self.context, self.units, self._context = context, units, None

    def __enter__(self) -> "_Masking":
        return self

    def enter(self) -> None:
        if self._context is None:
            self._context = masked(self.context.model, self.context.adapter, self.units)
            self._context.__enter__()

    def __exit__(self, *exc) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)


__all__ = ["RemovalSet", "SetScore", "SetScorer", "first_difference", "set_key"]
