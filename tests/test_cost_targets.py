"""Cost targets in the search and the runs: the budgeted greedy search equals the plain one of finercut.budgets
(early abort included, exact under distance per cost), it stops at the first step that meets the target, the
record's costs equal the statistics module's counts, and the CLI options refuse bad input early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_early_abort import run_best_first as run_best_first_over
from tiny_models import LAYERS, tiny_input_ids, tiny_model

from finercut.adapters import adapter_for
from finercut.budgets import CostModel, cost_aware_greedy, distance_per_cost, select_least_per_cost
from finercut.candidates import Unit, all_units, select_least
from finercut.checkpoint import apply_removal, parameter_stats
from finercut.cli import main
from finercut.distances import metric_named
from finercut.evaluation.stats import count_macs, kv_cache_bytes_per_token
from finercut.pruned_modeling import ATTENTION, FFN
from finercut.record import ConfigError, RunConfig, config_differences
from finercut.scoring import FastScorer, NaiveScorer, ScoringContext
from finercut.search import Budget, greedy_search

A, B, C = Unit(2, ATTENTION), Unit(2, FFN), Unit(3, ATTENTION)
NO_WINDOW = dict(window_until_ratio=0.4, window_first_block=0)


# ---------------------------------------------------------------------------------------------------------------------
# Early abort under distance per cost


def run_best_first(table, savings, *, num_positions, exhaustive=False):
    return run_best_first_over(table, num_positions=num_positions, exhaustive=exhaustive, savings=savings)


def test_the_abort_keeps_the_least_distance_per_cost_complete_not_the_least_distance():
    # Distances A 1, B 2, C 6; savings 1, 4, 4 -> d/s 1, 0.5, 1.5: B wins although A has the least distance.
    # Under the plain threshold (distance), B would be aborted once its bound passed A's distance 1.
    table = {A: [0.5, 0.5], B: [1.5, 0.5], C: [5.0, 1.0]}
    savings = {A: 1.0, B: 4.0, C: 4.0}
    result, calls = run_best_first(table, savings, num_positions=2)
    complete = [(u, r.value(2)) for u, r in result.items() if r.complete]
    assert select_least_per_cost(complete, savings.get) == (B, 1.0)
    # C's bound per cost after one sample (2.5 / 4) is above B's 0.5: aborted after one sample, rightly.
    assert [i for u, i in calls if u == C] == [0] and not result[C].complete
    assert distance_per_cost(result[C].value(2), 4.0) > 0.5
    plain, _ = run_best_first(table, {u: 1.0 for u in table}, num_positions=2)
    assert select_least([(u, r.value(2)) for u, r in plain.items() if r.complete]) == (A, 0.5)


def test_an_exact_tie_in_distance_per_cost_goes_to_the_earlier_unit():
    # A: d 1, s 1; B: d 2, s 2 -> both 1. B completes first (its first sample is 0); A must not be aborted.
    table = {A: [2.0, 0.0], B: [0.0, 4.0]}
    result, _ = run_best_first(table, {A: 1.0, B: 2.0}, num_positions=2)
    complete = [(u, r.value(2)) for u, r in result.items() if r.complete]
    assert select_least_per_cost(complete, {A: 1.0, B: 2.0}.get) == (A, 1.0)


def test_candidates_that_save_nothing_are_refused_by_the_scorer_order():
    with pytest.raises(ValueError, match="positive cost"):
        run_best_first({A: [1.0], B: [1.0]}, {A: 1.0, B: 0.0}, num_positions=1)


# ---------------------------------------------------------------------------------------------------------------------
# The budgeted search on a tiny model equals budgets.cost_aware_greedy


def hand_costs() -> CostModel:
    """Hand-set savings that make distance per cost pick other units than least distance: FFNs are cheap to
    lose (small distance) but save little, late attention saves much."""
    savings = {Unit(b, kind): (1.0 if kind == FFN else 3.0 + b) for b in range(LAYERS) for kind in (ATTENTION, FFN)}
    return CostModel("params", 40.0, savings)


def budget_search(model, scorer_class, budget, *, exhaustive=False, samples=4, granularity="sublayer", **window):
    context = ScoringContext.build(model, adapter_for(model), metric_named("js"), tiny_input_ids(samples=samples),
                                   batch_size=1)
    try:
        return greedy_search(scorer_class(context, exhaustive=exhaustive), num_blocks=LAYERS,
                             granularity=granularity, budget=budget, **(window or NO_WINDOW))
    finally:
        context.close()


@pytest.fixture(scope="module")
def model64():
    return tiny_model("llama", dtype=torch.float64)


def naive_score_function(model, samples=4):
    """``score(removed, candidates)`` of budgets.cost_aware_greedy: the naive scorer, every distance complete."""
    context = ScoringContext.build(model, adapter_for(model), metric_named("js"), tiny_input_ids(samples=samples),
                                   batch_size=1)
    scorer = NaiveScorer(context)
    return context, lambda removed, candidates: [(c.unit, c.distance) for c in scorer.score(removed, candidates)]


def test_budget_search_equals_the_plain_cost_aware_greedy_in_float64(model64, one_thread):
    cost, fraction = hand_costs(), 0.55
    context, score = naive_score_function(model64)
    try:
        plain = cost_aware_greedy(all_units(LAYERS, "sublayer"), score, cost, fraction)
    finally:
        context.close()
    fast = budget_search(model64, FastScorer, Budget(cost, fraction))
    exhaustive = budget_search(model64, FastScorer, Budget(cost, fraction), exhaustive=True)
    naive = budget_search(model64, NaiveScorer, Budget(cost, fraction))
    assert [s.unit for s in fast] == [s.unit for s in plain] == [s.unit for s in naive]
    assert [s.distance for s in fast] == pytest.approx([s.distance for s in plain], rel=1e-9)
    # The abort changes only the work: the winners' distances are bit-identical to scoring everything.
    assert [(s.unit, s.distance) for s in fast] == [(s.unit, s.distance) for s in exhaustive]
    assert sum(c.aborted for s in fast for c in s.candidates) > 0, "the abort must actually have been exercised"
    for step in fast:  # an aborted candidate's bound per cost is at least the winner's distance per cost
        best = distance_per_cost(step.distance, cost.saving(step.unit))
        assert all(distance_per_cost(c.lower_bound, cost.saving(c.unit)) >= best for c in step.candidates
                   if c.aborted)
    # The rule matters: least distance alone removes other units first (the test can fail).
    uniform = CostModel("params", 8.0, {u: 1.0 for u in cost.savings})  # every unit costs the same
    plain_rule = budget_search(model64, FastScorer, Budget(uniform, 1 - len(fast) / 8))
    assert len(plain_rule) == len(fast) and [s.unit for s in plain_rule] != [s.unit for s in fast]


def test_the_run_stops_at_the_first_step_that_meets_the_target(model64, one_thread):
    cost = hand_costs()
    for fraction in (0.9, 0.7, 0.5):
        steps = budget_search(model64, FastScorer, Budget(cost, fraction), samples=2)
        left = cost.trajectory([s.unit for s in steps])
        assert left[-1] <= fraction and all(value > fraction for value in left[:-1])


def test_units_that_save_nothing_are_never_candidates_and_the_window_counts_units(model64, one_thread):
    kv = CostModel("kv_cache", 4.0, {Unit(b, kind): (1.0 if kind == ATTENTION else 0.0) for b in range(LAYERS)
                                     for kind in (ATTENTION, FFN)})
    steps = budget_search(model64, FastScorer, Budget(kv, 0.5), samples=2, window_until_ratio=0.4,
                          window_first_block=2)
    assert all(c.unit.kind == ATTENTION for s in steps for c in s.candidates)
    # 2 removals out of 8 units: the window (blocks >= 2) holds for both steps, as for a --ratio run.
    assert {s.unit for s in steps} == {Unit(2, ATTENTION), Unit(3, ATTENTION)}
    assert all(s.window_first_block == 2 for s in steps)


def test_an_unreachable_budget_is_refused_before_any_scoring():
    class NoScorer:
        block_executions = 0

        def score(self, *args, **kwargs):
            raise AssertionError("nothing may be scored")

    kv = CostModel("kv_cache", 4.0, {Unit(b, k): (1.0 if k == ATTENTION else 0.0) for b in range(LAYERS)
                                     for k in (ATTENTION, FFN)})
    with pytest.raises(ValueError, match="cannot be met"):
        greedy_search(NoScorer(), num_blocks=LAYERS, granularity="sublayer", budget=Budget(kv, 0.5), only="ffn",
                      **NO_WINDOW)
    with pytest.raises(ValueError, match="exactly one of target and budget"):
        greedy_search(NoScorer(), num_blocks=LAYERS, granularity="sublayer", target=2, budget=Budget(kv, 0.5),
                      **NO_WINDOW)


# ---------------------------------------------------------------------------------------------------------------------
# The run config


def test_run_config_cost_fields_and_old_run_files():
    old = RunConfig(ratio=0.25).to_dict()
    for name in ("cost_target", "cost_fraction", "cost_context"):
        old.pop(name)
    assert RunConfig.from_dict(old) == RunConfig(ratio=0.25)  # a run.json written before cost targets
    params = RunConfig(cost_target="params", cost_fraction=0.7)
    # A smaller fraction of the same measure extends the run; another measure or a count is another rule.
    assert config_differences(params, params.replace(cost_fraction=0.5)) == []
    assert config_differences(params, params.replace(cost_target="kv_cache")) == [
        "cost_target: 'params' -> 'kv_cache'"]
    assert "cost_target: 'params' -> None" in config_differences(params, RunConfig(count=3))
    for bad, message in [
        (dict(cost_target="params", cost_fraction=0.7, ratio=0.2), "exactly one of ratio, count and a cost target"),
        (dict(cost_target="flops", cost_fraction=0.7), "unknown cost_target 'flops'"),
        (dict(cost_target="params"), "in (0, 1), got None"),
        (dict(cost_target="params", cost_fraction=1.0), "in (0, 1), got 1.0"),
        (dict(cost_target="macs", cost_fraction=0.5), "--context T"),
        (dict(cost_target="params", cost_fraction=0.5, cost_context=8), "does not use it"),
        (dict(ratio=0.2, cost_fraction=0.5), "need a cost target"),
        (dict(cost_target="params", cost_fraction=0.5, method="random"), "needs method finercut"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            RunConfig(**bad)


# ---------------------------------------------------------------------------------------------------------------------
# Runs from the command line


def prune_args(model_dir: Path, text: Path, output: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(model_dir), "--calibration", str(text), "--samples", "3", "--seq-len", "12",
            "--threads", "1", "--no-progress", "--no-save-model", "--output", str(output), *extra]


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def params_run(tmp_path_factory, tiny_model_dir, word_text) -> Path:
    output = tmp_path_factory.mktemp("cost-runs") / "params"
    assert main(prune_args(tiny_model_dir, word_text, output, "--target-params", "0.6")) == 0
    return output


@pytest.mark.parametrize("option, value, extra", [
    ("--target-params", "0.6", ()), ("--target-macs", "0.6", ("--context", "20")),
    ("--target-kv-cache", "0.6", ()), ("--target-latency", "0.7", ()),
])
def test_the_recorded_costs_equal_the_statistics_of_the_pruned_model(tmp_path, tiny_model_dir, word_text, params_run,
                                                                     option, value, extra, monkeypatch):
    # Latency on a tiny model is mostly framework overhead and varies with the machine's load: hand-set timings
    # keep the stop step deterministic (the measurement itself is recorded all the same).
    def fixed_latency(model, input_ids, **options):
        return {unit: 1e-3 if unit.kind == ATTENTION else 2e-3 for unit in all_units(LAYERS, "sublayer")}, 1e-3

    monkeypatch.setattr("finercut.budgets.measure_sublayer_latency", fixed_latency)
    output = params_run if option == "--target-params" else tmp_path / "run"
    if option != "--target-params":
        assert main(prune_args(tiny_model_dir, word_text, output, option, value, *extra)) == 0
    record = read(output / "record.json")
    measure = record["cost_target"]["measure"]
    trajectory = record["cost_trajectory"]
    assert len(trajectory) == len(record["steps"]) and trajectory[-1][measure] <= float(value)
    assert all(row[measure] > float(value) for row in trajectory[:-1])  # stopped at the first step that met it
    assert record["cost_target"]["reached"] == trajectory[-1][measure]

    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    context = int(extra[1]) if extra else 12  # MACs count over --context, else the calibration length
    totals = {"params": parameter_stats(dense).total_parameters, "kv_cache": kv_cache_bytes_per_token(dense),
              "macs": count_macs(dense, context_length=context)["total"]}
    assert {k: record["cost_model"]["dense"][k] for k in totals} == totals
    pruned = apply_removal(dense, [Unit.from_dict(u) for u in record["removed"]], num_blocks=LAYERS) or dense
    pruned_totals = {"params": parameter_stats(pruned).total_parameters, "kv_cache": kv_cache_bytes_per_token(pruned),
                     "macs": count_macs(pruned, context_length=context)["total"]}
    for key, total in pruned_totals.items():
        assert trajectory[-1][key] == pytest.approx(total / totals[key], rel=1e-12), key
    latency = record["cost_model"]["latency"]
    assert latency["threads"] == 1 and latency["device"] == "cpu" and latency["repeats"] >= 1
    assert all(entry["latency"] >= 0 for entry in record["cost_model"]["savings"])
    assert 0 < trajectory[-1]["latency"] < 1


def test_a_smaller_fraction_extends_a_finished_run_and_a_larger_one_is_refused(capsys, tmp_path, tiny_model_dir,
                                                                                word_text, params_run):
    output = tmp_path / "extended"
    assert main(prune_args(tiny_model_dir, word_text, output, "--target-params", "0.8")) == 0
    first = read(output / "record.json")
    assert main(prune_args(tiny_model_dir, word_text, output, "--target-params", "0.6")) == 0
    extended, direct = read(output / "record.json"), read(params_run / "record.json")
    assert extended["removed"] == direct["removed"] and len(first["removed"]) < len(extended["removed"])
    assert extended["timings"]["resumed_steps"] == len(first["removed"])
    # The resumed run reused the latency measured before its first step.
    assert extended["cost_model"]["latency"] == first["cost_model"]["latency"]
    capsys.readouterr()
    assert main(prune_args(tiny_model_dir, word_text, output, "--target-params", "0.95")) == 2
    assert "a params target of 95.0% was met after 1 of them and needs a new --output folder" in \
        capsys.readouterr().err
    assert main(prune_args(tiny_model_dir, word_text, output, "--count", "2")) == 2
    assert "cost_target: 'params' -> None" in capsys.readouterr().err


def test_show_prints_the_pareto_front(capsys, params_run):
    capsys.readouterr()
    assert main(["show", str(params_run)]) == 0
    out = capsys.readouterr().out
    assert "cost target: params <= 60.0% of the dense model" in out
    assert "Pareto front, distance vs params" in out
    record = read(params_run / "record.json")
    last = record["steps"][-1]
    assert f"{record['cost_trajectory'][-1]['params']:8.2%}" in out and f"{last['distance']:9.4g}" in out


@pytest.mark.parametrize("extra, message", [
    (("--target-params", "0"), "a cost target is a fraction of the dense model in (0, 1), got 0.0"),
    (("--target-latency", "1"), "in (0, 1), got 1.0"),
    (("--target-macs", "0.5"), "a MACs target needs the context length it is counted for: --context T"),
    (("--target-params", "0.5", "--context", "8"), "a params target does not use it"),
    (("--target-params", "0.5", "--ratio", "0.2"), "not allowed with argument"),
    (("--target-params", "0.5", "--method", "shortgpt", "--granularity", "block"), "needs method finercut"),
    (("--target-params", "0.01"), "a params target of 1.0% cannot be met: removing every candidate leaves"),
    (("--target-kv-cache", "0.5", "--only", "ffn"), "cannot be met: removing every candidate leaves 100.0%"),
])
def test_bad_cost_targets_are_refused_early_and_write_nothing(capsys, tmp_path, tiny_model_dir, word_text, extra,
                                                               message):
    output = tmp_path / "out"
    if "not allowed" in message:  # argparse's own refusal of two targets
        with pytest.raises(SystemExit):
            main(prune_args(tiny_model_dir, word_text, output, *extra))
    else:
        assert main(prune_args(tiny_model_dir, word_text, output, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_a_prefix_of_a_cost_run_cuts_its_trajectory(params_run):
    from finercut.record import read_record

    record = read(params_run / "record.json")
    prefix = read_record(params_run).prefix(1).to_dict()
    assert prefix["cost_trajectory"] == record["cost_trajectory"][:1]
    assert prefix["cost_target"]["reached"] == record["cost_trajectory"][0]["params"]


def test_the_prune_api_takes_a_cost_target(one_thread):
    import finercut

    model = tiny_model("llama")
    result = finercut.prune(model, input_ids=tiny_input_ids(samples=2), cost_target="kv_cache", cost_fraction=0.5,
                            progress=False)
    record = result.record.to_dict()
    assert all(unit.kind == ATTENTION for unit in result.removed)  # FFNs hold no KV cache: never candidates
    assert record["cost_trajectory"][-1]["kv_cache"] == 0.5 and len(result.removed) == 2
    assert record["target"]["count"] == 2 and record["cost_target"]["measure"] == "kv_cache"
    with pytest.raises(ConfigError, match="cannot be met"):
        finercut.prune(model, input_ids=tiny_input_ids(samples=2), cost_target="kv_cache", cost_fraction=0.5,
                       only="ffn", progress=False)


class FixedScorer:
    """Scores from a table, every candidate complete (for the search's own rules)."""

    block_executions = 0

    def __init__(self, distances):
        self.distances = distances

    def restore(self, removed):
        pass

    def score(self, removed, candidates, *, previous=(), on_candidate=None, savings=None):
        from finercut.search import CandidateScore

        return [CandidateScore(unit, self.distances[unit]) for unit in candidates]


def test_a_target_that_needs_every_candidate_removed_is_refused():
    blocks = [Unit(b, "block") for b in range(3)]
    savings = {Unit(b, kind): (0.0 if kind == FFN else s) for b, s in enumerate((1.0, 1.0, 10.0))
               for kind in (ATTENTION, FFN)}
    cost = CostModel("params", 12.0, savings)
    scorer = FixedScorer({blocks[0]: 0.001, blocks[1]: 0.001, blocks[2]: 100.0})
    # Before scoring: removing all but the cheapest unit leaves 1/12 > 5%.
    with pytest.raises(ConfigError, match="needs every candidate removed, which leaves no model"):
        greedy_search(scorer, num_blocks=3, granularity="block", budget=Budget(cost, 0.05), **NO_WINDOW)
    # Reachable with two removals (blocks 1 and 2), but the greedy path takes blocks 0 and 1 first and would
    # then need the last one: refused at that step.
    with pytest.raises(ConfigError, match="step 3: the params target of 8.4% is not met before the last candidate"):
        greedy_search(scorer, num_blocks=3, granularity="block", budget=Budget(cost, 0.084), **NO_WINDOW)
    steps = greedy_search(scorer, num_blocks=3, granularity="block", budget=Budget(cost, 0.9), **NO_WINDOW)
    assert [s.unit for s in steps] == [blocks[0], blocks[1]]  # 10/12 <= 90%: two steps
