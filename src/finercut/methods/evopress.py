"""EvoPress as a method: an evolutionary search over attention and FFN sub-layers to remove.

Sieberling et al., "EvoPress: Accurate Dynamic Model Compression via Evolutionary Search", ICML 2025 (arXiv
2410.14649). A seeded (1 + lambda) search: each generation draws ``--offspring`` children of the parent by
level-switch mutation (restore one removed unit and remove one kept unit of the same kind, so the counts per
kind stay), selects among them in steps on growing calibration budgets (every child on a sixteenth of the
samples, the best quarter of them on a quarter, the best of those on every sample against the parent, with the
exact early abort) and keeps that child when it beats the parent. Equal attention and FFN counts by default, as
EvoPress's depth pruning (an odd count gives attention the extra one); ``--free-counts`` lets a mutation switch
kinds. The fitness is the run's distance (EvoPress uses KL; any of finercut's metrics, or a task objective).

The search starts from greedy's set, or from a finished run's (``--start RUN``, which skips the greedy phase); when
the start's counts are not equal, it takes the first units of its order each kind has room for, then the deepest
of the kind still short. So with free counts the answer is never worse than greedy's (or the start run's). The
run's ``--seed`` seeds it: the same seed gives the same result, resumed or not.
"""

from __future__ import annotations

from dataclasses import dataclass

from finercut.errors import ConfigError
from finercut.methods.base import DISTANCE, SEARCH, CompareEntry, Method, Selecting, option
from finercut.methods.setsearch import (SearchRun, check_set_search, read_start, set_scorer, set_steps, start_admits,
                                        start_option, start_units)
from finercut.search import Step
from finercut.set_search import equal_quotas, evopress_search, kind_counts, meet_quotas


@dataclass(frozen=True)
class EvoPressOptions:
    generations: int = option(40, flag="--generations", minimum=0,
                              help="generations of the evolutionary search (its budget, with --max-evaluations)")
    offspring: int = option(8, flag="--offspring", minimum=1, help="children per generation (lambda)")
    max_evaluations: int | None = option(None, flag="--max-evaluations", minimum=1,
                                         help="stop once this many set evaluations are spent (default: no limit)")
    free_counts: bool = option(False, flag="--free-counts",
                               help="let mutations switch between attention and FFN (default: equal counts)")
    start: str | None = start_option()


class EvoPress(Method):
    name = "evopress"
    label = "EvoPress"
    description = ("EvoPress's evolutionary search over sub-layers (Sieberling et al., 2025), from greedy's set "
                   "(or --start RUN's)")
    objective = DISTANCE
    selection = SEARCH
    window = True
    scorer_options = True
    task_objective = True
    compare_entries = (CompareEntry("evopress", "EvoPress", "sublayer"),)
    options = EvoPressOptions

    def check(self, config) -> None:
        check_set_search(config)
        if config.options.start is not None:  # the start run is read before the model loads
            read_start(config.options.start, config)

    def select(self, request: Selecting) -> list[Step]:
        config, options = request.config, request.options
        scorer = set_scorer(request)
        run = SearchRun(request, "evopress")
        greedy_objective = None
        if options.start is not None:
            order = start_units(options.start, config, request.num_blocks)
        else:
            greedy = run.greedy(scorer)
            order, greedy_objective = greedy.best.order, greedy.best.distance
        admits = start_admits(request, order, "mutations")
        start = order
        if not options.free_counts:
            quotas = equal_quotas(request.units, request.target)
            if kind_counts(start) != quotas:
                try:
                    start = meet_quotas(order, request.units, quotas, admits)
                except ValueError:
                    raise ConfigError("no removal set with equal attention and FFN counts obeys the candidate "
                                      "window; pass --free-counts or widen the window") from None
        survivors = (max(1, options.offspring // 4), 1)
        result = evopress_search(
            scorer, units=request.units, start=start, admits=admits, generations=options.generations,
            offspring=options.offspring, survivors=survivors, seed=config.seed, same_kind=not options.free_counts,
            max_evaluations=options.max_evaluations,
            exhaustive=config.exhaustive, state=run.saved.get("evopress"),
            on_state=lambda state: run.save("search", "evopress", state), trace=run.trace)
        request.progress.write(f"evopress: distance {result.start_distance:.6g} -> {result.distance:.6g} after "
                               f"{run.trace.evaluations} evaluations")
        search = run.record(scorer, objective=result.distance, greedy_objective=greedy_objective,
                            start_objective=result.start_distance, accepted=result.accepted,
                            counts=kind_counts(result.units), start=options.start)
        request.extras["search"] = search
        return set_steps(result.units, result.distance, block_executions=search["block_executions"],
                         seconds=search["seconds"])


__all__ = ["EvoPress", "EvoPressOptions"]
