"""ShortGPT (Men et al., arXiv 2403.03853): remove the blocks of lowest Block Influence, ``1 - cos(input, output)``
on the original model, all at once."""

from __future__ import annotations

import time

from finercut.candidates import BLOCK, Unit
from finercut.methods.base import ONE_SHOT, CompareEntry, OneShotMethod, Ranking, Selecting, ranked
from finercut.methods.residual import residual_summary
from finercut.scoring import ScoringContext
from finercut.search import Step


def shortgpt_ranking(context: ScoringContext) -> Ranking:
    """Every block by ascending Block Influence on the original model (earliest on ties)."""
    started, executions = time.perf_counter(), context.block_executions
    influences, _ = residual_summary(context)
    scores = {Unit(i, BLOCK): influence for i, influence in enumerate(influences)}
    return Ranking(ranked(scores), scores, time.perf_counter() - started, context.block_executions - executions)


def shortgpt_steps(context: ScoringContext, *, count: int) -> list[Step]:
    """ShortGPT's ``count`` blocks of lowest Block Influence, lowest first, as steps."""
    return shortgpt_ranking(context).steps(count)


class ShortGPT(OneShotMethod):
    name = "shortgpt"
    label = "ShortGPT"
    description = "ShortGPT: the blocks of lowest Block Influence, one shot"
    granularities = ("block",)
    supports_only = False
    objective = None
    selection = ONE_SHOT
    compare_entries = (CompareEntry("shortgpt", "ShortGPT", "block"),)

    def rank(self, request: Selecting) -> Ranking:
        return shortgpt_ranking(request.context)

    def plan_work(self, request: Selecting) -> float:
        return request.num_blocks  # one pass of the original model
