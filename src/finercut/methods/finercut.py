"""FinerCut (Zhang et al., arXiv 2405.18218, Algorithm 1): the greedy search by output distance.

Each step removes the candidate whose removal moves the pruned model's next-token distribution least from the
original model's (``metric``: js, angular, euclidean, js_official), on the fast scorer (prefix-cached replay, replay
states kept across steps, exact early abort) or the naive one; the paper's candidate window restricts the
candidates to the last blocks while few are removed. Under a cost target each step removes the least distance
per cost saved instead (:mod:`finercut.budgets`).
"""

from __future__ import annotations

from finercut.methods.base import DISTANCE, GREEDY, CompareEntry, Method, Selecting
from finercut.methods.greedy import run_greedy, scorer_options
from finercut.scoring import SCORERS, describe_scoring
from finercut.search import Step


class FinerCut(Method):
    name = "finercut"
    label = "FinerCut"
    description = "FinerCut's greedy search by output distance (default)"
    objective = DISTANCE
    selection = GREEDY
    cost_targets = True
    window = True
    scorer_options = True
    task_objective = True
    compare_entries = (
        CompareEntry("finercut", "FinerCut", "sublayer", primary=True),
        CompareEntry("finercut_block", "FinerCut (block-level)", "block"),
        CompareEntry("finercut_attention", "FinerCut (attention only)", "sublayer", "attention"),
        CompareEntry("finercut_ffn", "FinerCut (FFN only)", "sublayer", "ffn"),
    )

    def select(self, request: Selecting) -> list[Step]:
        config = request.config
        options = scorer_options(config)
        if request.objective is not None:  # a task's answer likelihood instead of the output distance
            from finercut.scoring.task import task_scorer

            scorer = task_scorer(request.context, request.objective.examples, scorer=config.scorer,
                                 exhaustive=config.exhaustive, **options)
        else:
            scorer = SCORERS[config.scorer](request.context, exhaustive=config.exhaustive, **options)
        request.extras["scoring"] = describe_scoring(request.context, scorer=config.scorer,
                                                     exhaustive=config.exhaustive, objective=config.objective,
                                                     **options)
        return run_greedy(request, scorer, window_first_block=config.first_candidate_block(request.num_blocks))
