"""Shapley-value importance (the depth-pruning study, ../papers; :mod:`finercut.importance`): remove the units of
lowest Shapley value of the output distance, estimated by seeded permutation sampling, all at once. The values
and their standard errors go into the record (``importance``) and are reused when the run is extended."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from finercut.methods.base import DISTANCE, ONE_SHOT, CompareEntry, OneShotMethod, Ranking, Selecting, option


@dataclass(frozen=True)
class ShapleyOptions:
    permutations: int = option(10, flag="--permutations", minimum=1,
                               help="random orders of removal sampled (default 10)")
    truncation: float | None = option(None, flag="--truncation", minimum=0.0, below=1.0,
                                      help="stop a walk once its distance is within this fraction of removing "
                                           "everything (default: none)")


class Shapley(OneShotMethod):
    name = "shapley"
    label = "Shapley"
    description = "one shot by lowest Shapley value of the output distance"
    objective = DISTANCE
    selection = ONE_SHOT
    options = ShapleyOptions
    task_objective = True
    compare_entries = (CompareEntry("shapley", "Shapley (sub-layers)", "sublayer"),
                       CompareEntry("shapley_block", "Shapley (blocks)", "block"))

    def rank(self, request: Selecting) -> Ranking:
        from finercut.importance import shapley_importance

        context, options = request.context, request.options
        started, executions = time.perf_counter(), context.block_executions
        if request.objective is not None:  # the values of a task's answer likelihood (the study's adaptive values)
            from finercut.scoring.task import task_shapley

            estimate = task_shapley(context, request.objective.examples, request.units,
                                    permutations=options.permutations, seed=request.config.seed,
                                    truncation=options.truncation)
        else:
            estimate = shapley_importance(context.model, context.adapter, context.metric, context.batches,
                                          request.units, permutations=options.permutations, seed=request.config.seed,
                                          truncation=options.truncation)
        order = estimate.lowest(len(estimate.values))
        return Ranking(tuple(order), dict(estimate.values), time.perf_counter() - started,
                       context.block_executions - executions, {"importance": estimate.to_dict()})

    def plan_work(self, request: Selecting) -> float:
        """Every walk replays the blocks from each removed unit on (truncation can only shorten it)."""
        units = request.units
        walk = sum(request.num_blocks - unit.block for unit in units)
        return request.options.permutations * walk + (request.num_blocks if request.options.truncation else 0)

    def describe(self, record: Any) -> list[str]:
        importance = record.extras.get("importance")
        return [shapley_line(importance, len(record.steps))] if importance else []


def shapley_line(importance: dict, removed: int) -> str:
    """How a Shapley run's values were estimated and whether their 95% intervals rank the removed units apart
    from the kept ones."""
    from finercut.importance import ShapleyEstimate

    estimate = ShapleyEstimate.from_dict(importance)
    line = (f"Shapley values: {estimate.permutations} permutations (seed {estimate.seed}"
            + (f", truncation {estimate.truncation:g}" if estimate.truncation is not None else "")
            + f"), {estimate.evaluations} coalition evaluations; ")
    bounds = estimate.separation(removed)
    if bounds is None:
        return line + "no standard errors (a single permutation) to rank the removed units by"
    apart = bounds[0] < bounds[1]
    return line + (f"the 95% intervals {'rank' if apart else 'do not rank'} the {removed} removed units apart from "
                   f"the rest (highest upper bound among them {bounds[0]:.4g}, lowest lower bound among the rest "
                   f"{bounds[1]:.4g})")
