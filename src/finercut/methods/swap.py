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
from pathlib import Path

from finercut.candidates import Unit
from finercut.errors import ConfigError
from finercut.methods.base import DISTANCE, SEARCH, CompareEntry, Method, Selecting, option
from finercut.methods.setsearch import SearchRun, check_set_search, set_scorer, set_steps, window_of
from finercut.search import Step
from finercut.set_search import swap_search


@dataclass(frozen=True)
class SwapOptions:
    start: str | None = option(None, flag="--start", help="a run folder whose removals are the start set "
                                                          "(default: the greedy search's at the same count)")
    max_evaluations: int | None = option(None, flag="--max-evaluations", minimum=1,
                                         help="stop after this many set evaluations of the search itself (also "
                                              "evopress; default: none, swap stops at a local optimum)")


def read_start(folder: str, config) -> tuple[list[Unit], int]:
    """The removals of the run in ``folder`` (its ``record.json``) and its model's block count, checked against
    this run's granularity and ``only``: all that can be known before the model is loaded."""
    from finercut.jsonio import read_json

    path = Path(folder).expanduser()
    path = path / "record.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"--start {folder}: no record.json (give a finished run folder)")
    data = read_json(path, expect=dict, what="record")
    try:
        removed = [Unit.from_dict(entry) for entry in data["removed"]]
        granularity, only = data["granularity"], (data.get("config") or {}).get("only")
        blocks = int(data["model"]["num_blocks"])
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"--start {folder}: not a complete finercut record ({error})") from None
    if granularity != config.granularity or only != config.only:
        raise ConfigError(f"--start {folder}: its run removed {granularity} units{f' ({only} only)' if only else ''}, "
                          f"this one {config.granularity}{f' ({config.only} only)' if config.only else ''}")
    return removed, blocks


def start_units(folder: str, config, num_blocks: int) -> list[Unit]:
    """The removals of the run in ``folder``, checked against this run (:func:`read_start`), model size and count."""
    removed, blocks = read_start(folder, config)
    if blocks != num_blocks:
        raise ConfigError(f"--start {folder}: its model has {blocks} blocks, this one {num_blocks}")
    if len(removed) != config.target(num_blocks):
        raise ConfigError(f"--start {folder}: it removed {len(removed)} units, this run removes "
                          f"{config.target(num_blocks)}")
    return removed


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
        admits = window_of(request).admits
        if not admits(start):
            request.log("finercut: the start set does not obey this run's candidate window (--window-until, "
                        "--window-fraction); the swaps are not restricted by it")
            admits = _any_set
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


def _any_set(units) -> bool:
    return True


__all__ = ["Swap", "SwapOptions", "start_units"]
