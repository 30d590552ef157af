"""Beam search over removal sets: FinerCut's greedy search keeping the ``--beam-width`` best sets of each size.

Each step extends every kept set by every candidate the greedy step would have (the paper's candidate window,
granularity and ``--only`` as in FinerCut) and keeps the W best distinct sets by their exact distance
(:func:`finercut.set_search.beam_search` on :class:`finercut.scoring.sets.SetScorer`: prefix replay from each
kept set's own states, exact early abort against the W-th best distance of the step). Greedy's path is kept
too, so the answer is never worse than greedy's; width 1 is FinerCut's greedy search, record for record.
"""

from __future__ import annotations

from dataclasses import dataclass

from finercut.methods.base import DISTANCE, SEARCH, CompareEntry, Method, Selecting, option
from finercut.methods.setsearch import SearchRun, check_set_search, search_lines, set_scorer
from finercut.search import Step
from finercut.set_search import beam_search


@dataclass(frozen=True)
class BeamOptions:
    width: int = option(2, flag="--beam-width", minimum=1, help="sets kept per size (1: the greedy search)")


class Beam(Method):
    name = "beam"
    label = "Beam search"
    description = "beam search over removal sets by output distance (--beam-width W; 1 = FinerCut's greedy)"
    objective = DISTANCE
    selection = SEARCH
    window = True
    scorer_options = True
    task_objective = True
    compare_entries = (CompareEntry("beam", "Beam search", "sublayer"),)
    options = BeamOptions

    def check(self, config) -> None:
        check_set_search(config)

    def select(self, request: Selecting) -> list[Step]:
        config, progress = request.config, request.progress
        scorer = set_scorer(request)
        run = SearchRun(request, "beam")

        def on_step(size: int, kept: list) -> None:
            progress.write(f"beam step {size + 1}/{request.target}: best distance {kept[0].distance:.6g} "
                           f"({len(kept)} sets kept)")

        result = beam_search(
            scorer, units=request.units, target=request.target, width=request.options.width,
            window_until_ratio=config.window_until_ratio,
            window_first_block=config.first_candidate_block(request.num_blocks), exhaustive=config.exhaustive,
            state=run.saved.get("beam"), on_state=lambda state: run.save("beam", "beam", state), on_step=on_step,
            trace=run.trace)
        request.extras["search"] = run.record(scorer, objective=result.best.distance,
                                              greedy_objective=result.greedy.distance, start_objective=None,
                                              width=request.options.width)
        return list(result.best.steps)

    def describe(self, record) -> list[str]:
        return [] if record.search else [f"beam width {record.config.options.width}"]


__all__ = ["Beam", "BeamOptions", "search_lines"]
