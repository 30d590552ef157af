"""The fast scorer: prefix-cached replay, early abort and, where it applies, the vocabulary-free distance.

* **Replay.** Each step caches the current model's input to every block. A candidate at block ``p`` leaves
  everything before ``p`` unchanged, so it is scored by replaying blocks ``p..L-1`` from the cache.
* **Early abort** (:mod:`finercut.scoring.bounds`): candidates are scored batch by batch, always the one with
  the smallest lower bound next, so a candidate stops as soon as its bound exceeds the winner's distance.
  ``exhaustive=True`` scores every candidate on every batch.
* **Distance.** Angular and Euclidean go through ``G = W^T W`` when the head allows it
  (:mod:`finercut.scoring.gram`); otherwise the full head, chunked, against the prepared reference.

Plain path: :class:`finercut.scoring.naive.NaiveScorer`; the tests prove both select the same units with the
same distances.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from finercut.candidates import Unit
from finercut.masking import masked
from finercut.scoring.bounds import best_first
from finercut.scoring.context import ScoringContext, check_finite, run_block
from finercut.scoring.gram import FULL_HEAD, GRAM, GramReference, gram_applies
from finercut.search import CandidateScore


class FastScorer:
    """Scores candidates by replaying blocks from cached block inputs, aborting those that cannot win."""

    def __init__(self, context: ScoringContext, *, exhaustive: bool = False) -> None:
        self.context = context
        self.exhaustive = exhaustive
        self.gram = GramReference(context) if gram_applies(context) else None
        num_blocks = context.adapter.num_blocks(context.model)
        self._inputs = [[batch.first_block_input] + [None] * (num_blocks - 1) for batch in context.batches]
        self._valid_through = 0  # block inputs 0.._valid_through are current
        self._cached_for: list[Unit] = []

    @property
    def distance_path(self) -> str:
        return GRAM if self.gram is not None else FULL_HEAD

    @property
    def block_executions(self) -> int:
        return self.context.block_executions

    @torch.inference_mode()
    def score(
        self, removed: Sequence[Unit], candidates: Sequence[Unit], *, previous: Sequence[CandidateScore] = (),
        on_candidate: Callable[[Unit, float], None] | None = None, savings: Callable[[Unit], float] | None = None,
    ) -> list[CandidateScore]:
        """Score ``candidates``; with ``savings`` (a cost target) the early abort keeps the candidate of least
        distance per cost saved complete instead of the one of least distance (see :func:`best_first`)."""
        context = self.context
        num_batches = len(context.batches)
        self._invalidate_for(list(removed))
        # The samples that carried most of the previous step's complete distances are scored first.
        hint = [c.batch_sums for c in previous if c.batch_sums is not None]
        with masked(context.model, context.adapter, removed):
            self._refresh()
            bounded = best_first(candidates, self._batch_sum, num_batches=num_batches,
                                 num_positions=context.num_positions, exhaustive=self.exhaustive, hint=hint,
                                 savings=savings)
        results = []
        for unit in candidates:
            value = bounded[unit].value(context.num_positions)
            samples = sum(context.batches[b].num_samples for b in bounded[unit].sums)
            if bounded[unit].complete:
                sums = tuple(bounded[unit].sums[b] for b in range(num_batches))
                results.append(CandidateScore(unit, value, samples=samples, batch_sums=sums))
            else:
                results.append(CandidateScore(unit, None, lower_bound=value, samples=samples))
            if on_candidate:
                on_candidate(unit, value)
        return results

    def _batch_sum(self, unit: Unit, batch_index: int) -> float:
        """``unit``'s distance summed over one batch's positions (on top of the removals already masked)."""
        with masked(self.context.model, self.context.adapter, [unit]):
            hidden = self._replay_from(batch_index, unit.block)
            if self.gram is not None:
                total = self.gram.distance_sum(batch_index, hidden)
            else:
                total = self.context.distance_sum(batch_index, hidden)
        return check_finite(total, unit, self.context.model.dtype)

    @torch.inference_mode()
    def restore(self, removed: Sequence[Unit]) -> None:
        """Rebuild the cache a run would hold after removing ``removed`` (resuming), so that the next step costs
        exactly what it costs in an uninterrupted run: only the inputs up to the last removal's block."""
        removed = list(removed)
        if not removed:
            return
        last_block = removed[-1].block
        blocks = self.context.adapter.blocks_of(self.context.model)
        with masked(self.context.model, self.context.adapter, removed), self.context.work.timed("blocks"):
            for b, batch in enumerate(self.context.batches):
                inputs = self._inputs[b]
                for i in range(last_block):
                    inputs[i + 1] = run_block(blocks[i], inputs[i], batch.block_calls[i])
        self._valid_through = last_block
        self._cached_for = removed

    def _invalidate_for(self, removed: list[Unit]) -> None:
        # Removing a unit at block q changes the inputs of blocks after q only.
        if removed[: len(self._cached_for)] == self._cached_for:
            new_units = removed[len(self._cached_for) :]
            if new_units:
                self._valid_through = min(self._valid_through, *(unit.block for unit in new_units))
        else:
            self._valid_through = 0
        self._cached_for = removed

    def _refresh(self) -> None:
        blocks = self.context.adapter.blocks_of(self.context.model)
        with self.context.work.timed("blocks"):
            for b, batch in enumerate(self.context.batches):
                inputs = self._inputs[b]
                for i in range(self._valid_through, len(blocks) - 1):
                    inputs[i + 1] = run_block(blocks[i], inputs[i], batch.block_calls[i])
        self._valid_through = len(blocks) - 1

    def _replay_from(self, batch_index: int, first_block: int) -> torch.Tensor:
        blocks = self.context.adapter.blocks_of(self.context.model)
        batch = self.context.batches[batch_index]
        hidden = self._inputs[batch_index][first_block]
        with self.context.work.timed("blocks"):
            for i in range(first_block, len(blocks)):
                hidden = run_block(blocks[i], hidden, batch.block_calls[i])
        return hidden
