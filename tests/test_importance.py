"""Specification of finercut.importance: Shapley values of units on the output-distance objective."""

from __future__ import annotations

import pytest
import torch

from finercut import prune
from finercut.adapters import adapter_for
from finercut.candidates import BLOCK, Unit, all_units
from finercut.distances import metric_named
from finercut.errors import ConfigError
from finercut.importance import (ModelCost, ShapleyEstimate, exact_shapley, permutation_shapley, plain_walk,
                                 random_orders)
from finercut.pruned_modeling import ATTENTION, FFN
from finercut.scoring import capture_calibration
from tiny_models import tiny_input_ids, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

UNITS = [Unit(0, ATTENTION), Unit(0, FFN), Unit(1, ATTENTION), Unit(1, FFN)]


def additive(weights: dict):
    return lambda removed: sum(weights[u] for u in removed)


def test_on_an_additive_objective_over_a_tiny_models_sublayers_the_estimate_is_the_exact_value():
    # Hand-built additive cost: removing a sub-layer costs the norm of its weights; its Shapley value is that norm.
    model = tiny_model("llama")
    adapter = adapter_for(model)
    units = all_units(adapter.num_blocks(model), "sublayer")
    weights = {}
    for unit in units:
        block = adapter.blocks_of(model)[unit.block]
        module = getattr(block, adapter.attention if unit.kind == ATTENTION else adapter.ffn)
        weights[unit] = float(sum(p.detach().double().norm() for p in module.parameters()))
    estimate = permutation_shapley(units, plain_walk(additive(weights)), permutations=3, seed=0)
    for unit in units:
        assert estimate.values[unit] == pytest.approx(weights[unit], abs=1e-12)
        assert estimate.standard_errors[unit] == pytest.approx(0.0, abs=1e-12)
    assert exact_shapley(units[:5], additive(weights)) == pytest.approx({u: weights[u] for u in units[:5]})


def test_exact_shapley_of_two_units_with_an_interaction_by_hand():
    # d({}) = 0, d({a}) = 1, d({b}) = 2, d({a, b}) = 5: phi_a = (1 + (5 - 2)) / 2 = 2, phi_b = (2 + (5 - 1)) / 2 = 3.
    a, b = UNITS[:2]
    table = {frozenset(): 0.0, frozenset({a}): 1.0, frozenset({b}): 2.0, frozenset({a, b}): 5.0}
    assert exact_shapley([a, b], table.__getitem__) == pytest.approx({a: 2.0, b: 3.0})


def interacting_cost(removed) -> float:
    """A non-additive game on UNITS: attention and FFN of a block hurt more together."""
    base = {UNITS[0]: 1.0, UNITS[1]: 0.5, UNITS[2]: 0.2, UNITS[3]: 0.1}
    cost = sum(base[u] for u in removed)
    for block in (0, 1):
        if {Unit(block, ATTENTION), Unit(block, FFN)} <= set(removed):
            cost += 1.5 - block
    return cost


def test_the_estimate_converges_to_the_exact_value_within_its_standard_errors():
    exact = exact_shapley(UNITS, interacting_cost)
    estimate = permutation_shapley(UNITS, plain_walk(interacting_cost), permutations=400, seed=1)
    for unit in UNITS:
        assert abs(estimate.values[unit] - exact[unit]) < 4 * estimate.standard_errors[unit] + 1e-12
    # Efficiency holds for every order, so exactly for the estimate too: the values add up to d(all).
    assert sum(estimate.values.values()) == pytest.approx(interacting_cost(UNITS))


def test_same_seed_same_estimates_and_another_seed_other_orders():
    first = permutation_shapley(UNITS, plain_walk(interacting_cost), permutations=5, seed=7)
    again = permutation_shapley(UNITS, plain_walk(interacting_cost), permutations=5, seed=7)
    assert first == again
    assert random_orders(UNITS, permutations=5, seed=7) != random_orders(UNITS, permutations=5, seed=8)


def test_truncation_stops_a_walk_once_removing_more_changes_nothing():
    def saturating(removed):  # the model is gone after any two removals
        return float(min(len(removed), 2))

    estimate = permutation_shapley(UNITS, plain_walk(saturating), permutations=6, seed=0, truncation=0.0,
                                   full_cost=2.0)
    assert estimate.evaluations == 6 * 2  # the last two units of every order are never evaluated
    assert sum(estimate.values.values()) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="full_cost"):
        permutation_shapley(UNITS, plain_walk(saturating), permutations=1, truncation=0.1)


def test_lowest_units_and_whether_their_intervals_separate_them():
    estimate = permutation_shapley(UNITS, plain_walk(interacting_cost), permutations=50, seed=0)
    assert estimate.lowest(2) == sorted(UNITS, key=lambda u: estimate.values[u])[:2]
    low, high = estimate.interval(UNITS[3])
    assert low < estimate.values[UNITS[3]] < high


def hand_estimate(errors):
    """Values 1, 2, 5, 6 for UNITS with the given standard errors (z = 1.96 below)."""
    values = dict(zip(UNITS, (1.0, 2.0, 5.0, 6.0)))
    return ShapleyEstimate(values, dict(zip(UNITS, errors)), permutations=4, evaluations=16, seed=3,
                           truncation=0.05, empty_cost=0.0, full_cost=9.0)


def test_the_intervals_separate_the_lowest_units_only_when_their_bounds_do():
    # removed {1, 2}: highest upper bound 2 + 1.96 * 0.5 = 2.98; rest {5, 6}: lowest lower bound 5 - 1.96 = 3.04
    tight = hand_estimate((0.5, 0.5, 1.0, 1.0))
    assert tight.separation(2) == pytest.approx((2.98, 3.04))
    assert tight.separated(2)
    # an error of 1.6 on the second: 2 + 3.136 = 5.136 above 3.04
    loose = hand_estimate((0.5, 1.6, 1.0, 1.0))
    assert loose.separation(2) == pytest.approx((5.136, 3.04)) and not loose.separated(2)
    assert hand_estimate((0.5, None, 1.0, 1.0)).separation(2) is None
    assert not hand_estimate((0.5, None, 1.0, 1.0)).separated(2) and loose.separated(4)


def test_an_estimate_round_trips_through_its_record_form_and_show_says_whether_it_ranks():
    from finercut.methods.shapley import shapley_line

    for estimate in (hand_estimate((0.5, 0.5, 1.0, 1.0)), hand_estimate((0.5, 1.6, 1.0, 1.0))):
        assert ShapleyEstimate.from_dict(estimate.to_dict()) == estimate
    assert shapley_line(hand_estimate((0.5, 0.5, 1.0, 1.0)).to_dict(), 2) == (
        "Shapley values: 4 permutations (seed 3, truncation 0.05), 16 coalition evaluations; the 95% intervals "
        "rank the 2 removed units apart from the rest (highest upper bound among them 2.98, lowest lower bound "
        "among the rest 3.04)")
    assert "do not rank the 2 removed units" in shapley_line(hand_estimate((0.5, 1.6, 1.0, 1.0)).to_dict(), 2)
    assert "no standard errors" in shapley_line(hand_estimate((0.5, None, 1.0, 1.0)).to_dict(), 2)


@pytest.fixture(scope="module")
def model_cost():
    model = tiny_model("llama", dtype=torch.float64)
    adapter = adapter_for(model)
    batches = capture_calibration(model, adapter, tiny_input_ids(), batch_size=2)
    return ModelCost(model, adapter, metric_named("js"), batches, chunk_rows=7)


def test_the_cached_walk_equals_the_plain_forward_per_coalition(model_cost):
    order = [Unit(2, FFN), Unit(0, ATTENTION), Unit(3, BLOCK), Unit(1, FFN)]
    walked = list(model_cost.walk(order))
    plain = [model_cost.cost(order[:k]) for k in range(1, len(order) + 1)]
    assert walked == pytest.approx(plain, rel=1e-10, abs=1e-13)
    assert model_cost.cost([]) == pytest.approx(0.0, abs=1e-12)


def test_model_shapley_values_add_up_to_removing_everything(model_cost):
    blocks = [Unit(b, BLOCK) for b in range(3)]
    estimate = permutation_shapley(blocks, model_cost.walk, permutations=4, seed=0)
    assert sum(estimate.values.values()) == pytest.approx(model_cost.cost(blocks), rel=1e-10)
    exact = exact_shapley(blocks, model_cost.cost)
    assert sum(exact.values()) == pytest.approx(model_cost.cost(blocks), rel=1e-10)


def test_prune_with_shapley_removes_the_lowest_values_and_records_them():
    model = tiny_model("llama")
    result = prune(model, input_ids=tiny_input_ids(), method="shapley", count=3, shapley_permutations=4,
                   progress=False)
    importance = result.record.extras["importance"]
    values = {Unit.from_dict(u): u["value"] for u in importance["units"]}
    assert len(values) == 8 and importance["permutations"] == 4
    assert result.removed == sorted(values, key=lambda u: (values[u], u.sort_key))[:3]
    assert all(u["standard_error"] is not None for u in importance["units"])
    assert result.record.method == "shapley"


def test_prune_with_shapley_on_blocks_and_only_attention():
    model = tiny_model("llama")
    blocks = prune(model, input_ids=tiny_input_ids(), method="shapley", granularity="block", count=1,
                   shapley_permutations=2, progress=False)
    assert blocks.removed[0].kind == BLOCK and len(blocks.record.extras["importance"]["units"]) == 4
    attention = prune(model, input_ids=tiny_input_ids(), method="shapley", only="attention", count=2,
                      shapley_permutations=2, shapley_truncation=0.05, progress=False)
    assert {u.kind for u in attention.removed} == {ATTENTION}
    assert attention.record.extras["importance"]["truncation"] == 0.05


def test_compare_and_the_cli_know_the_shapley_method(tmp_path):
    from finercut.cli import build_parser, run_config_from_args
    from finercut.methods import compare_entries
    from finercut.study.compare import CompareConfig

    config = CompareConfig(methods=("shapley", "shapley_block"), ratios=(0.0, 0.25))
    assert config.run_config("shapley", 0.25).method == "shapley"
    assert config.run_config("shapley_block", 0.25).granularity == "block"
    assert compare_entries()["shapley"][1].label == "Shapley (sub-layers)"
    # the Shapley settings reach the Shapley runs only: other methods' saved runs keep matching theirs
    sampled = CompareConfig(methods=("finercut", "shapley"), ratios=(0.25,),
                            method_options={"shapley": {"permutations": 4, "truncation": 0.05}})
    shapley_run, finercut_run = sampled.run_config("shapley", 0.25), sampled.run_config("finercut", 0.25)
    assert (shapley_run.options.permutations, shapley_run.options.truncation) == (4, 0.05)
    assert finercut_run == config.run_config("finercut", 0.25)
    # compare.json of an older finercut held them as fields of their own
    old = {**CompareConfig(methods=("shapley",), ratios=(0.25,)).to_dict(), "shapley_permutations": 4,
           "shapley_truncation": 0.05}
    del old["method_options"]
    assert CompareConfig.from_dict(old).run_config("shapley", 0.25) == shapley_run
    compare_args = build_parser().parse_args(["compare", "--output", str(tmp_path / "cmp"), "--methods", "shapley",
                                              "--permutations", "6", "--truncation", "0.02"])
    assert (compare_args.method_option_permutations, compare_args.method_option_truncation) == (6, 0.02)
    with pytest.raises(ConfigError, match="--truncation must be below 1"):
        CompareConfig(methods=("shapley",), ratios=(0.25,), method_options={"shapley": {"truncation": 1.0}})
    with pytest.raises(ConfigError, match="--permutations must be at least 1"):
        CompareConfig(methods=("shapley",), ratios=(0.25,), method_options={"shapley": {"permutations": 0}})
    args = build_parser().parse_args(["prune", "--output", str(tmp_path / "run"), "--method", "shapley",
                                      "--permutations", "7", "--truncation", "0.01"])
    run = run_config_from_args(args)
    assert (run.method, run.options.permutations, run.options.truncation) == ("shapley", 7, 0.01)
    with pytest.raises(ConfigError, match="--permutations is an option of method shapley, not finercut"):
        run_config_from_args(build_parser().parse_args(["prune", "--output", str(tmp_path / "run"),
                                                        "--permutations", "7"]))


def test_a_shapley_run_in_a_folder_records_the_values_and_saves_the_model(tmp_path, tiny_model_dir, word_text,
                                                                         capsys):
    import json

    from finercut.cli import main

    output = tmp_path / "run"
    assert main(["prune", "--model", str(tiny_model_dir), "--calibration", str(word_text), "--samples", "2",
                 "--seq-len", "12", "--count", "2", "--method", "shapley", "--permutations", "2", "--no-progress",
                 "--output", str(output)]) == 0
    record = json.loads((output / "record.json").read_text())
    assert record["method"] == "shapley" and len(record["importance"]["units"]) == 8
    assert record["kv_cache"]["bytes_per_token_before"] > 0
    assert (output / "model" / "config.json").is_file() and (output / "layer_map.png").is_file()
    capsys.readouterr()
    assert main(["show", str(output)]) == 0
    shown = capsys.readouterr().out
    kv = record["kv_cache"]
    assert f"KV cache per token: {kv['bytes_per_token_before']:,} -> {kv['bytes_per_token_after']:,} bytes" in shown
    assert "Shapley values: 2 permutations (seed 0), " in shown and "the 2 removed units" in shown
