"""BlockPruner (Zhong et al., arXiv 2406.10594) as a baseline: FinerCut's greedy search over the same attention and
FFN candidates, but each candidate scored by the calibration perplexity of the pruned model instead of an output
distance to the original model, and without FinerCut's candidate window.

:class:`PerplexityScorer` is a scorer for :func:`finercut.search.greedy_search` of its own (no early abort): the
blocks before a candidate are unchanged by removing it, so each step runs the current model once, keeps every
block's input, and replays a candidate from its block on (:meth:`PerplexityScorer.plain_perplexity` is the plain
full forward it must equal).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from finercut.candidates import Unit
from finercut.masking import masked


def mean_next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of each next token and the number of predictions.

    Args:
        logits: ``[batch, seq, vocab]``; input_ids: ``[batch, seq]`` (position ``t`` predicts token ``t + 1``).
    """
    predicted = logits[:, :-1].reshape(-1, logits.shape[-1])
    predicted = predicted if predicted.dtype == torch.float64 else predicted.float()
    targets = input_ids[:, 1:].reshape(-1).to(predicted.device)
    return float(torch.nn.functional.cross_entropy(predicted, targets, reduction="sum").double()), targets.numel()


class PerplexityScorer:
    """Scores candidates by the perplexity of the model without ``removed`` and the candidate, on the calibration
    batches of a :class:`finercut.scoring.ScoringContext` (lower is better, as for a distance).

    Args:
        context: the model, adapter and calibration batches (``first_block_input``, ``block_calls``,
            ``input_ids``).
        chunk_rows: batch rows per full-vocabulary logits chunk.
    """

    def __init__(self, context: Any, *, chunk_rows: int = 1) -> None:
        self.model, self.adapter, self.batches = context.model, context.adapter, list(context.batches)
        self.chunk_rows = chunk_rows
        self.block_executions = 0

    def restore(self, removed: Sequence[Unit]) -> None:
        """Nothing is carried between steps: each step starts from the model without ``removed``."""

    def _run_blocks(self, states: list[torch.Tensor], batch: Any, start: int) -> None:
        from finercut.scoring import run_block

        blocks = self.adapter.blocks_of(self.model)
        for index in range(start, len(blocks)):
            states[index + 1] = run_block(blocks[index], states[index], batch.block_calls[index])
            self.block_executions += 1

    def _perplexity(self, outputs: Sequence[torch.Tensor]) -> float:
        total, count = 0.0, 0
        for batch, output in zip(self.batches, outputs):
            for start in range(0, output.shape[0], self.chunk_rows):
                logits = self.adapter.logits(self.model, output[start:start + self.chunk_rows])
                nll, n = mean_next_token_nll(logits, batch.input_ids[start:start + self.chunk_rows])
                total, count = total + nll, count + n
        return math.exp(total / count)

    @torch.inference_mode()
    def score(self, removed: Sequence[Unit], candidates: Sequence[Unit], *,
              on_candidate: Callable[[Unit, float], None] | None = None, **_: Any) -> list:
        """Every candidate's perplexity, in the order of ``candidates`` (all scored completely)."""
        num_blocks = self.adapter.num_blocks(self.model)
        with masked(self.model, self.adapter, list(removed)):
            current = []
            for batch in self.batches:
                states: list[torch.Tensor] = [batch.first_block_input] + [None] * num_blocks
                self._run_blocks(states, batch, 0)
                current.append(states)
        scores = []
        for unit in candidates:
            outputs = []
            with masked(self.model, self.adapter, [*removed, unit]):
                for batch, states in zip(self.batches, current):
                    replay = list(states)
                    self._run_blocks(replay, batch, unit.block)
                    outputs.append(replay[-1])
            perplexity = self._perplexity(outputs)
            scores.append(_candidate_score(unit, perplexity, sum(b.input_ids.shape[0] for b in self.batches)))
            if on_candidate:
                on_candidate(unit, perplexity)
        return scores

    @torch.inference_mode()
    def plain_perplexity(self, removed: Sequence[Unit]) -> float:
        """The plain form: the model's own forward without ``removed``, over every calibration batch."""
        total, count = 0.0, 0
        with masked(self.model, self.adapter, list(removed)):
            for batch in self.batches:
                logits = self.model(input_ids=batch.input_ids.to(self.model.device), use_cache=False).logits
                nll, n = mean_next_token_nll(logits, batch.input_ids)
                total, count = total + nll, count + n
        return math.exp(total / count)


def _candidate_score(unit: Unit, value: float, samples: int):
    """The search's score record (``CandidateScore`` where the search has it, else ``(unit, value)``)."""
    try:
        from finercut.search import CandidateScore
    except ImportError:
        return unit, value
    return CandidateScore(unit, value, samples=samples)
