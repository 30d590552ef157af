"""The fast scorer: prefix-cached replay, early abort and, where it applies, the vocabulary-free distance.

* **Replay.** Each step caches the current model's input to every block. A candidate at block ``p`` leaves
  everything before ``p`` unchanged, so it is scored by replaying blocks ``p..L-1`` from the cache.
* **Replay states kept across steps.** A candidate's replay passes through states (its input to blocks
  ``p+1..L-1``) that removing the step's winner, at block ``q``, leaves unchanged up to block ``q``: the
  input of block ``i <= q`` depends on blocks before ``i`` only. So they are kept (within a memory budget) and
  the candidate's next replay starts from the latest one still valid, block ``q`` at best. The winner's own
  states are the next model's block inputs after ``q``, so the cache refresh takes them instead of recomputing.
  The same operations on the same inputs give the same numbers, so this changes the work, never a result.
* **Early abort** (:mod:`finercut.scoring.bounds`): candidates are scored batch by batch, always the one with
  the smallest lower bound next, so a candidate stops as soon as its bound exceeds the winner's distance.
  ``exhaustive=True`` scores every candidate on every batch.
* **Vocabulary-subset bounds** (:mod:`finercut.scoring.subset`, JS on a linear head): each batch of a
  candidate is first bounded from a few thousand of the head's rows; the full head runs only for candidates
  still close enough to win, on the block output kept from the bounding pass.
* **Distance.** Angular and Euclidean go through ``G = W^T W`` when the head allows it
  (:mod:`finercut.scoring.gram`); otherwise the full head, chunked, against the prepared reference. Another
  :class:`Objective` (BlockPruner's calibration perplexity) takes the distance's place.

Plain path: :class:`finercut.scoring.naive.NaiveScorer`; the tests prove both select the same units with the
same distances.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

import torch

from finercut.candidates import Unit
from finercut.masking import masked
from finercut.scoring.bounds import best_first
from finercut.scoring.context import ScoringContext, check_finite, run_block
from finercut.scoring.gram import FULL_HEAD, GRAM, GramReference, gram_applies
from finercut.scoring.subset import SubsetBound, subset_size
from finercut.search import CandidateScore


DEFAULT_REPLAY_STATE_BYTES = 2 * 2**30
"""Memory for the replay states kept across steps (the hidden states of candidates' replays)."""
BOUNDED_OUTPUT_BYTES = 2**30
"""Memory for the last-block outputs of bounded batches, kept within a step for their exact scoring (beyond it
a batch is replayed again, from its latest replay state)."""



def output_sum(context: ScoringContext, batch_index: int, hidden: torch.Tensor, *, gram: GramReference | None = None,
               objective: "Objective | None" = None) -> float:
    """What a candidate's final hidden states ``hidden`` (one batch) score, summed over the batch's positions:
    the objective's sum if the run has one, else the output distance through the Gram form when it applies, else
    through the head."""
    if objective is not None:
        return objective.batch_sum(batch_index, hidden)
    if gram is not None:
        return gram.distance_sum(batch_index, hidden)
    return context.distance_sum(batch_index, hidden)

class Objective(Protocol):
    """What candidates are scored by in place of the output distance: a sum over positions of terms >= 0 (so
    the early abort's bound holds), averaged over ``num_positions`` and mapped by a non-decreasing
    ``score_of`` to the score the search compares."""

    num_positions: int

    def batch_sum(self, batch_index: int, hidden: torch.Tensor) -> float:
        """The terms of one batch summed, from the last block's output ``hidden`` (``[batch, seq, hidden]``)."""

    def score_of(self, mean: float) -> float:
        """The score of a mean (non-decreasing)."""


class FastScorer:
    """Scores candidates by replaying blocks from cached block inputs, aborting those that cannot win.

    Args:
        exhaustive: score every candidate on every batch (no early abort).
        replay_state_bytes: memory for replay states kept across steps (0: keep none). When the step's
            candidates could produce more, only the states at every ``stride``-th block are kept.
        objective: score by this instead of the output distance to the original model.
        subset_tokens: tokens per batch of the vocabulary-subset bound (None: the default where it applies;
            0: none).
    """

    def __init__(
        self, context: ScoringContext, *, exhaustive: bool = False,
        replay_state_bytes: int = DEFAULT_REPLAY_STATE_BYTES, objective: Objective | None = None,
        subset_tokens: int | None = None,
    ) -> None:
        self.context = context
        self.exhaustive = exhaustive
        self.objective = objective
        self.gram = GramReference(context) if objective is None and gram_applies(context) else None
        tokens = subset_size(context, subset_tokens) if objective is None and self.gram is None else 0
        self.subset = SubsetBound(context, tokens) if tokens and not exhaustive else None
        self._bounded_outputs: dict[tuple[Unit, int], torch.Tensor] = {}
        self._bounded_bytes = 0
        num_blocks = context.adapter.num_blocks(context.model)
        self._inputs = [[batch.first_block_input] + [None] * (num_blocks - 1) for batch in context.batches]
        self._valid_through = 0  # block inputs 0.._valid_through are current
        self._cached_for: list[Unit] = []
        self._has_scored = False
        self.replay_state_bytes = replay_state_bytes
        self._states: dict[tuple[Unit, int], dict[int, torch.Tensor]] = {}
        """(candidate, batch) -> {block i: the candidate's input to block i}, every one valid for the current
        removals."""
        self._state_bytes = 0
        self._stride = 1
        self._winner_states: list[dict[int, torch.Tensor]] = []
        """The last winner's replay states per batch, taken by the next cache refresh."""

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
        self._has_scored = True
        self._choose_stride(candidates)
        # The samples that carried most of the previous step's complete distances are scored first.
        hint = [c.batch_sums for c in previous if c.batch_sums is not None]
        num_positions = self.objective.num_positions if self.objective else context.num_positions
        score_of = self.objective.score_of if self.objective else None
        with masked(context.model, context.adapter, removed):
            self._refresh()
            try:
                bounded = best_first(candidates, self._batch_sum, num_batches=num_batches,
                                     num_positions=num_positions, exhaustive=self.exhaustive, hint=hint,
                                     savings=savings, score_of=score_of,
                                     batch_bound=self._batch_bound if self.subset else None)
            finally:
                self._bounded_outputs.clear()
                self._bounded_bytes = 0
        results = []
        for unit in candidates:
            value = bounded[unit].value(num_positions)
            value = score_of(value) if score_of else value
            samples = sum(context.batches[b].num_samples for b in bounded[unit].sums)
            if bounded[unit].complete:
                sums = tuple(bounded[unit].sums[b] for b in range(num_batches))
                results.append(CandidateScore(unit, value, samples=samples, batch_sums=sums))
            else:
                only_bounded = sum(context.batches[b].num_samples for b in bounded[unit].bounds)
                results.append(CandidateScore(unit, None, lower_bound=value, samples=samples,
                                              subset_samples=only_bounded if self.subset else None))
            if on_candidate:
                on_candidate(unit, value)
        return results

    def _batch_bound(self, unit: Unit, batch_index: int) -> float:
        """A lower bound of :meth:`_batch_sum` from the vocabulary subset; keeps the block output for it."""
        with masked(self.context.model, self.context.adapter, [unit]):
            hidden = self._replay(unit, batch_index)
        total = check_finite(self.subset.bound_sum(batch_index, hidden), unit, self.context.model.dtype)
        if self._bounded_bytes + hidden.nbytes <= BOUNDED_OUTPUT_BYTES:
            self._bounded_outputs[unit, batch_index] = hidden
            self._bounded_bytes += hidden.nbytes
        return total

    def _batch_sum(self, unit: Unit, batch_index: int) -> float:
        """``unit``'s distance summed over one batch's positions (on top of the removals already masked)."""
        kept = self._bounded_outputs.pop((unit, batch_index), None)
        if kept is not None:
            self._bounded_bytes -= kept.nbytes
            total = self.context.distance_sum(batch_index, kept)
            return check_finite(total, unit, self.context.model.dtype)
        with masked(self.context.model, self.context.adapter, [unit]):
            hidden = self._replay(unit, batch_index)
            total = output_sum(self.context, batch_index, hidden, gram=self.gram, objective=self.objective)
        return check_finite(total, unit, self.context.model.dtype)

    @torch.inference_mode()
    def restore(self, removed: Sequence[Unit]) -> None:
        """Rebuild the block-input cache a run would hold after removing ``removed`` (resuming): the inputs up
        to the last removal's block. The previous step's replay states are not rebuilt, so the next step's
        candidates replay from their own blocks (the same results, at the cost of a step without them). A
        scorer that itself scored the steps before keeps everything (a search driven one step at a time)."""
        removed = list(removed)
        if self._has_scored and removed[: len(self._cached_for)] == self._cached_for:
            return  # this scorer ran the steps before: its caches and states are current (see score)
        self._drop_states()
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
                first_changed = min(unit.block for unit in new_units)
                self._valid_through = min(self._valid_through, first_changed)
                if len(new_units) == 1:  # the last step's winner: its replay states are the new block inputs
                    winner = new_units[0]
                    self._winner_states = [dict(self._states.get((winner, b), {})) for b in range(len(self._inputs))]
                self._drop_states(after_block=first_changed, units=set(new_units))
        else:
            self._valid_through = 0
            self._drop_states()
        self._cached_for = removed

    def _drop_states(self, after_block: int = -1, units: set[Unit] = frozenset()) -> None:
        """Forget the replay states of ``units`` and every state at an input of a block after ``after_block``
        (all of them by default)."""
        for key in list(self._states):
            states = self._states[key]
            for i in [i for i in states if i > after_block or key[0] in units]:
                self._state_bytes -= states.pop(i).nbytes
            if not states:
                del self._states[key]

    def _choose_stride(self, candidates: Sequence[Unit]) -> None:
        # Keep the states at every block if the step's candidates can produce no more than the budget left,
        # else at every stride-th block, so that whichever block the next winner is at, a state at most a
        # stride before it remains.
        num_blocks = len(self._inputs[0])
        per_block = sum(batch.first_block_input.nbytes for batch in self.context.batches)
        possible = sum(num_blocks - 1 - unit.block for unit in candidates) * per_block
        free = self.replay_state_bytes - self._state_bytes
        self._stride = 1 if possible <= free else (math.ceil(possible / free) if free > 0 else 0)

    def _keep(self, states: dict[int, torch.Tensor], block: int, hidden: torch.Tensor) -> None:
        if self._stride and block % self._stride == 0 and self._state_bytes + hidden.nbytes <= self.replay_state_bytes:
            states[block] = hidden
            self._state_bytes += hidden.nbytes

    def _refresh(self) -> None:
        blocks = self.context.adapter.blocks_of(self.context.model)
        with self.context.work.timed("blocks"):
            for b, batch in enumerate(self.context.batches):
                inputs = self._inputs[b]
                taken = self._winner_states[b] if self._winner_states else {}
                for i in range(self._valid_through, len(blocks) - 1):
                    inputs[i + 1] = taken[i + 1] if i + 1 in taken else run_block(blocks[i], inputs[i],
                                                                                  batch.block_calls[i])
        self._winner_states = []
        self._valid_through = len(blocks) - 1

    def _replay(self, unit: Unit, batch_index: int) -> torch.Tensor:
        """``unit``'s last-block output on one batch, from its latest kept state (else its block's input)."""
        blocks = self.context.adapter.blocks_of(self.context.model)
        batch = self.context.batches[batch_index]
        states = self._states.setdefault((unit, batch_index), {})
        start = max(states, default=unit.block)
        hidden = states[start] if start in states else self._inputs[batch_index][unit.block]
        with self.context.work.timed("blocks"):
            for i in range(start, len(blocks)):
                hidden = run_block(blocks[i], hidden, batch.block_calls[i])
                if i + 1 < len(blocks):
                    self._keep(states, i + 1, hidden)
        return hidden
