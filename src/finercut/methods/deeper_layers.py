"""Gromov et al.'s "deeper layers" (arXiv 2403.17887): remove the ``n`` consecutive blocks whose input and output
(residual states at the last token) are closest in angular distance. Unlike greedy removal, the best run of ``n``
blocks need not contain the best run of ``n - 1``, so each target is a selection of its own."""

from __future__ import annotations

import time

from finercut.candidates import BLOCK, Unit
from finercut.methods.base import PER_TARGET, CompareEntry, Method, Ranking, Selecting
from finercut.methods.residual import best_contiguous_run, residual_summary
from finercut.scoring import ScoringContext
from finercut.search import Step


def deeper_layers_steps(context: ScoringContext, *, count: int) -> list[Step]:
    """The ``count`` consecutive blocks whose input and output are closest, as steps; candidate scores are keyed
    by the run's first block and every step carries the run's distance."""
    started, executions = time.perf_counter(), context.block_executions
    _, last_tokens = residual_summary(context)
    start, distances = best_contiguous_run(last_tokens, count)
    scores = {Unit(s, BLOCK): d for s, d in enumerate(distances)}
    order = tuple(Unit(b, BLOCK) for b in range(start, start + count))
    steps = Ranking(order, scores, time.perf_counter() - started,
                    context.block_executions - executions).steps(count)
    return [Step(step.index, step.unit, distances[start], step.candidates, 0, step.block_executions, step.seconds)
            for step in steps]


class DeeperLayers(Method):
    name = "deeper_layers"
    label = "DeeperLayers"
    description = "Gromov et al.: the closest run of consecutive blocks (each target selected anew)"
    granularities = ("block",)
    supports_only = False
    objective = None
    selection = PER_TARGET
    compare_entries = (CompareEntry("deeper_layers", "DeeperLayers", "block"),)

    def select(self, request: Selecting) -> list[Step]:
        return deeper_layers_steps(request.context, count=request.target)

    def plan_work(self, request: Selecting) -> float:
        return request.num_blocks
