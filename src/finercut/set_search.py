"""Searches over whole removal sets, better than greedy: beam, swap (local search) and EvoPress.

The real problem behind FinerCut's greedy search is: choose the ``k`` units whose joint removal moves the output
least. Each search here scores whole sets exactly (:class:`finercut.scoring.sets.SetScorer`: prefix replay,
kept states, exact early abort) and its objective is the distance of the final set, never a sum of step scores.
Each keeps the greedy answer as a candidate, so its answer is never worse than greedy's at the same count
(EvoPress under equal attention/FFN counts: when greedy's set has them).

* :func:`beam_search`: each step extends every kept set by every candidate (the greedy step's candidates,
  window and ``only`` included) and keeps the ``width`` best distinct sets; width 1 is the greedy search.
* :func:`swap_search`: from a start set, restore one removed unit and remove one kept unit whenever that
  lowers the distance of the whole set (first improvement), until no swap does or the budget is spent.
* :func:`evopress_search`: EvoPress's (1 + lambda) evolutionary search with level-switch mutations and
  multi-step selection on growing calibration budgets (Sieberling et al., arXiv 2410.14649).

Every search reports its state after each step, accepted swap or generation (``on_state``, a JSON-able dict)
and continues from such a state (``state``) to the same result as an uninterrupted search: the order of work
depends only on what the state holds, never on the scorer's caches.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from finercut.candidates import Unit, step_candidates, window_applies
from finercut.pruned_modeling import ATTENTION, FFN
from finercut.scoring.bounds import best_first, sample_order
from finercut.scoring.sets import set_key
from finercut.search import CandidateScore, Step

State = dict
OnState = Callable[[State], None]


# ---------------------------------------------------------------------------------------------------------------------
# What every search records


@dataclass
class SearchTrace:
    """Evaluations spent and the objective after each improvement (``evaluations``, ``objective``,
    ``seconds``), carried across a resume."""

    kind: str
    evaluations_before: int = 0
    """Evaluations of the searches this one continues (a resumed run's earlier part)."""
    seconds_before: float = 0.0
    improvements: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    scorer: Any = None
    evaluations_at_start: int = 0

    def attach(self, scorer: Any) -> None:
        """Count ``scorer``'s evaluations from now on (a search continuing another on the same scorer keeps
        counting)."""
        if scorer is self.scorer:
            return
        self.evaluations_before = self.evaluations
        self.scorer = scorer
        self.evaluations_at_start = scorer.evaluations

    @property
    def evaluations(self) -> int:
        return self.evaluations_before + (self.scorer.evaluations - self.evaluations_at_start if self.scorer else 0)

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def improved(self, objective: float) -> None:
        if not self.improvements or objective < self.improvements[-1]["objective"]:
            self.improvements.append({"evaluations": self.evaluations, "objective": objective,
                                      "seconds": self.seconds})

    def moved(self, objective: float) -> None:
        """A search starting from a set other than the best so far (EvoPress's start under equal counts per kind,
        when greedy's set has other counts): its objective is the point to improve on from here."""
        self.improvements.append({"evaluations": self.evaluations, "objective": objective, "seconds": self.seconds})

    def to_state(self) -> dict:
        return {"evaluations": self.evaluations, "seconds": self.seconds, "improvements": list(self.improvements)}

    @classmethod
    def from_state(cls, kind: str, state: dict | None) -> "SearchTrace":
        if not state:
            return cls(kind)
        return cls(kind, int(state["evaluations"]), float(state["seconds"]), list(state["improvements"]))


def units_to_json(units: Iterable[Unit]) -> list[dict]:
    return [unit.to_dict() for unit in units]


def units_from_json(data: Iterable[dict]) -> list[Unit]:
    return [Unit.from_dict(entry) for entry in data]


def sorted_units(units: Iterable[Unit]) -> list[Unit]:
    return sorted(units, key=lambda unit: unit.sort_key)


def batch_order(scorer: Any, sets: Iterable[Iterable[Unit]]) -> list[int]:
    """The order to score batches in: those carrying most of the given (complete) sets' distances first."""
    complete = []
    for units in sets:
        known = scorer.known(units)
        if len(known) == scorer.num_batches:
            complete.append([known[b] for b in range(scorer.num_batches)])
    return sample_order(complete, scorer.num_batches)


# ---------------------------------------------------------------------------------------------------------------------
# The candidate window for whole sets


@dataclass(frozen=True)
class Window:
    """The paper's candidate window as a rule on whole sets: a set is admissible when some removal order obeys
    the greedy steps' window (while at most ``until_ratio`` of the units are removed, only units from
    ``first_block`` on are candidates, unless none of them is left)."""

    total_units: int
    until_ratio: float
    first_block: int
    window_units: int
    """Units at blocks >= ``first_block`` among the candidates."""

    def windowed_steps(self, count: int) -> int:
        return sum(window_applies(s, self.total_units, self.until_ratio) for s in range(count))

    def admits(self, units: Iterable[Unit]) -> bool:
        units = list(units)
        inside = sum(unit.block >= self.first_block for unit in units)
        return inside >= min(self.windowed_steps(len(units)), self.window_units)


def make_window(units: Sequence[Unit], until_ratio: float, first_block: int) -> Window:
    return Window(len(units), until_ratio, first_block, sum(unit.block >= first_block for unit in units))


# ---------------------------------------------------------------------------------------------------------------------
# Beam


@dataclass
class BeamEntry:
    """A kept set: its units in removal order, its distance, its batch sums and the steps of its path."""

    order: list[Unit]
    distance: float
    batch_sums: list[float]
    steps: list[Step]
    greedy: bool
    """Whether every step of its path took the best extension of the previous greedy set (greedy's path)."""

    @property
    def units(self) -> frozenset:
        return frozenset(self.order)

    @property
    def rank_key(self) -> tuple:
        return self.distance, set_key(self.order)

    def to_state(self) -> dict:
        return {"steps": [step.to_dict() for step in self.steps], "distance": self.distance,
                "batch_sums": self.batch_sums, "greedy": self.greedy}

    @classmethod
    def from_state(cls, data: dict) -> "BeamEntry":
        steps = [Step.from_dict(step) for step in data["steps"]]
        return cls([step.unit for step in steps], float(data["distance"]), [float(v) for v in data["batch_sums"]],
                   steps, bool(data["greedy"]))


@dataclass
class BeamResult:
    best: BeamEntry
    greedy: BeamEntry
    kept: list[BeamEntry]
    trace: SearchTrace


def beam_search(
    scorer: Any, *, units: Sequence[Unit], target: int, width: int, window_until_ratio: float,
    window_first_block: int, exhaustive: bool = False, state: State | None = None,
    on_state: OnState | None = None, on_step: Callable[[int, list[BeamEntry]], None] | None = None,
    trace: SearchTrace | None = None,
) -> BeamResult:
    """Keep the ``width`` best distinct removal sets of each size, each step extending every kept set by every
    candidate the greedy step would have (window, ``only`` and granularity as in
    :func:`finercut.search.greedy_search`), until sets of ``target`` units.

    Greedy's path is always kept as well (one more set when it falls out of the best ``width``), so the best
    final set is never worse than greedy's; with ``width`` 1 the search is the greedy search: the same removals
    with the same distances, ties to the earlier set in search order (:func:`finercut.scoring.sets.set_key`).

    The early abort is exact and the work best first, as in the greedy search
    (:func:`finercut.scoring.bounds.best_first`, vocabulary-subset bounds included): greedy's next set is the
    best of its parent's extensions, then the kept sets are the best, the best of the rest, ... each a best-first
    pass over the candidates left (the sums of the passes before are kept, so a pass pays only for what it
    adds); a candidate is scored only while its lower bound could still make it the least of a pass.
    """
    if width < 1:
        raise ValueError("the beam width must be at least 1")
    trace = trace or SearchTrace.from_state("beam", (state or {}).get("trace"))
    trace.attach(scorer)
    if state and state.get("kept"):
        kept = [BeamEntry.from_state(entry) for entry in state["kept"]]
    else:
        kept = [BeamEntry([], 0.0, [0.0] * scorer.num_batches, [], True)]
    num_units = len(units)
    while len(kept[0].order) < target:
        size = len(kept[0].order)
        started, executions = time.perf_counter(), scorer.block_executions
        parents = sorted(kept, key=lambda entry: (not entry.greedy, entry.rank_key))
        generated: dict[frozenset, tuple[int, Unit]] = {}
        per_parent: list[tuple[list[Unit], int]] = []
        for index, parent in enumerate(parents):
            remaining = [unit for unit in units if unit not in parent.units]
            candidates, first_block = step_candidates(remaining, removed_so_far=size, total_units=num_units,
                                                      window_until_ratio=window_until_ratio,
                                                      window_first_block=window_first_block)
            per_parent.append((candidates, first_block))
            for unit in candidates:
                generated.setdefault(parent.units | {unit}, (index, unit))
        items = {key: SetItem(key, set_key(key)) for key in generated}
        hint = [c.batch_sums for parent in parents for c in (parent.steps[-1].candidates if parent.steps else ())
                if c.batch_sums is not None]
        options = dict(num_batches=scorer.num_batches, num_positions=scorer.num_positions, exhaustive=exhaustive,
                       hint=hint, score_of=scorer.objective_score_of,
                       batch_bound=None if scorer.subset is None else
                       (lambda item, b: scorer.batch_bound(item.units, b)))

        def winner(pool: list[SetItem]) -> SetItem:
            """The set of least score in ``pool`` (ties to the earlier set key), scored best first: every other
            set only until its lower bound is above the winner's score (finercut.scoring.bounds.best_first)."""
            bounded = best_first(pool, lambda item, b: scorer.batch_sum(item.units, b), **options)
            complete = [(_set_value(scorer, item.units), item.sort_key, item) for item in pool
                        if bounded[item].complete]
            return min(complete, key=lambda entry: (entry[0], entry[1]))[2]

        greedy_parent = parents[0] if parents[0].greedy else None
        greedy_child = None
        if greedy_parent is not None:  # greedy's own step, exactly as the greedy search takes it
            greedy_child = winner([items[greedy_parent.units | {u}] for u in per_parent[0][0]]).units
        chosen, pool = [], list(items.values())
        while pool and len(chosen) < width:
            best = winner(pool)
            chosen.append(best.units)
            pool.remove(best)
        if greedy_child is not None and greedy_child not in chosen:
            chosen.append(greedy_child)
        scorer.evaluations += sum(bool(scorer.known(key) or scorer.known_bounds(key)) for key in generated)
        seconds, executions = time.perf_counter() - started, scorer.block_executions - executions
        new_kept = []
        for key in chosen:
            index, unit = generated[key]
            parent = parents[index]
            candidates, first_block = per_parent[index]
            step = Step(
                index=size, unit=unit, distance=_set_value(scorer, key),
                candidates=tuple(_candidate_score(unit_, parent.units | {unit_}, scorer) for unit_ in candidates),
                window_first_block=first_block, block_executions=executions, seconds=seconds)
            known = scorer.known(key)
            new_kept.append(BeamEntry([*parent.order, unit], step.distance,
                                      [known[b] for b in range(scorer.num_batches)], [*parent.steps, step],
                                      key == greedy_child))
        kept = sorted(new_kept, key=lambda entry: entry.rank_key)
        scorer.keep_recent(entry.order for entry in kept)
        if len(kept[0].order) == target:
            trace.improved(next(entry.distance for entry in kept if entry.greedy))
            trace.improved(kept[0].distance)
        if on_state:
            on_state({"kept": [entry.to_state() for entry in kept], "trace": trace.to_state()})
        if on_step:
            on_step(size, kept)
    greedy = next(entry for entry in kept if entry.greedy)
    return BeamResult(kept[0], greedy, kept, trace)


@dataclass(frozen=True)
class SetItem:
    """A removal set as :func:`finercut.scoring.bounds.best_first` orders its units: ties by the set key."""

    units: frozenset
    sort_key: tuple

    def __str__(self) -> str:
        return "{" + ", ".join(str(unit) for unit in sorted_units(self.units)) + "}"


def _set_value(scorer: Any, units: frozenset) -> float:
    """The score from the kept batch sums, or (some batches only bounded or not scored) its lower bound."""
    sums, bounds = scorer.known(units), scorer.known_bounds(units)
    parts = [*sums.values(), *(bound for b, bound in bounds.items() if b not in sums)]
    return scorer.score_of(math.fsum(parts) / scorer.num_positions)


def _candidate_score(unit: Unit, units: frozenset, scorer: Any) -> CandidateScore:
    sums, bounds = scorer.known(units), scorer.known_bounds(units)
    samples = sum(scorer.context.batches[b].num_samples for b in sums)
    if len(sums) == scorer.num_batches:
        return CandidateScore(unit, _set_value(scorer, units), samples=samples,
                              batch_sums=tuple(sums[b] for b in range(scorer.num_batches)))
    only_bounded = sum(scorer.context.batches[b].num_samples for b in bounds if b not in sums)
    return CandidateScore(unit, None, lower_bound=_set_value(scorer, units), samples=samples,
                          subset_samples=only_bounded if scorer.subset is not None else None)


# ---------------------------------------------------------------------------------------------------------------------
# Swap (local search)


@dataclass
class SetResult:
    """A search's answer: the set, its distance, greedy's (the start of swap and EvoPress, when greedy) and the
    trace."""

    units: list[Unit]
    distance: float
    start_distance: float
    trace: SearchTrace
    accepted: int = 0


def swap_pairs(current: Sequence[Unit], units: Sequence[Unit]) -> list[tuple[Unit, Unit]]:
    """Every (restore, remove) pair, the cheapest replays first: by the later of the first changed blocks
    (a swap changes the output from ``min(restore.block, remove.block)`` on), deeper first, then search order."""
    inside = set(current)
    removed = [u for u in units if u in inside]
    kept = [u for u in units if u not in inside]
    pairs = [(r, a) for r in removed for a in kept]
    return sorted(pairs, key=lambda pair: (-min(pair[0].block, pair[1].block), -max(pair[0].block, pair[1].block),
                                           pair[0].sort_key, pair[1].sort_key))


def swap_search(
    scorer: Any, *, units: Sequence[Unit], start: Sequence[Unit], admits: Callable[[Iterable[Unit]], bool],
    max_evaluations: int | None = None, exhaustive: bool = False, state: State | None = None,
    on_state: OnState | None = None, trace: SearchTrace | None = None, save_every: int = 25,
) -> SetResult:
    """First-improvement local search over single swaps: restore one removed unit and remove one kept unit
    (``admits``: the swap keeps the set admissible), accepted when the whole set's distance is strictly lower.

    The pairs are tried cheapest replay first (:func:`swap_pairs`); after an accepted swap the scan starts
    again on the new set. Each swap is scored against the current set's distance with the exact early abort:
    a swap stopped above it could not have been accepted, so the abort never changes a decision. Stops when a
    whole scan finds no improvement (a local optimum) or after ``max_evaluations`` evaluations.

    The state is saved at every accepted swap and every ``save_every`` refused ones, with how far the scan of
    the current set has come (a scan of a 40% set on a 30-block model is hundreds of evaluations): a resumed
    search skips the pairs already refused, which it would refuse again, and ends on the same record.
    """
    trace = trace or SearchTrace.from_state("swap", (state or {}).get("trace"))
    trace.attach(scorer)
    if state and state.get("current"):
        current = sorted_units(units_from_json(state["current"]))
        start_distance = float(state["start_distance"])
        accepted = int(state["accepted"])
        last_swap = tuple(units_from_json(state["last_swap"])) if state.get("last_swap") else None
        first = int(state["first_evaluation"])
        scanned = int(state.get("scanned", 0))
        distance = scorer.score(current).distance
        scorer.evaluations -= 1  # the saved set's distance is known: rescoring it rebuilds caches only
    else:
        first = trace.evaluations
        current = sorted_units(start)
        distance = scorer.score(current).distance
        start_distance, accepted, last_swap, scanned = distance, 0, None, 0
        trace.improved(distance)

    def spent() -> bool:  # the search's own evaluations (not those of the greedy search before it)
        return max_evaluations is not None and trace.evaluations - first >= max_evaluations

    def save(position: int) -> None:  # position: the pairs of the current set's scan already refused
        if on_state:
            on_state({"current": units_to_json(current), "start_distance": start_distance, "accepted": accepted,
                      "first_evaluation": first, "last_swap": units_to_json(last_swap) if last_swap else None,
                      "scanned": position, "trace": trace.to_state()})

    improved = True
    while improved and not spent():
        improved = False
        order = batch_order(scorer, [current])
        refused = 0
        for index, (restore, remove) in enumerate(swap_pairs(current, units)):
            if index < scanned:
                continue  # refused before the run was interrupted
            if last_swap is not None and (remove, restore) == last_swap:
                continue  # undoing the last accepted swap gives the set before it, which is worse
            candidate = [u for u in current if u != restore] + [remove]
            if not admits(candidate):
                continue
            if spent():
                break
            result = scorer.score(candidate, threshold=None if exhaustive else distance, order=order)
            if not result.bounded and result.distance < distance:
                current, distance, last_swap = sorted_units(candidate), result.distance, (restore, remove)
                accepted += 1
                trace.improved(distance)
                scorer.keep_recent([current])
                save(position=0)
                improved = True
                break
            refused += 1
            if refused % save_every == 0:
                save(position=index + 1)
        scanned = 0
    return SetResult(current, distance, start_distance, trace, accepted)


# ---------------------------------------------------------------------------------------------------------------------
# EvoPress


def kind_counts(units: Iterable[Unit]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for unit in units:
        counts[unit.kind] = counts.get(unit.kind, 0) + 1
    return counts


def equal_quotas(units: Sequence[Unit], count: int) -> dict[str, int]:
    """Equal attention and FFN counts (the extra one of an odd count to attention), or all of the one kind
    there is (block granularity, ``only``)."""
    kinds = sorted({unit.kind for unit in units}, key=lambda kind: (kind != ATTENTION, kind))
    if kinds != [ATTENTION, FFN]:
        return {kinds[0]: count}
    return {ATTENTION: count - count // 2, FFN: count // 2}


def meet_quotas(order: Sequence[Unit], units: Sequence[Unit], quotas: dict[str, int],
                admits: Callable[[Iterable[Unit]], bool]) -> list[Unit]:
    """A set with the quotas' counts per kind from a removal order (greedy's): its units while their kind has
    room, then the deepest units of each kind still short."""
    chosen: list[Unit] = []
    room = dict(quotas)
    for unit in order:
        if room.get(unit.kind, 0) > 0:
            chosen.append(unit)
            room[unit.kind] -= 1
    for unit in sorted(units, key=lambda u: (-u.block, u.sort_key)):
        if room.get(unit.kind, 0) > 0 and unit not in chosen:
            chosen.append(unit)
            room[unit.kind] -= 1
    if not admits(chosen):
        raise ValueError("no admissible set with these counts per kind")
    return sorted_units(chosen)


def mutate(parent: Sequence[Unit], units: Sequence[Unit], rng: random.Random, *, same_kind: bool,
           admits: Callable[[Iterable[Unit]], bool], tries: int = 100) -> list[Unit] | None:
    """A level-switch mutation: restore one removed unit and remove one kept unit of the same kind (counts per
    kind unchanged; with ``same_kind`` False, of any kind). None if no admissible mutation was drawn."""
    inside = set(parent)
    removed = [u for u in units if u in inside]
    kept = [u for u in units if u not in inside]
    for _ in range(tries):
        restore = rng.choice(removed)
        pool = [u for u in kept if u.kind == restore.kind] if same_kind else kept
        if not pool:
            continue
        remove = rng.choice(pool)
        child = [u for u in parent if u != restore] + [remove]
        if admits(child):
            return sorted_units(child)
    return None


def stage_batches(num_batches: int, stages: int) -> list[int]:
    """Batches each selection stage scores on: growing x4 to all of them at the last stage (16 batches and 3
    stages: 1, 4, 16)."""
    return [max(1, math.ceil(num_batches / 4 ** (stages - 1 - stage))) for stage in range(stages)]


def evopress_search(
    scorer: Any, *, units: Sequence[Unit], start: Sequence[Unit], admits: Callable[[Iterable[Unit]], bool],
    generations: int, offspring: int, survivors: Sequence[int], seed: int, same_kind: bool = True,
    max_evaluations: int | None = None, exhaustive: bool = False, state: State | None = None,
    on_state: OnState | None = None, trace: SearchTrace | None = None,
) -> SetResult:
    """EvoPress's (1 + lambda) search (Sieberling et al., arXiv 2410.14649) over removal sets of a fixed size.

    Each generation draws ``offspring`` children of the parent by one level-switch mutation each (:func:`mutate`:
    counts per kind kept with ``same_kind``), scores them on a few calibration batches, keeps the best
    ``survivors[0]`` of them, scores those on more batches, keeps ``survivors[1]``, ... and scores the last one
    on every batch against the parent's distance (exact early abort); it replaces the parent when strictly
    better. The stages' batch counts grow x4 up to all (:func:`stage_batches`). The search stops after
    ``generations``, or at the first generation that starts with ``max_evaluations`` of its own spent.
    Generation ``g`` draws from its own generator, seeded by ``(seed, g)``: the same seed gives the same search,
    resumed or not.
    """
    trace = trace or SearchTrace.from_state("evopress", (state or {}).get("trace"))
    trace.attach(scorer)
    stages = stage_batches(scorer.num_batches, len(survivors) + 1)
    if state and state.get("parent"):
        parent = sorted_units(units_from_json(state["parent"]))
        start_distance, accepted = float(state["start_distance"]), int(state["accepted"])
        first_generation, first = int(state["generation"]), int(state["first_evaluation"])
        fitness = scorer.score(parent).distance
        scorer.evaluations -= 1  # known: rescoring it rebuilds caches only
    else:
        first = trace.evaluations
        parent = sorted_units(start)
        fitness = scorer.score(parent).distance
        start_distance, accepted, first_generation = fitness, 0, 0
        if trace.improvements and trace.improvements[-1]["objective"] < fitness:
            trace.moved(fitness)
        else:
            trace.improved(fitness)
    for generation in range(first_generation, generations):
        if max_evaluations is not None and trace.evaluations - first >= max_evaluations:
            break
        rng = random.Random(f"evopress:{seed}:{generation}")
        children: list[list[Unit]] = []
        seen = {frozenset(parent)}
        for _ in range(offspring):
            child = mutate(parent, units, rng, same_kind=same_kind, admits=admits)
            if child is not None and frozenset(child) not in seen:
                seen.add(frozenset(child))
                children.append(child)
        order = batch_order(scorer, [parent])
        pool = children
        for stage, keep in enumerate(survivors):
            if len(pool) <= keep:
                continue
            batches = sorted(order[: stages[stage]])
            scored = [(scorer.score(child, batches=batches).distance, set_key(child), child) for child in pool]
            pool = [item[2] for item in sorted(scored, key=lambda item: (item[0], item[1]))[:keep]]
        best = None
        for child in pool:
            bar = fitness if best is None else best[0]
            result = scorer.score(child, threshold=None if exhaustive else bar, order=order)
            if not result.bounded and result.distance < fitness and (
                    best is None or (result.distance, set_key(child)) < (best[0], set_key(best[1]))):
                best = (result.distance, child)
        if best is not None:
            fitness, parent = best
            accepted += 1
            trace.improved(fitness)
            scorer.keep_recent([parent])
        if on_state:
            on_state({"parent": units_to_json(parent), "start_distance": start_distance, "accepted": accepted,
                      "generation": generation + 1, "first_evaluation": first, "trace": trace.to_state()})
    return SetResult(parent, fitness, start_distance, trace, accepted)


__all__ = [
    "BeamEntry", "BeamResult", "SearchTrace", "SetResult", "Window", "beam_search", "equal_quotas",
    "evopress_search", "make_window", "meet_quotas", "mutate", "stage_batches", "swap_pairs", "swap_search",
]
