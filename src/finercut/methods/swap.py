"""Swap: local search over removal sets from greedy's answer (or a run's, ``--start RUN``).

From the start set, restore one removed unit and remove one kept unit whenever that lowers the exact distance of
the whole set, until no swap does or ``--max-evaluations`` are spent (:func:`finercut.set_search.swap_search`).
First improvement, not best improvement: a swap is accepted as soon as it is found, so the search moves after a
few cheap evaluations instead of scoring every pair of a neighbourhood (k x (n - k) sets) per move; the pairs are
tried cheapest replay first, and each is scored against the current set's distance with the exact early abort, so
hopeless swaps stop after a sample or two. The sets stay admissible for the paper's candidate window (some
removal order obeys it). The answer is never worse than the start set: it only moves to strictly better sets.
"""

from __future__ import annotations

from dataclasses import dataclass

from finercut.methods.base import DISTANCE, SEARCH, CompareEntry, Method, Selecting, option
from finercut.methods.setsearch import (SearchRun, check_set_search, read_start, set_scorer, set_steps, start_admits,
                                        start_option, start_units)
from finercut.search import Step
from finercut.set_search import swap_search


@dataclass(frozen=True)
class SwapOptions:
    start: str | None = start_option()
    max_evaluations: int | None = option(None, flag="--max-evaluations", minimum=1,
                                         help="stop after this many set evaluations of the search itself "
                                              "(default: none; swap stops at a local optimum)")


class Swap(Method):
    name = "swap"
    label = "Swap search"
    description = "local search by single swaps from greedy's removal set (or --start RUN's)"
    objective = DISTANCE
    selection = SEARCH
    window = True
    scorer_options = True
    task_objective = True
    compare_entries = (CompareEntry("swap", "Swap search", "sublayer"),)
    options = SwapOptions

    def check(self, config) -> None:
        check_set_search(config)
        if config.options.start is not None:  # the start run is read before the model loads
            read_start(config.options.start, config)

    def select(self, request: Selecting) -> list[Step]:
        config = request.config
        scorer = set_scorer(request)
        run = SearchRun(request, "swap")
        greedy_objective = None
        if config.options.start is not None:
            start = start_units(config.options.start, config, request.num_blocks)
        else:
            greedy = run.greedy(scorer)
            start, greedy_objective = greedy.best.order, greedy.best.distance
        admits = start_admits(request, start, "swaps")
        result = swap_search(
            scorer, units=request.units, start=start, admits=admits,
            max_evaluations=config.options.max_evaluations, exhaustive=config.exhaustive,
            state=run.saved.get("swap"), on_state=lambda state: run.save("search", "swap", state), trace=run.trace)
        request.progress.write(f"swap: distance {result.start_distance:.6g} -> {result.distance:.6g} after "
                               f"{result.accepted} accepted swaps, {run.trace.evaluations} evaluations")
        search = run.record(scorer, objective=result.distance, greedy_objective=greedy_objective,
                            start_objective=result.start_distance, accepted=result.accepted,
                            start=config.options.start)
        request.extras["search"] = search
        return set_steps(result.units, result.distance, block_executions=search["block_executions"],
                         seconds=search["seconds"])


__all__ = ["Swap", "SwapOptions"]
