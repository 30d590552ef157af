"""What a pruning method is, in one place: the facts the run pipeline, the command line, ``compare`` and ``show``
read, and the one entry (:meth:`Method.select`) that chooses the units to remove.

A method declares

* the granularities it supports (the first is its default) and whether ``only`` (one kind of sub-layer) applies;
* its objective: an output distance to the original model (``metric`` is one of the distances), a perplexity
  (``metric`` is ``ppl``) or none;
* how it selects (:data:`SELECTIONS`): greedy steps (a run resumes and extends step by step), one shot (it ranks
  every unit at once, any count is a prefix of the ranking, and a saved ranking is reused), or per target (each
  count is its own selection: a run is not extended);
* whether cost targets and the paper's candidate window apply, and whether the greedy scorers' options do;
* its own options, a small frozen dataclass whose fields carry their command-line flag (:func:`option`);
* the entries it adds to ``finercut compare`` and the lines it adds to ``finercut show``.

Everything a method receives is in :class:`Selecting`; the pipeline (:mod:`finercut.run`) builds it and never
asks a method's name what it is.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from finercut.candidates import Unit, all_units
from finercut.errors import ConfigError
from finercut.search import Budget, Step

if TYPE_CHECKING:
    from finercut.progress import WorkProgress
    from finercut.scoring import ScoringContext

GREEDY = "greedy"
"""One unit per step on top of the steps before: finished steps are kept, a run resumes and extends from them."""
ONE_SHOT = "one_shot"
"""Every unit ranked at once: any count is a prefix of the ranking, which a resumed or extended run reuses."""
PER_TARGET = "per_target"
"""Each count is its own selection (the best n need not contain the best n - 1): a run cannot be extended."""
SEARCH = "search"
"""A search over whole removal sets (beam, swap, evolution): its state is saved as it goes and a resumed run
continues from it; the answer for n units need not be a prefix of the answer for more."""
SELECTIONS = (GREEDY, ONE_SHOT, PER_TARGET, SEARCH)

DISTANCE = "distance"
"""Scores by an output distance to the original model: ``metric`` names it (js, angular, ...)."""
PERPLEXITY = "perplexity"
"""Scores by the calibration perplexity of the pruned model: ``metric`` is ``ppl``."""
PERPLEXITY_METRIC = "ppl"


# ---------------------------------------------------------------------------------------------------------------------
# A method's own options


def option(default: Any, *, flag: str, help: str, minimum: float | None = None, below: float | None = None) -> Any:
    """A field of a method's options dataclass, with its command-line flag, help and bounds (``minimum <= value``,
    ``value < below``; None: unbounded), checked by :func:`check_options`."""
    return field(default=default, metadata={"flag": flag, "help": help, "minimum": minimum, "below": below})


@dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none of its own."""


def option_fields(options_class: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(options_class))


def option_type(options_class: type, name: str) -> type:
    """The plain type of an option (``int``, ``float``, ``str`` or ``bool``; ``X | None`` gives ``X``)."""
    hint = typing.get_type_hints(options_class)[name]
    choices = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    return choices[0]


def check_options(options: Any, method: str) -> None:
    """Type and bounds of every option, as one-line :class:`ConfigError`."""
    for spec in option_fields(type(options)):
        value = getattr(options, spec.name)
        if value is None:
            continue
        kind = option_type(type(options), spec.name)
        flag = spec.metadata.get("flag", spec.name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            object.__setattr__(options, spec.name, value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{method} option {flag} must be {kind.__name__}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"{method} option {flag} must be a finite number, got {value}")
        minimum, below = spec.metadata.get("minimum"), spec.metadata.get("below")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{method} option {flag} must be at least {minimum:g}, got {value}")
        if below is not None and not value < below:
            raise ConfigError(f"{method} option {flag} must be below {below:g}, got {value}")


def options_from_dict(options_class: type, data: dict | None, method: str) -> Any:
    """The options dataclass from a dict (``run.json``), refusing keys the method does not have."""
    data = dict(data or {})
    known = {spec.name for spec in option_fields(options_class)}
    unknown = sorted(set(data) - known)
    if unknown:
        flags = ", ".join(spec.metadata.get("flag", spec.name) for spec in option_fields(options_class)) or "none"
        raise ConfigError(f"method {method} has no option(s) {', '.join(unknown)}; its options: {flags}")
    options = options_class(**data)
    check_options(options, method)
    return options


# ---------------------------------------------------------------------------------------------------------------------
# What a method receives


@dataclass
class Selecting:
    """One call of :meth:`Method.select`: what to select from, what to continue, and where to report.

    ``completed`` holds the finished steps of an interrupted or shorter run (greedy methods continue after them;
    others receive none), ``saved`` what the method saved of an earlier run with :attr:`save_state` (one-shot
    methods: their ranking). ``extras`` receives what the method adds to the record (e.g. ``scoring``,
    ``importance``).
    """

    context: "ScoringContext"
    config: Any
    """The run's :class:`finercut.record.RunConfig` (``config.options`` are this method's)."""
    num_blocks: int
    target: int | None
    """Units to have removed at the end; None with a cost ``budget``."""
    budget: Budget | None = None
    completed: Sequence[Step] = ()
    saved: dict | None = None
    on_step: Callable[[Step], None] | None = None
    save_state: Callable[[dict], None] = lambda state: None
    progress: "WorkProgress | None" = None
    extras: dict = field(default_factory=dict)
    log: Callable[[str], None] = lambda message: None
    objective: Any = None
    """With a task objective: the :class:`finercut.scoring.task.TaskExamples` the context was built from."""

    @property
    def units(self) -> list[Unit]:
        """Every candidate unit of the run (its granularity and ``only``), in search order."""
        return all_units(self.num_blocks, self.config.granularity, self.config.only)

    @property
    def options(self) -> Any:
        return self.config.options


# ---------------------------------------------------------------------------------------------------------------------
# A method


@dataclass(frozen=True)
class CompareEntry:
    """One row family of ``finercut compare --methods``: a method at a granularity (and ``only``).

    A ``primary`` entry is the method's headline: ``compare`` adds its recovered rows (``--recover``), its rows at
    the block methods' sub-layer count (``--equal-budget``) and its layer maps to the report.
    """

    name: str
    label: str
    granularity: str
    only: str | None = None
    primary: bool = False


class Method:
    """A pruning method. Subclasses set the class attributes and implement :meth:`select`."""

    name: ClassVar[str]
    label: ClassVar[str]
    description: ClassVar[str]
    """One line for ``--method``'s help."""
    granularities: ClassVar[tuple[str, ...]] = ("sublayer", "block")
    supports_only: ClassVar[bool] = True
    objective: ClassVar[str | None] = DISTANCE
    selection: ClassVar[str] = GREEDY
    cost_targets: ClassVar[bool] = False
    window: ClassVar[bool] = False
    """The paper's candidate window (``window_until_ratio`` ...) restricts the candidates."""
    scorer_options: ClassVar[bool] = False
    """``scorer``, ``exhaustive`` and ``replay_memory_gb`` (the greedy scorers') apply."""
    options: ClassVar[type] = NoOptions
    compare_entries: ClassVar[tuple[CompareEntry, ...]] = ()
    metric_alias: ClassVar[str | None] = None
    """A ``metric`` value that selects this method (BlockPruner: ``ppl``)."""
    task_objective: ClassVar[bool] = False
    """It can score by a task's answer likelihood (``--objective task:NAME``) instead of its own objective."""

    @property
    def prefix_consistent(self) -> bool:
        """Whether the run for n units holds the one for fewer as its prefix (``apply --count`` takes a shorter
        run; ``compare`` prunes once, to the largest ratio)."""
        return self.selection in (GREEDY, ONE_SHOT)

    @property
    def extendable(self) -> bool:
        """Whether a run folder may take a larger target (reusing what the method kept) instead of a new folder."""
        return self.selection != PER_TARGET

    def check(self, config: Any) -> None:
        """Refuse settings this method cannot run with (beyond what its declarations already check)."""

    def select(self, request: Selecting) -> list[Step]:
        """The units to remove, as steps in removal order (``completed`` included for greedy methods)."""
        raise NotImplementedError

    def plan_work(self, request: Selecting) -> float | None:
        """Block executions over the calibration set this selection will need, for the progress bar (None:
        unknown)."""
        return None

    def describe(self, record: Any) -> list[str]:
        """Lines ``finercut show`` adds for a record of this method."""
        return []

    def __repr__(self) -> str:
        return f"<method {self.name}>"


# ---------------------------------------------------------------------------------------------------------------------
# One-shot methods: a ranking of every unit, any count a prefix of it


@dataclass(frozen=True)
class Ranking:
    """Every candidate unit ranked once: ``order`` (removal order), ``scores`` (per unit, None if it has none),
    the work it cost and what the method adds to the record."""

    order: tuple[Unit, ...]
    scores: dict[Unit, float | None]
    seconds: float
    block_executions: int
    extras: dict = field(default_factory=dict)

    def steps(self, count: int) -> list[Step]:
        """The first ``count`` units as steps; every step carries all scores, the costs are booked on step 0."""
        candidates = tuple(self.scores.items())
        return [
            Step(index=k, unit=unit, distance=self.scores.get(unit), candidates=candidates, window_first_block=0,
                 block_executions=self.block_executions if k == 0 else 0, seconds=self.seconds if k == 0 else 0.0)
            for k, unit in enumerate(self.order[:count])
        ]

    def to_dict(self) -> dict:
        return {"order": [unit.to_dict() for unit in self.order],
                "scores": [{**unit.to_dict(), "score": score} for unit, score in self.scores.items()],
                "seconds": self.seconds, "block_executions": self.block_executions, "extras": self.extras}

    @classmethod
    def from_dict(cls, data: dict) -> "Ranking":
        return cls(tuple(Unit.from_dict(entry) for entry in data["order"]),
                   {Unit.from_dict(entry): entry["score"] for entry in data["scores"]},
                   float(data["seconds"]), int(data["block_executions"]), dict(data.get("extras") or {}))


class OneShotMethod(Method):
    """A method that ranks every unit at once (:meth:`rank`); a saved ranking is reused, never recomputed."""

    selection = ONE_SHOT

    def rank(self, request: Selecting) -> Ranking:
        raise NotImplementedError

    def select(self, request: Selecting) -> list[Step]:
        ranking = None
        if request.saved and request.saved.get("ranking"):
            ranking = Ranking.from_dict(request.saved["ranking"])
            if set(ranking.order) != set(request.units):
                ranking = None  # another candidate set (cannot happen for a matching run.json): rank anew
        if ranking is None:
            ranking = self.rank(request)
            request.save_state({"ranking": ranking.to_dict()})
        else:
            request.log(f"finercut: reusing the saved {self.label} ranking of every unit (no new evaluations)")
        request.extras.update(ranking.extras)
        return ranking.steps(request.target)


def ranked(scores: dict[Unit, float]) -> tuple[Unit, ...]:
    """Units by ascending score, exact ties to the earlier unit in search order."""
    return tuple(sorted(scores, key=lambda unit: (scores[unit], unit.sort_key)))
