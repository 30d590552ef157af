"""BlockPruner (Zhong et al., arXiv 2406.10594) as a baseline: FinerCut's greedy search over the same attention and
FFN candidates, but each candidate scored by the calibration perplexity of the pruned model instead of an output
distance to the original model, and without FinerCut's candidate window.

The fast path is FinerCut's own scorer (:class:`finercut.scoring.FastScorer`: prefix-cached replay, replay
states kept across steps, exact early abort) with :class:`PerplexityObjective` in place of the distance: the
negative log-likelihood of a next token is >= 0, so the summed NLL of the batches scored so far, over all
predictions, bounds the mean NLL from below, and ``exp`` is non-decreasing, so a candidate whose bound's
perplexity exceeds a complete candidate's can be left behind. The plain path, :class:`NaivePerplexityScorer`,
runs the masked model's own forward per candidate; the tests prove both select the same.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from finercut.candidates import Unit
from finercut.distances import mean_next_token_nll, nll_sum  # noqa: F401 (mean_next_token_nll: this module's API)
from finercut.masking import masked
from finercut.methods.base import GREEDY, PERPLEXITY, PERPLEXITY_METRIC, CompareEntry, Method, Selecting
from finercut.methods.greedy import run_greedy, scorer_options
from finercut.placement import input_device
from finercut.scoring import describe_scoring
from finercut.scoring.context import ScoringContext, check_finite
from finercut.search import CandidateScore, Step


def num_predictions(context: ScoringContext) -> int:
    """Next-token predictions over the calibration set: ``seq - 1`` per sample."""
    return sum(batch.input_ids.shape[0] * (batch.input_ids.shape[1] - 1) for batch in context.batches)


class PerplexityObjective:
    """BlockPruner's score as a :class:`finercut.scoring.replay.Objective`: the summed next-token NLL per batch,
    its mean over all predictions mapped to the perplexity by ``exp``."""

    score_of = staticmethod(math.exp)

    def __init__(self, context: ScoringContext) -> None:
        self.context = context
        self.num_positions = num_predictions(context)

    def batch_sum(self, batch_index: int, hidden: torch.Tensor) -> float:
        """Summed NLL of one batch from the last block's output ``hidden`` (``[batch, seq, hidden]``), through
        the full head ``chunk_rows`` positions at a time (the last position predicts nothing)."""
        context, work = self.context, self.context.work
        input_ids = context.batches[batch_index].input_ids
        predicting = hidden.shape[1] - 1
        total = 0.0
        for row in range(hidden.shape[0]):
            for start in range(0, predicting, context.chunk_rows):
                end = min(start + context.chunk_rows, predicting)
                with work.timed("head"):
                    logits = context.adapter.logits(context.model, hidden[row, start:end])
                with work.timed("distance"):
                    total += nll_sum(logits, input_ids[row, start + 1 : end + 1])
                work.head_rows += end - start
        return total


class NaivePerplexityScorer:
    """The plain path: every candidate scored completely by the masked model's own forward.

    Args:
        context: the model, adapter and calibration batches.
    """

    distance_path = "full_head"
    exhaustive = True

    def __init__(self, context: ScoringContext, *, exhaustive: bool = True) -> None:
        self.context = context
        self.model, self.adapter = context.model, context.adapter

    @property
    def block_executions(self) -> int:
        return self.context.block_executions

    def restore(self, removed: Sequence[Unit]) -> None:
        """Nothing is carried between steps: each candidate runs the whole model."""

    @torch.inference_mode()
    def score(self, removed: Sequence[Unit], candidates: Sequence[Unit], *, previous: Sequence = (),
              on_candidate: Callable[[Unit, float], None] | None = None, **_: Any) -> list:
        """Every candidate's perplexity, in the order of ``candidates`` (all scored completely)."""
        scores = []
        for unit in candidates:
            perplexity = check_finite(self.plain_perplexity([*removed, unit]), unit, self.model.dtype)
            scores.append(CandidateScore(unit, perplexity, samples=self.context.num_samples))
            if on_candidate:
                on_candidate(unit, perplexity)
        return scores

    @torch.inference_mode()
    def plain_perplexity(self, removed: Sequence[Unit]) -> float:
        """The model's own forward without ``removed`` over every calibration batch: exp of the mean NLL."""
        sums, count = [], 0
        with masked(self.model, self.adapter, list(removed)):
            for batch in self.context.batches:
                input_ids = batch.input_ids.to(input_device(self.model))
                with self.context.work.timed("blocks"):
                    logits = self.model(input_ids=input_ids, use_cache=False).logits
                nll, n = mean_next_token_nll(logits, batch.input_ids)
                sums.append(nll)
                count += n
        return math.exp(math.fsum(sums) / count)


def perplexity_scorer(context: ScoringContext, *, scorer: str = "fast", exhaustive: bool = False,
                      **options: Any) -> Any:
    """BlockPruner's scorer: ``fast`` (FinerCut's replay and early abort on the perplexity) or ``naive``."""
    if scorer == "naive":
        return NaivePerplexityScorer(context)
    from finercut.scoring.replay import FastScorer

    return FastScorer(context, exhaustive=exhaustive, objective=PerplexityObjective(context), **options)


class BlockPruner(Method):
    name = "blockpruner"
    label = "BlockPruner"
    description = "BlockPruner: greedy by calibration perplexity, every block a candidate (= --metric ppl)"
    objective = PERPLEXITY
    selection = GREEDY
    scorer_options = True
    metric_alias = PERPLEXITY_METRIC
    compare_entries = (CompareEntry("blockpruner", "BlockPruner", "sublayer"),)

    def select(self, request: Selecting) -> list[Step]:
        config = request.config
        options = scorer_options(config)
        scorer = perplexity_scorer(request.context, scorer=config.scorer, exhaustive=config.exhaustive, **options)
        request.extras["scoring"] = describe_scoring(request.context, scorer=config.scorer,
                                                     exhaustive=config.exhaustive, objective=PERPLEXITY_METRIC,
                                                     **options)
        return run_greedy(request, scorer, window_first_block=0)  # every block a candidate
