"""What the searches over whole removal sets share as methods (beam, swap, EvoPress): the exact set scorer of a
run, greedy's answer as their start and safety net, the saved state of an interrupted run, and the record of
the search (evaluations, the objective after each improvement, time).

Their state is saved as they go (:data:`finercut.methods.base.SEARCH`): ``{"target", "phase", "greedy",
"search", "trace"}``; a resumed run continues the phase it was in, from its last saved state, to the same record
as an uninterrupted run (timings aside). The greedy phase is the beam search of width 1 on the same scorer:
FinerCut's greedy search, removal for removal and distance for distance.

The searches are methods, not an option of FinerCut's: what the run pipeline does around a method (resume from
finished steps, extension, ``apply --count`` of a prefix, ``compare`` pruning once at the largest ratio) follows
from its selection kind, and a search over whole sets is not greedy's (:data:`~finercut.methods.base.SEARCH`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from finercut.candidates import Unit
from finercut.errors import ConfigError
from finercut.methods.base import Selecting, option
from finercut.search import Step
from finercut.set_search import BeamResult, SearchTrace, Window, beam_search, make_window, sorted_units


def set_scorer(request: Selecting) -> Any:
    """The run's exact set scorer: the output distance by its metric, or its task objective."""
    from finercut.scoring.sets import SetScorer

    config = request.config
    objective = None
    if request.objective is not None:
        from finercut.scoring.task import TaskObjective

        objective = TaskObjective(request.context, request.objective.examples)
    scorer = SetScorer(request.context, objective=objective, state_bytes=int(config.replay_memory_gb * 2**30))
    from finercut.scoring import describe_scoring

    request.extras["scoring"] = {
        **describe_scoring(request.context, scorer="fast", exhaustive=config.exhaustive, objective=config.objective,
                           replay_state_bytes=scorer.state_bytes),
        "subset_bound_tokens": scorer.subset.tokens if scorer.subset is not None and not config.exhaustive else 0,
        "set_scorer": True}
    return scorer


def check_set_search(config: Any) -> None:
    if config.scorer != "fast":
        raise ConfigError(f"method {config.method} scores whole removal sets with the fast scorer (exact, tested "
                          "against the naive one); leave --scorer unset")


def window_of(request: Selecting) -> Window:
    config = request.config
    return make_window(request.units, config.window_until_ratio, config.first_candidate_block(request.num_blocks))


def start_option() -> Any:
    """The ``--start RUN`` option field that swap and EvoPress share."""
    return option(None, flag="--start", help="start from this finished run's removal set instead of running the "
                                             "greedy search first (default: greedy's set at the same count)")


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


def start_admits(request: Selecting, start: Sequence[Unit], moves: str) -> Callable[[Sequence[Unit]], bool]:
    """The sets a search from ``start`` may visit: those the run's candidate window admits, or, when the start
    set itself (a ``--start`` run's) does not obey the window, every set, said in the log."""
    admits = window_of(request).admits
    if admits(start):
        return admits
    request.log("finercut: the start set does not obey this run's candidate window (--window-until, "
                f"--window-fraction); the {moves} are not restricted by it")
    return _any_set


def _any_set(units: Sequence[Unit]) -> bool:
    return True


class SearchRun:
    """One search method's run: the saved state it resumes from and saves to, the shared trace."""

    def __init__(self, request: Selecting, kind: str) -> None:
        self.request = request
        self.kind = kind
        saved = request.saved or {}
        if saved.get("kind") != kind or saved.get("target") != request.target:
            if saved:
                request.log(f"finercut: the saved {saved.get('kind')} state is for another target; the search "
                            "restarts")
            saved = {}
        self.saved = saved
        self.trace = SearchTrace.from_state(kind, saved.get("trace"))
        self.started = time.perf_counter()
        self.executions_at_start = request.context.block_executions
        if saved:
            request.log(f"finercut: resuming the {kind} search from its saved state ({self.trace.evaluations} "
                        "evaluations done)")

    def save(self, phase: str, key: str, state: dict, **more: Any) -> None:
        self.saved = {**self.saved, "kind": self.kind, "target": self.request.target, "phase": phase, key: state,
                      "trace": self.trace.to_state(), **more}
        self.request.save_state(self.saved)

    def greedy(self, scorer: Any) -> BeamResult:
        """Greedy's answer (the beam of width 1 on the set scorer), from the saved greedy phase if any."""
        request, config = self.request, self.request.config
        if self.saved.get("greedy_result"):
            from finercut.set_search import BeamEntry

            entry = BeamEntry.from_state(self.saved["greedy_result"])
            return BeamResult(entry, entry, [entry], self.trace)
        progress = request.progress

        def on_step(size: int, kept: list) -> None:
            progress.write(f"greedy step {size + 1}/{request.target}: distance {kept[0].distance:.6g}")

        result = beam_search(
            scorer, units=request.units, target=request.target, width=1,
            window_until_ratio=config.window_until_ratio,
            window_first_block=config.first_candidate_block(request.num_blocks), exhaustive=config.exhaustive,
            state=self.saved.get("greedy"), on_state=lambda state: self.save("greedy", "greedy", state),
            on_step=on_step, trace=self.trace)
        self.save("search", "greedy_result", result.best.to_state())
        return result

    def record(self, scorer: Any, *, objective: float, greedy_objective: float | None, start_objective: float | None,
               **more: Any) -> dict:
        return {
            "kind": self.kind, "objective": objective, "greedy_objective": greedy_objective,
            "start_objective": start_objective, "evaluations": self.trace.evaluations,
            "improvements": list(self.trace.improvements), "seconds": self.trace.seconds,
            "block_executions": self.request.context.block_executions - self.executions_at_start,
            "num_blocks": self.request.num_blocks, **more,
        }


def set_steps(units: Sequence[Unit], distance: float, *, block_executions: int, seconds: float) -> list[Step]:
    """A whole set as steps in search order: no unit was removed on top of the others, so only the last step
    carries a score, the distance of the whole set; the work is booked on the first step."""
    ordered = sorted_units(units)
    return [Step(index=k, unit=unit, distance=distance if k == len(ordered) - 1 else None, candidates=(),
                 window_first_block=0, block_executions=block_executions if k == 0 else 0,
                 seconds=seconds if k == 0 else 0.0) for k, unit in enumerate(ordered)]


def search_lines(search: dict) -> list[str]:
    """What ``finercut show`` prints about a record's search."""
    lines = []
    objective, greedy = search.get("objective"), search.get("greedy_objective")
    text = f"search: {search.get('kind')}, objective {objective:.6g}"
    start, start_objective = search.get("start"), search.get("start_objective")
    if greedy:
        text += f" (greedy {greedy:.6g}, {objective / greedy - 1:+.2%})"
    elif start and start_objective:
        text += f" (from {start}'s set, {start_objective:.6g}: {objective / start_objective - 1:+.2%})"
    ffe = (search.get("block_executions") or 0) / max(1, int(search.get("num_blocks") or 1))
    text += (f"; {search.get('evaluations')} evaluations, {ffe:.1f} full-forward equivalents, "
             f"{search.get('seconds', 0.0):.1f} s")
    lines.append(text)
    improvements = search.get("improvements") or []
    if improvements:
        shown = [f"{point['evaluations']}: {point['objective']:.6g} ({point.get('seconds', 0.0):.1f} s)"
                 for point in improvements]
        if len(shown) > 8:
            shown = shown[:3] + [f"... {len(shown) - 7} more ..."] + shown[-4:]
        lines.append(f"  objective after each of {len(improvements)} improvements (evaluations: objective, "
                     "seconds): " + ", ".join(shown))
    return lines


Callback = Callable[..., None]
