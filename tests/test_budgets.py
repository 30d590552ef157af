"""Cost-aware targets: the selection rule d/s, the stop rule, and costs equal to the statistics module's counts."""

from __future__ import annotations

import copy
import math

import pytest
from tiny_models import ARCHITECTURES, cached_tiny_model

from finercut.budgets import (
    CostModel,
    cost_aware_greedy,
    cost_model,
    distance_per_cost,
    latency_cost_model,
    pareto_front,
    select_least_per_cost,
    target_met,
)
from finercut.candidates import Unit, all_units
from finercut.checkpoint import apply_removal, parameter_stats
from finercut.evaluation.stats import count_macs, kv_cache_bytes_per_token
from finercut.pruned_modeling import ATTENTION, BLOCK, FFN

A, B, C = Unit(0, ATTENTION), Unit(0, FFN), Unit(1, ATTENTION)


# ---------------------------------------------------------------------------------------------------------------------
# The selection rule, against hand-computed values


def test_selection_is_least_distance_per_cost_saved_not_least_distance():
    scored = [(A, 0.3), (B, 0.1), (C, 0.5)]
    savings = {A: 10.0, B: 1.0, C: 10.0}
    # d/s: A 0.03, B 0.1, C 0.05 -> A, although B has the least distance
    assert select_least_per_cost(scored, savings.get) == (A, 0.3)
    assert distance_per_cost(0.3, 10.0) == pytest.approx(0.03)


def test_exact_ties_go_to_the_earliest_unit_and_zero_savings_are_never_chosen():
    assert select_least_per_cost([(C, 0.2), (A, 0.1)], {A: 1.0, C: 2.0}.get) == (A, 0.1)  # 0.1 == 0.1: A first
    assert select_least_per_cost([(B, 0.0), (C, 0.4)], {B: 0.0, C: 2.0}.get) == (C, 0.4)
    assert distance_per_cost(0.0, 0.0) == math.inf
    with pytest.raises(ValueError, match="saves any cost"):
        select_least_per_cost([(B, 0.1)], {B: 0.0}.get)


def test_target_met_is_remaining_within_the_fraction():
    assert target_met(75.0, 100.0, 0.75) and not target_met(75.01, 100.0, 0.75)


def test_a_whole_block_saves_both_sub_layers_and_the_trajectory_follows_the_removals():
    cost = CostModel("params", 100.0, {A: 10.0, B: 30.0, C: 5.0, Unit(1, FFN): 20.0})
    assert cost.saving(Unit(0, BLOCK)) == 40.0
    assert cost.remaining([Unit(0, BLOCK), C]) == 55.0
    assert cost.trajectory([C, Unit(0, BLOCK)]) == [0.95, 0.55]
    with pytest.raises(ValueError, match="more than once"):
        cost.remaining([A, Unit(0, BLOCK)])


# ---------------------------------------------------------------------------------------------------------------------
# The stop rule


def test_the_search_stops_at_the_first_step_that_meets_the_target():
    units = [A, B, C, Unit(1, FFN)]
    cost = CostModel("params", 100.0, {A: 10.0, B: 30.0, C: 5.0, Unit(1, FFN): 20.0})
    distances = {A: 0.2, B: 0.9, C: 0.05, Unit(1, FFN): 0.4}
    calls = []

    def score(removed, candidates):
        calls.append((list(removed), list(candidates)))
        return [(unit, distances[unit]) for unit in candidates]

    steps = cost_aware_greedy(units, score, cost, 0.70)
    # d/s: A 0.02, B 0.03, C 0.01, 1.ffn 0.02 -> C (95%), A (85%; A before 1.ffn on the tie), 1.ffn (65% <= 70%)
    assert [step.unit for step in steps] == [C, A, Unit(1, FFN)]
    assert [step.fraction for step in steps] == pytest.approx([0.95, 0.85, 0.65])
    assert len(calls) == 3 and calls[1][0] == [C]


def test_an_unreachable_target_is_refused_before_any_scoring():
    cost = CostModel("kv_cache", 100.0, {A: 40.0, B: 0.0})

    def score(removed, candidates):
        raise AssertionError("nothing may be scored")

    with pytest.raises(ValueError, match="cannot be met"):
        cost_aware_greedy([A, B], score, cost, 0.5)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        cost_aware_greedy([A, B], score, cost, 1.0)


def test_pareto_front_keeps_the_undominated_points_by_cost():
    points = [(0.9, 0.10), (0.8, 0.30), (0.7, 0.20), (0.6, 0.50), (0.7, 0.25)]
    assert pareto_front(points) == [3, 2, 0]


# ---------------------------------------------------------------------------------------------------------------------
# Costs equal the statistics module's counts of the physically pruned model


REMOVALS = [
    [Unit(2, ATTENTION)],
    [Unit(1, FFN), Unit(3, ATTENTION)],
    [Unit(3, BLOCK), Unit(0, FFN)],
    [Unit(1, BLOCK), Unit(2, ATTENTION), Unit(3, FFN)],
]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_remaining_costs_equal_the_statistics_of_the_pruned_model(arch):
    dense = cached_tiny_model(arch)
    params = cost_model(dense, "params")
    macs = cost_model(dense, "macs", context_length=10)
    kv = cost_model(dense, "kv_cache")
    assert params.dense_total == parameter_stats(dense).total_parameters
    assert macs.dense_total == count_macs(dense, context_length=10)["total"]
    assert kv.dense_total == kv_cache_bytes_per_token(dense)
    for removed in REMOVALS:
        pruned = apply_removal(copy.deepcopy(dense), removed)
        assert params.remaining(removed) == parameter_stats(pruned).total_parameters, removed
        assert macs.remaining(removed) == count_macs(pruned, context_length=10)["total"], removed
        assert kv.remaining(removed) == kv_cache_bytes_per_token(pruned), removed


def test_cost_model_refusals_and_measured_latency():
    dense = cached_tiny_model("llama")
    with pytest.raises(ValueError, match="context length"):
        cost_model(dense, "macs")
    with pytest.raises(ValueError, match="measured on the device"):
        cost_model(dense, "latency")
    with pytest.raises(ValueError, match="unknown cost measure"):
        cost_model(dense, "flops")
    latency = latency_cost_model({u: 0.01 for u in all_units(4, "sublayer")}, rest_seconds=0.02)
    assert latency.dense_total == pytest.approx(0.1) and latency.remaining([Unit(0, BLOCK)]) == pytest.approx(0.08)
    with pytest.raises(ValueError, match="negative"):
        latency_cost_model({A: -1.0}, rest_seconds=0.0)


def test_measured_sublayer_latencies_cover_every_sub_layer_and_fit_in_the_forward_time(one_thread):
    from tiny_models import tiny_input_ids

    from finercut.budgets import measure_sublayer_latency

    model = cached_tiny_model("llama")
    seconds, rest = measure_sublayer_latency(model, tiny_input_ids(), repeats=3)
    assert set(seconds) == set(all_units(4, "sublayer"))
    assert all(value > 0 for value in seconds.values()) and rest >= 0
    latency = latency_cost_model(seconds, rest)
    assert latency.remaining(all_units(4, "sublayer")) == pytest.approx(rest)
    assert not any(hook for module in model.modules() for hook in (module._forward_hooks, module._forward_pre_hooks))
