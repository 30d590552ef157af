"""The reference scorer: a full forward of the masked model per candidate and the plain distance functions.

Nothing is cached between candidates and nothing is shared with the fast path's shortcuts: the masked model
runs through its own ``transformers`` forward, the logits come from the full output head, and the distance is
the metric's plain function of :mod:`finercut.distances` (``Metric.distance``) against the original logits.
The fast scorer is tested against this one.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from finercut.candidates import Unit
from finercut.masking import masked
from finercut.placement import input_device
from finercut.scoring.context import ScoringContext, check_finite
from finercut.search import CandidateScore


class NaiveScorer:
    """Scores every candidate completely, with a full forward and the plain distance."""

    distance_path = "full_head"
    exhaustive = True

    def __init__(self, context: ScoringContext, *, exhaustive: bool = True) -> None:
        self.context = context

    @property
    def block_executions(self) -> int:
        return self.context.block_executions

    def restore(self, removed: Sequence[Unit]) -> None:
        """Nothing is cached between candidates, so resuming needs no preparation."""

    @torch.inference_mode()
    def score(
        self, removed: Sequence[Unit], candidates: Sequence[Unit], *, previous: Sequence[CandidateScore] = (),
        on_candidate: Callable[[Unit, float], None] | None = None, savings: Callable[[Unit], float] | None = None,
    ) -> list[CandidateScore]:
        """Score every candidate completely (``savings``, a cost target's, changes nothing: nothing is aborted)."""
        context = self.context
        results = []
        for unit in candidates:
            with masked(context.model, context.adapter, [*removed, unit]):
                sums = [self._batch_distance_sum(b) for b in range(len(context.batches))]
            distance = check_finite(math.fsum(sums) / context.num_positions, unit, context.model.dtype)
            results.append(CandidateScore(unit, distance, samples=context.num_samples))
            if on_candidate:
                on_candidate(unit, distance)
        return results

    @torch.inference_mode()
    def set_distance(self, removed: Sequence[Unit]) -> float:
        """The distance of the model without ``removed`` (any set) from the original: its own full forward on
        every batch and the plain distance (the reference of :class:`finercut.scoring.sets.SetScorer`)."""
        context = self.context
        with masked(context.model, context.adapter, list(removed)):
            sums = [self._batch_distance_sum(b) for b in range(len(context.batches))]
        return math.fsum(sums) / context.num_positions

    def _batch_distance_sum(self, batch_index: int) -> float:
        context, work = self.context, self.context.work
        input_ids = context.batches[batch_index].input_ids.to(input_device(context.model))
        with work.timed("blocks"):
            normed = context.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        rows = normed.reshape(-1, normed.shape[-1])
        total = 0.0
        for chunk_index, ref_logits in enumerate(context.reference.logit_chunks(batch_index)):
            start = chunk_index * context.chunk_rows
            chunk = rows[start : start + context.chunk_rows]
            with work.timed("head"):
                logits = context.adapter.head_logits(context.model, chunk)
            with work.timed("distance"):
                total += float(context.metric.distance(ref_logits, logits).sum())
            work.head_rows += chunk.shape[0]
        return total
