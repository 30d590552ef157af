"""Searches over whole removal sets: the exact set scorer equals the naive full forward in float64 (sets sharing no
prefix, sets that add and restore units, every metric, the perplexity objective), its early abort never changes a
decision; beam of width 1 is the greedy search record for record; every search is at least as good as greedy; on a
model built so that greedy is wrong, beam (width 2) and swap find the optimum found by brute force; EvoPress is
seeded and finds the optimum of an additive objective."""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest
import torch
from tiny_models import ARCHITECTURES, LAYERS, tiny_input_ids, tiny_model

from finercut.adapters import adapter_for
from finercut.candidates import Unit, all_units
from finercut.distances import metric_named
from finercut.methods.blockpruner import NaivePerplexityScorer, PerplexityObjective
from finercut.scoring import FastScorer, NaiveScorer, ScoringContext
from finercut.scoring.sets import SetScore, SetScorer, first_difference
from finercut.search import greedy_search
from finercut.set_search import (
    beam_search, equal_quotas, evopress_search, kind_counts, make_window, meet_quotas, stage_batches, swap_search,
)

WINDOW = dict(window_until_ratio=0.4, window_first_block=2)
NO_WINDOW = dict(window_until_ratio=0.0, window_first_block=0)
UNITS = all_units(LAYERS, "sublayer")


def context_of(model, metric="js", samples=3, batch_size=1, **build):
    return ScoringContext.build(model, adapter_for(model), metric_named(metric), tiny_input_ids(samples=samples),
                                batch_size=batch_size, **build)


def random_sets(seed: int, count: int, units=UNITS) -> list[list[Unit]]:
    rng = random.Random(seed)
    return [rng.sample(units, rng.randint(1, len(units) - 1)) for _ in range(count)]


def add_and_restore() -> list[list[Unit]]:
    """A walk that removes units and restores some, at early and late blocks: each set differs from the one
    before by one unit."""
    a0, f1, a1, f2, a3, f3 = (Unit(0, "attention"), Unit(1, "ffn"), Unit(1, "attention"), Unit(2, "ffn"),
                              Unit(3, "attention"), Unit(3, "ffn"))
    return [[f3], [f3, a1], [f3, a1, f2], [f3, f2], [f3, f2, a0], [f2, a0], [f2, a0, a3], [f2, a0, a3, a1],
            [f2, a3, a1], [f2, a3, a1, f1], [a3, a1, f1]]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_set_scorer_equals_the_naive_full_forward_in_float64(name):
    model = tiny_model(name, dtype=torch.float64)
    context = context_of(model)
    try:
        scorer, naive = SetScorer(context), NaiveScorer(context)
        sets = random_sets(0, 10) + add_and_restore()
        for units in sets:
            assert scorer.score(units).distance == pytest.approx(naive.set_distance(units), rel=1e-9, abs=1e-14)
        # a set scored again runs no block (its batch sums are kept), and gives the same number
        executions = context.block_executions
        again = [scorer.score(units).distance for units in sets]
        assert context.block_executions == executions
        assert again == [scorer.score(units).distance for units in sets]
    finally:
        context.close()


@pytest.mark.parametrize("metric", ["angular", "euclidean", "js_official"])
def test_the_set_scorer_equals_naive_for_every_metric(metric):
    model = tiny_model("qwen2", dtype=torch.float64)
    context = context_of(model, metric=metric, batch_size=2)
    try:
        scorer, naive = SetScorer(context), NaiveScorer(context)
        for units in random_sets(1, 6) + add_and_restore():
            assert scorer.score(units).distance == pytest.approx(naive.set_distance(units), rel=1e-9, abs=1e-14)
    finally:
        context.close()


def test_the_set_scorer_takes_the_perplexity_objective():
    model = tiny_model("llama", dtype=torch.float64)
    context = context_of(model)
    try:
        scorer = SetScorer(context, objective=PerplexityObjective(context))
        naive = NaivePerplexityScorer(context)
        for units in random_sets(2, 5) + add_and_restore():
            assert scorer.score(units).distance == pytest.approx(naive.plain_perplexity(units), rel=1e-9)
    finally:
        context.close()


def test_prefix_replay_runs_only_the_blocks_from_the_first_difference():
    model = tiny_model("llama", dtype=torch.float64)
    context = context_of(model, samples=2)
    try:
        scorer = SetScorer(context)
        runs = lambda: context.block_executions  # noqa: E731
        before = runs()
        scorer.score([Unit(1, "ffn"), Unit(3, "attention")])  # from the embedding: every block
        assert runs() - before == LAYERS
        before = runs()
        scorer.score([Unit(1, "ffn"), Unit(3, "ffn")])  # differs from block 3 on: block 3 only
        assert runs() - before == 1
        before = runs()
        scorer.score([Unit(1, "ffn"), Unit(2, "attention"), Unit(3, "ffn")])  # from block 2
        assert runs() - before == 2
        before = runs()
        scorer.score([Unit(1, "ffn"), Unit(3, "ffn")])  # scored before: nothing
        assert runs() - before == 0
        assert first_difference({Unit(1, "ffn")}, {Unit(1, "attention")}, LAYERS) == 1
        # with no memory for states every set replays from the embedding, with the same numbers
        plain = SetScorer(context, state_bytes=0)
        before = runs()
        for units in add_and_restore():
            assert plain.score(units).distance == scorer.score(units).distance
        assert runs() - before > LAYERS * len(add_and_restore()) * 0.5
    finally:
        context.close()


def test_the_early_abort_is_exact_and_never_changes_a_decision():
    model = tiny_model("mistral", dtype=torch.float64)
    context = context_of(model, samples=4)
    try:
        scorer, naive = SetScorer(context), NaiveScorer(context)
        sets = random_sets(3, 12)
        truth = [naive.set_distance(units) for units in sets]
        bounded = 0
        for threshold in sorted(truth):
            for units, distance in zip(sets, truth):
                result = SetScorer(context).score(units, threshold=threshold, order=[3, 1, 0, 2])
                if distance <= threshold * (1 - 1e-9):
                    assert not result.bounded and result.distance == pytest.approx(distance, rel=1e-9)
                if result.bounded:
                    bounded += 1
                    assert result.lower_bound > threshold
                    assert result.lower_bound <= distance * (1 + 1e-9)
                    assert result.samples < 4
                # accept "strictly below the threshold": the same with or without the abort
                accept = not result.bounded and result.distance < threshold
                assert accept == (scorer.score(units).distance < threshold)
        assert bounded > 0
    finally:
        context.close()


def test_an_aborted_swap_is_one_the_search_would_have_refused():
    model = tiny_model("llama", dtype=torch.float64)
    context = context_of(model, samples=4)
    try:
        start = [Unit(0, "attention"), Unit(1, "ffn"), Unit(3, "attention")]
        fast = swap_search(SetScorer(context), units=UNITS, start=start, admits=lambda s: True)
        exhaustive = swap_search(SetScorer(context), units=UNITS, start=start, admits=lambda s: True,
                                 exhaustive=True)
        assert fast.units == exhaustive.units and fast.distance == exhaustive.distance
        assert fast.accepted == exhaustive.accepted > 0
        assert fast.trace.evaluations == exhaustive.trace.evaluations
        assert fast.distance < fast.start_distance
    finally:
        context.close()


def test_a_swap_search_resumed_from_inside_a_scan_ends_on_the_uninterrupted_result():
    """The state saved every few refused swaps says how far the scan came; resuming from any saved state (in the
    middle of a scan or after an accepted swap) gives the uninterrupted search's set, distance and evaluations."""
    model = tiny_model("llama", dtype=torch.float64)
    context = context_of(model, samples=4)
    try:
        start = [Unit(0, "attention"), Unit(1, "ffn"), Unit(3, "attention")]
        states: list[dict] = []
        plain = swap_search(SetScorer(context), units=UNITS, start=start, admits=lambda s: True,
                            on_state=lambda state: states.append(copy.deepcopy(state)), save_every=2)
        assert plain.accepted > 0
        inside = [state for state in states if state["scanned"] > 0]
        assert inside and len(inside) < len(states)  # saved inside scans and at accepted swaps
        for state in states:
            resumed = swap_search(SetScorer(context), units=UNITS, start=start, admits=lambda s: True,
                                  state=state, save_every=2)
            assert (resumed.units, resumed.distance, resumed.accepted) == (plain.units, plain.distance,
                                                                            plain.accepted)
            assert resumed.trace.evaluations == plain.trace.evaluations
            assert ([p["objective"] for p in resumed.trace.improvements]
                    == [p["objective"] for p in plain.trace.improvements])
    finally:
        context.close()


def greedy_of(context, target, granularity="sublayer", only=None, window=WINDOW):
    return greedy_search(FastScorer(context), num_blocks=LAYERS, granularity=granularity, target=target,
                         only=only, **window)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_beam_of_width_one_is_the_greedy_search_record_for_record(name):
    model = tiny_model(name, dtype=torch.float64)
    context = context_of(model, samples=4)
    try:
        greedy = greedy_of(context, 5)
        beam = beam_search(SetScorer(context), units=UNITS, target=5, width=1, **WINDOW)
        # the same removals, distances, candidates and every candidate's score or bound (the same best-first work)
        assert [(s.index, s.unit, s.distance, s.window_first_block, s.candidates) for s in beam.best.steps] == [
            (s.index, s.unit, s.distance, s.window_first_block, s.candidates) for s in greedy]
        assert any(c.aborted for s in greedy for c in s.candidates)
        assert beam.greedy is beam.best
    finally:
        context.close()


@pytest.mark.parametrize("granularity, only", [("block", None), ("sublayer", "attention"), ("sublayer", "ffn")])
def test_beam_of_width_one_follows_granularity_and_only_as_greedy(granularity, only):
    model = tiny_model("qwen3", dtype=torch.float64)
    context = context_of(model)
    try:
        units = all_units(LAYERS, granularity, only)
        window = dict(window_until_ratio=0.4, window_first_block=1)
        greedy = greedy_of(context, 2, granularity, only, window)
        beam = beam_search(SetScorer(context), units=units, target=2, width=1, **window)
        assert [(s.unit, s.distance) for s in beam.best.steps] == [(s.unit, s.distance) for s in greedy]
    finally:
        context.close()


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "gemma2", "mixtral"])
def test_every_search_is_at_least_as_good_as_greedy(name):
    model = tiny_model(name, dtype=torch.float64)
    context = context_of(model)
    try:
        for target, window in ((3, NO_WINDOW), (4, WINDOW)):
            greedy = greedy_of(context, target, window=window)[-1].distance
            admits = make_window(UNITS, window["window_until_ratio"], window["window_first_block"]).admits
            scorer = SetScorer(context)
            beam = beam_search(scorer, units=UNITS, target=target, width=3, **window)
            start = beam.greedy.order
            swap = swap_search(scorer, units=UNITS, start=start, admits=admits)
            evo = evopress_search(scorer, units=UNITS, start=start, admits=admits, generations=6, offspring=4,
                                  survivors=(2,), seed=0, same_kind=False)
            assert beam.greedy.distance == greedy
            for found in (beam.best.distance, swap.distance, evo.distance):
                assert found <= greedy
            for units in (beam.best.order, swap.units, evo.units):
                assert len(set(units)) == target and admits(units)
    finally:
        context.close()


def greedy_is_wrong_model() -> torch.nn.Module:
    """A tiny llama where greedy is wrong: block 3's FFN is block 2's with its output negated, so removing both
    moves almost nothing while each alone moves the output; block 3's attention moves it only a little, so greedy
    removes it first and can then take only one of the pair."""
    model = tiny_model("llama", dtype=torch.float64)
    layers = model.model.layers
    with torch.no_grad():
        first, second = layers[2].mlp, layers[3].mlp
        first.down_proj.weight.mul_(0.3)
        for name in ("gate_proj", "up_proj"):
            getattr(second, name).weight.copy_(getattr(first, name).weight)
        second.down_proj.weight.copy_(-first.down_proj.weight)
        layers[3].post_attention_layernorm.weight.copy_(layers[2].post_attention_layernorm.weight)
        layers[3].self_attn.o_proj.weight.mul_(0.1)
        for block in range(2):
            layers[block].self_attn.o_proj.weight.mul_(3.0)
            layers[block].mlp.down_proj.weight.mul_(3.0)
        layers[2].self_attn.o_proj.weight.mul_(3.0)
    return model


def test_beam_and_swap_find_the_optimum_where_greedy_is_wrong():
    model = greedy_is_wrong_model()
    context = context_of(model)
    try:
        naive = NaiveScorer(context)
        optimum = min(itertools.combinations(UNITS, 2), key=lambda units: naive.set_distance(units))
        assert set(optimum) == {Unit(2, "ffn"), Unit(3, "ffn")}
        greedy = greedy_of(context, 2, window=NO_WINDOW)
        assert greedy[0].unit == Unit(3, "attention")
        assert greedy[-1].distance > 10 * naive.set_distance(optimum)
        beam = beam_search(SetScorer(context), units=UNITS, target=2, width=2, **NO_WINDOW)
        assert set(beam.best.order) == set(optimum)
        assert beam.best.distance == pytest.approx(naive.set_distance(optimum), rel=1e-9)
        assert beam.greedy.distance == greedy[-1].distance
        swap = swap_search(SetScorer(context), units=UNITS, start=[s.unit for s in greedy], admits=lambda s: True)
        assert set(swap.units) == set(optimum) and swap.accepted == 1
        assert swap.distance == pytest.approx(naive.set_distance(optimum), rel=1e-9)
        assert [point["objective"] for point in swap.trace.improvements] == [greedy[-1].distance, swap.distance]
    finally:
        context.close()


class AdditiveScorer:
    """A fake set scorer: a set's score is the sum of its units' weights (optionally per batch)."""

    def __init__(self, weights: dict[Unit, float], num_batches: int = 4) -> None:
        self.weights, self.num_batches, self.evaluations = weights, num_batches, 0
        self.block_executions = 0

    def score(self, units, *, threshold=None, batches=None, order=None) -> SetScore:
        self.evaluations += 1
        return SetScore(frozenset(units), math.fsum(self.weights[u] for u in units), samples=self.num_batches)

    def known(self, units) -> dict:
        return {b: math.fsum(self.weights[u] for u in units) for b in range(self.num_batches)}

    def keep_recent(self, sets) -> None:
        pass


@pytest.mark.parametrize("same_kind", [True, False])
def test_evopress_finds_the_optimum_of_an_additive_objective_and_is_seeded(same_kind):
    units = all_units(12, "sublayer")
    rng = random.Random(5)
    weights = {unit: rng.random() for unit in units}
    count = 6
    admits = lambda s: True  # noqa: E731
    quotas = equal_quotas(units, count)
    start = meet_quotas(units[:count], units, quotas, admits)  # the first blocks: far from the optimum
    if same_kind:
        optimum = {u for kind, n in quotas.items()
                   for u in sorted((u for u in units if u.kind == kind), key=weights.get)[:n]}
    else:
        optimum = set(sorted(units, key=weights.get)[:count])
    runs = [evopress_search(AdditiveScorer(weights), units=units, start=start, admits=admits, generations=150,
                            offspring=8, survivors=(2,), seed=seed, same_kind=same_kind) for seed in (7, 7, 8)]
    assert set(runs[0].units) == optimum
    assert runs[0].units == runs[1].units and runs[0].trace.improvements == [
        {**point, "seconds": p2["seconds"]} for point, p2 in zip(runs[1].trace.improvements,
                                                                runs[0].trace.improvements)]
    assert [p["evaluations"] for p in runs[0].trace.improvements] == [
        p["evaluations"] for p in runs[1].trace.improvements]
    assert [p["evaluations"] for p in runs[0].trace.improvements] != [
        p["evaluations"] for p in runs[2].trace.improvements]
    if same_kind:
        assert kind_counts(runs[0].units) == quotas == {"attention": 3, "ffn": 3}


def test_the_window_admits_a_set_when_some_removal_order_obeys_it():
    window = make_window(UNITS, 0.4, 2)  # 8 units: steps with <= 3.2 removed are windowed, 4 in blocks 2, 3
    assert window.admits([Unit(0, "ffn")]) is False
    assert window.admits([Unit(3, "ffn"), Unit(2, "attention"), Unit(2, "ffn"), Unit(3, "attention"),
                          Unit(0, "ffn")])
    assert not window.admits([Unit(3, "ffn"), Unit(2, "attention"), Unit(2, "ffn"), Unit(0, "ffn")])


def test_the_budgets_stop_swap_and_evopress_after_their_own_evaluations():
    units = all_units(8, "sublayer")
    weights = {unit: 1.0 + unit.block + 0.5 * (unit.kind == "ffn") for unit in units}  # deep ones cost most
    start = units[-4:]
    scorer = AdditiveScorer(weights)
    scorer.evaluations = 100  # a greedy search before it spent these
    swap = swap_search(scorer, units=units, start=start, admits=lambda s: True, max_evaluations=5)
    assert scorer.evaluations == 105 and swap.distance < swap.start_distance
    unlimited = swap_search(AdditiveScorer(weights), units=units, start=start, admits=lambda s: True)
    assert set(unlimited.units) == set(sorted(units, key=weights.get)[:4])  # additive: swaps reach the optimum
    scorer = AdditiveScorer(weights)
    evo = evopress_search(scorer, units=units, start=start, admits=lambda s: True, generations=1000, offspring=4,
                          survivors=(1,), seed=0, max_evaluations=20)
    assert 20 <= scorer.evaluations <= 20 + 4 + 1 + 1 and evo.distance <= evo.start_distance


def test_evopress_on_a_model_is_the_same_for_the_same_seed():
    model = tiny_model("qwen2", dtype=torch.float64)
    context = context_of(model)
    try:
        start = [Unit(2, "attention"), Unit(2, "ffn"), Unit(3, "attention"), Unit(3, "ffn")]
        runs = [evopress_search(SetScorer(context), units=UNITS, start=start, admits=lambda s: True, generations=5,
                                offspring=4, survivors=(2,), seed=seed) for seed in (11, 11)]
        assert runs[0].units == runs[1].units and runs[0].distance == runs[1].distance
        assert [(p["evaluations"], p["objective"]) for p in runs[0].trace.improvements] == [
            (p["evaluations"], p["objective"]) for p in runs[1].trace.improvements]
        assert kind_counts(runs[0].units) == {"attention": 2, "ffn": 2}
    finally:
        context.close()


def test_evopress_selects_on_growing_calibration_budgets():
    assert stage_batches(16, 3) == [1, 4, 16] and stage_batches(4, 3) == [1, 1, 4] and stage_batches(10, 2) == [3, 10]
    seen = []

    class Recording(AdditiveScorer):
        def score(self, units, *, threshold=None, batches=None, order=None):
            seen.append(None if batches is None else len(batches))
            return super().score(units, threshold=threshold, batches=batches, order=order)

    units = all_units(12, "sublayer")
    weights = {unit: float(unit.block) for unit in units}
    evopress_search(Recording(weights, num_batches=16), units=units, start=units[-6:], admits=lambda s: True,
                    generations=1, offspring=8, survivors=(2, 1), seed=0)
    assert seen == [None] + [1] * 8 + [4] * 2 + [None]  # the start, 8 children, the best 2, the best on all


def test_the_set_scorer_takes_a_task_objective_and_aborts_exactly_on_it():
    from finercut.scoring.task import AnswerExample, NaiveTaskScorer, TaskObjective

    examples = (AnswerExample((5, 6, 7), (8, 9)), AnswerExample((10, 11, 12, 13, 14), (15,)),
                AnswerExample((3, 4), (5, 6, 7)), AnswerExample((20, 21, 22, 23), (24, 25)))
    model = tiny_model("llama", dtype=torch.float64)
    context = ScoringContext.build(model, adapter_for(model), metric_named("js"), [e.input_ids for e in examples])
    try:
        scorer = SetScorer(context, objective=TaskObjective(context, examples))
        naive = NaiveTaskScorer(context, examples)
        sets = random_sets(4, 6) + add_and_restore()
        truth = [naive.plain_objective(units) for units in sets]
        for units, value in zip(sets, truth):
            assert scorer.score(units).distance == pytest.approx(value, rel=1e-9)
        threshold = sorted(truth)[len(truth) // 2]
        for units, value in zip(sets, truth):
            result = SetScorer(context, objective=TaskObjective(context, examples)).score(units, threshold=threshold)
            if value <= threshold:
                assert not result.bounded and result.distance == pytest.approx(value, rel=1e-9)
            if result.bounded:
                assert threshold < result.lower_bound <= value * (1 + 1e-9)
    finally:
        context.close()
