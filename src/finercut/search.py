"""FinerCut's iterative search (paper Algorithm 1).

Start from the full model; at each step score every remaining candidate by how far removing it (on top of what
is already removed) moves the output from the original model's, and remove the one that moves it least. How a
candidate is scored (prefix cache, early abort, full forwards) is the scorer's business, see
:mod:`finercut.scoring`: a scorer may stop scoring a candidate once a lower bound of its distance exceeds the
best complete distance of the step, so such a candidate carries its bound instead of its distance.

Under a cost target (:mod:`finercut.budgets`) each step removes instead the candidate of least distance per
unit of cost saved, until the model costs at most the target fraction of the dense model; the scorer is told
the savings, so that it aborts a candidate only when its bound per cost exceeds the best complete distance per
cost (exact, as in the plain rule). The paper's candidate window still counts units removed (it depends only on
the removals so far, so a run for a larger fraction stays a prefix of one for a smaller fraction).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

from finercut.budgets import CostModel, check_fraction, select_least_per_cost, target_met
from finercut.candidates import Unit, all_units, select_least, step_candidates
from finercut.distances import NonFiniteOutputError
from finercut.errors import ConfigError


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's result in a step: its full distance, or (aborted) a lower bound of it.

    Unpacks as ``unit, distance`` (``distance`` is None for an aborted candidate).
    """

    unit: Unit
    distance: float | None
    """Mean distance over every calibration position; None if scoring stopped early."""
    lower_bound: float | None = None
    """Aborted: the partial sum over the samples seen, divided by all positions (<= the distance)."""
    samples: int | None = None
    """Calibration samples evaluated (None in records written before this was counted)."""
    batch_sums: tuple[float, ...] | None = None
    """A complete candidate's distance summed per calibration batch (the fast scorer scores the next step's
    samples in the order these suggest); None where not kept."""
    subset_samples: int | None = None
    """Aborted with vocabulary-subset bounds: samples it was only bounded on (their blocks ran, the full head
    did not), beyond the ``samples`` scored exactly; their bounds are part of ``lower_bound``."""

    @property
    def aborted(self) -> bool:
        return self.distance is None and self.lower_bound is not None

    @property
    def value(self) -> float | None:
        """The distance, or the lower bound of an aborted candidate (what orders the next step's candidates)."""
        return self.distance if self.distance is not None else self.lower_bound

    def __iter__(self) -> Iterator:  # ``unit, distance = score``, as before aborted candidates existed
        yield self.unit
        yield self.distance

    def to_dict(self) -> dict:
        data = {**self.unit.to_dict(), "distance": self.distance}
        if self.aborted:
            data["lower_bound"] = self.lower_bound
        if self.samples is not None:
            data["samples"] = self.samples
        if self.batch_sums is not None:
            data["batch_sums"] = list(self.batch_sums)
        if self.subset_samples is not None:
            data["subset_samples"] = self.subset_samples
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CandidateScore":
        samples, sums, bounded = data.get("samples"), data.get("batch_sums"), data.get("subset_samples")
        return cls(Unit.from_dict(data), _optional_float(data["distance"]), _optional_float(data.get("lower_bound")),
                   None if samples is None else int(samples), None if sums is None else tuple(map(float, sums)),
                   None if bounded is None else int(bounded))


def _as_score(entry: CandidateScore | tuple) -> CandidateScore:
    return entry if isinstance(entry, CandidateScore) else CandidateScore(*entry)


@dataclass(frozen=True)
class Step:
    """One finished step of the search."""

    index: int
    unit: Unit
    distance: float | None
    """The selected unit's score (None for random removal)."""
    candidates: tuple[CandidateScore, ...]
    """Every candidate's score this step, in search order (``(unit, distance)`` pairs are converted)."""
    window_first_block: int
    block_executions: int
    seconds: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(_as_score(entry) for entry in self.candidates))

    @property
    def samples_evaluated(self) -> int | None:
        """Calibration samples evaluated over all candidates (None if not counted)."""
        counts = [c.samples for c in self.candidates]
        return None if any(n is None for n in counts) else sum(counts)

    def to_dict(self) -> dict:
        return {
            "step": self.index,
            "removed": self.unit.to_dict(),
            "distance": self.distance,
            "window_first_block": self.window_first_block,
            "block_executions": self.block_executions,
            "seconds": self.seconds,
            "samples_evaluated": self.samples_evaluated,
            "aborted": sum(c.aborted for c in self.candidates),
            "candidates": [candidate.to_dict() for candidate in self.candidates],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Step":
        return cls(
            index=int(data["step"]),
            unit=Unit.from_dict(data["removed"]),
            distance=_optional_float(data["distance"]),
            candidates=tuple(CandidateScore.from_dict(c) for c in data["candidates"]),
            window_first_block=int(data["window_first_block"]),
            block_executions=int(data["block_executions"]),
            seconds=float(data["seconds"]),
        )


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


class Scorer(Protocol):
    block_executions: int

    def restore(self, removed: Sequence[Unit]) -> None:
        """Prepare to continue after ``removed`` (resuming) as if the steps had just run."""

    def score(
        self, removed: Sequence[Unit], candidates: Sequence[Unit], *, previous: Sequence[CandidateScore] = (),
        on_candidate: Callable[[Unit, float], None] | None = None, savings: Callable[[Unit], float] | None = None,
    ) -> list[CandidateScore]:
        """Score ``candidates`` given ``removed``: every candidate completely, or at least the one
        :func:`select_least` picks among the complete ones, the others with a lower bound above its distance
        (or equal to it with a later unit order). The result is in the order of ``candidates``; ``previous``
        (the last step's scores) may guide the order of the work, never its result. With ``savings`` (a cost
        target, passed only then) the same holds for :func:`finercut.budgets.select_least_per_cost`, bounds and
        distances divided by each candidate's saving."""


@dataclass(frozen=True)
class Budget:
    """A cost target: stop once the model costs at most ``fraction`` of the dense model under ``cost``."""

    cost: CostModel
    fraction: float

    def __post_init__(self) -> None:
        check_fraction(self.fraction)

    def met(self, removed: Sequence[Unit]) -> bool:
        return target_met(self.cost.remaining(removed), self.cost.dense_total, self.fraction)

    def check_reachable(self, units: Sequence[Unit]) -> None:
        """Raise ConfigError if even the best removal of all candidates but one leaves more than the target.

        Removing every candidate leaves no model (a count target refuses that too), so the cheapest-saving unit
        is kept; a greedy path that still needs the last unit is refused at that step (:func:`greedy_search`).
        """
        floor = self.cost.remaining(units)
        if not target_met(floor, self.cost.dense_total, self.fraction):
            raise ConfigError(f"a {self.cost.measure} target of {self.fraction:.1%} cannot be met: removing every "
                              f"candidate leaves {floor / self.cost.dense_total:.1%} of the dense model")
        kept = min(units, key=self.cost.saving)
        if not target_met(floor + self.cost.saving(kept), self.cost.dense_total, self.fraction):
            raise ConfigError(f"a {self.cost.measure} target of {self.fraction:.1%} needs every candidate removed, "
                              "which leaves no model (all but one leave "
                              f"{(floor + self.cost.saving(kept)) / self.cost.dense_total:.1%})")

    def steps_to_meet(self, removed: Sequence[Unit]) -> int | None:
        """The number of leading removals after which the target is first met (0: already), None if never."""
        for count in range(len(removed) + 1):
            if self.met(removed[:count]):
                return count
        return None


def greedy_search(
    scorer: Scorer, *, num_blocks: int, granularity: str, target: int | None = None, window_until_ratio: float,
    window_first_block: int, completed: Sequence[Step] = (), on_step: Callable[[Step], None] | None = None,
    on_candidate: Callable[[Unit, float], None] | None = None, only: str | None = None,
    budget: Budget | None = None,
) -> list[Step]:
    """Remove ``target`` units one at a time, each the one whose removal moves the output least; or, with a
    ``budget``, the one of least distance per cost saved until the budget is met.

    ``only`` (``"attention"`` / ``"ffn"``) restricts the candidates to one kind of sub-layer.

    Args:
        scorer: scores candidates given what is already removed.
        num_blocks: decoder blocks L of the model.
        granularity: ``"sublayer"`` (2L candidates) or ``"block"`` (L candidates).
        target: total units to have removed at the end (exactly one of ``target`` and ``budget``).
        budget: a cost target. Units that save nothing under it are never candidates; each step selects
            :func:`finercut.budgets.select_least_per_cost` and the search stops at the first step after which
            :meth:`Budget.met`. The window below still counts units; the same as
            :func:`finercut.budgets.cost_aware_greedy` when the window is off (``window_first_block=0``).
        window_until_ratio: while at most this fraction of units is removed, only blocks from
            ``window_first_block`` on are candidates (paper: 0.4 and ceil(0.4 L)).
        completed: steps already done (resuming); they are not evaluated again.
        on_step: called after every step, e.g. to save progress.
        on_candidate: called after every scored candidate with its distance (or its bound, if aborted), e.g. for
            a progress bar.

    Returns:
        All steps, ``completed`` included, in order.
    """
    if (target is None) == (budget is None):
        raise ValueError("give exactly one of target and budget")
    units = all_units(num_blocks, granularity, only)
    steps = list(completed)
    removed = [step.unit for step in steps]
    if budget is not None:
        budget.check_reachable(units)

    def done() -> bool:
        return budget.met(removed) if budget is not None else len(removed) >= target

    if removed and not done():
        scorer.restore(removed)
    options = {} if budget is None else {"savings": budget.cost.saving}
    while not done():
        if budget is not None and len(removed) == len(units) - 1:
            raise ConfigError(f"step {len(steps) + 1}: the {budget.cost.measure} target of {budget.fraction:.1%} "
                              "is not met before the last candidate, and removing every candidate leaves no model; "
                              "choose a larger fraction")
        remaining = [unit for unit in units if unit not in removed
                     and (budget is None or budget.cost.saving(unit) > 0)]
        candidates, first_block = step_candidates(
            remaining, removed_so_far=len(removed), total_units=len(units),
            window_until_ratio=window_until_ratio, window_first_block=window_first_block,
        )
        started, executions_before = time.perf_counter(), scorer.block_executions
        try:
            scored = scorer.score(removed, candidates, previous=steps[-1].candidates if steps else (),
                                  on_candidate=on_candidate, **options)
        except NonFiniteOutputError as error:
            raise NonFiniteOutputError(f"step {len(steps) + 1}: {error}") from error
        # An aborted candidate's bound is above the winner's distance (or equal with a later unit order): it
        # could neither be smaller nor win a tie. Under a budget the same holds for bound and distance per cost.
        complete = [(c.unit, c.distance) for c in scored if c.distance is not None]
        if budget is None:
            unit, distance = select_least(complete)
        else:
            unit, distance = select_least_per_cost(complete, budget.cost.saving)
        step = Step(
            index=len(steps), unit=unit, distance=distance, candidates=tuple(scored),
            window_first_block=first_block, block_executions=scorer.block_executions - executions_before,
            seconds=time.perf_counter() - started,
        )
        steps.append(step)
        removed.append(unit)
        if on_step:
            on_step(step)
    return steps
