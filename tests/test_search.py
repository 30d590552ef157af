"""The greedy search: fast == naive, block executions as the formula says, known-redundant units go first."""

import pytest
import torch
from tiny_models import ARCHITECTURES, LAYERS, tiny_input_ids, tiny_model

import finercut
from finercut.adapters import adapter_for
from finercut.candidates import Unit
from finercut.distances import NonFiniteOutputError, metric_named
from finercut.pruned_modeling import RemovedAttention
from finercut.scoring import FastScorer, NaiveScorer, ScoringContext
from finercut.search import greedy_search

WINDOW = dict(window_until_ratio=0.4, window_first_block=2)


def run_search(model, scorer_class, *, target=5, granularity="sublayer", metric="js", batch_size=2, **window):
    context = ScoringContext.build(model, adapter_for(model), metric_named(metric), tiny_input_ids(),
                                   batch_size=batch_size)
    try:
        return greedy_search(scorer_class(context), num_blocks=LAYERS, granularity=granularity, target=target,
                             **(window or WINDOW))
    finally:
        context.close()


def assert_same_search(fast, naive):
    assert [s.unit for s in fast] == [s.unit for s in naive]
    for fast_step, naive_step in zip(fast, naive):
        assert [u for u, _ in fast_step.candidates] == [u for u, _ in naive_step.candidates]
        torch.testing.assert_close(
            torch.tensor([d for _, d in fast_step.candidates], dtype=torch.float64),
            torch.tensor([d for _, d in naive_step.candidates], dtype=torch.float64),
            rtol=1e-6, atol=1e-12,
        )


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_fast_search_equals_naive_search_in_float64(name):
    model = tiny_model(name, dtype=torch.float64)
    fast = run_search(model, FastScorer)
    naive = run_search(model, NaiveScorer)
    assert_same_search(fast, naive)
    assert len(fast) == 5 and all(s.distance > 0 for s in fast)


@pytest.mark.parametrize("metric", ["angular", "euclidean", "js_official"])
def test_fast_equals_naive_for_every_metric(metric):
    model = tiny_model("llama", dtype=torch.float64)
    assert_same_search(run_search(model, FastScorer, metric=metric), run_search(model, NaiveScorer, metric=metric))


def test_block_level_fast_equals_naive():
    model = tiny_model("qwen3", dtype=torch.float64)
    fast = run_search(model, FastScorer, target=2, granularity="block", window_until_ratio=0.4, window_first_block=1)
    naive = run_search(model, NaiveScorer, target=2, granularity="block", window_until_ratio=0.4, window_first_block=1)
    assert_same_search(fast, naive)
    assert all(step.unit.kind == "block" for step in fast)


def test_block_executions_follow_the_formula():
    # Fast: a step first refreshes the cached block inputs after the last removal at block q (blocks q..L-2,
    # all L-1 on the first step), then a candidate at block p replays blocks p..L-1. Naive: L per candidate.
    model = tiny_model("llama", dtype=torch.float64)
    fast = run_search(model, FastScorer, target=6, window_until_ratio=1.0, window_first_block=1)
    naive = run_search(model, NaiveScorer, target=6, window_until_ratio=1.0, window_first_block=1)
    previous_block = 0
    for step in fast:
        refresh = LAYERS - 1 - previous_block
        replays = sum(LAYERS - unit.block for unit, _ in step.candidates)
        assert step.block_executions == refresh + replays
        previous_block = step.unit.block
    for step in naive:
        assert step.block_executions == LAYERS * len(step.candidates)
    assert sum(s.block_executions for s in fast) < sum(s.block_executions for s in naive)


def test_exactly_redundant_sublayers_are_removed_first_earliest_on_ties():
    model = tiny_model("llama", dtype=torch.float64)
    with torch.no_grad():  # make block 3's attention and block 2's FFN add exactly zero
        model.model.layers[3].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    steps = run_search(model, FastScorer, target=3)
    assert [s.unit for s in steps[:2]] == [Unit(2, "ffn"), Unit(3, "attention")]
    assert steps[0].distance == 0.0 and steps[1].distance == 0.0
    assert steps[2].distance > 0.0


def test_shorter_run_is_a_prefix_of_a_longer_one():
    model = tiny_model("mistral", dtype=torch.float64)
    short = run_search(model, FastScorer, target=2)
    long = run_search(model, FastScorer, target=6)
    assert [s.unit for s in long[:2]] == [s.unit for s in short]
    assert [s.distance for s in long[:2]] == [s.distance for s in short]


def test_resuming_evaluates_only_the_remaining_steps_at_the_same_cost():
    model = tiny_model("llama", dtype=torch.float64)
    full = run_search(model, FastScorer, target=4)
    context = ScoringContext.build(model, adapter_for(model), metric_named("js"), tiny_input_ids(), batch_size=2)
    seen = []
    try:
        resumed = greedy_search(FastScorer(context), num_blocks=LAYERS, granularity="sublayer", target=4,
                                completed=full[:2], on_step=seen.append, **WINDOW)
    finally:
        context.close()
    assert [s.index for s in seen] == [2, 3]
    assert [(s.unit, s.distance, s.candidates, s.block_executions) for s in resumed] == [
        (s.unit, s.distance, s.candidates, s.block_executions) for s in full]


def test_nan_logits_stop_the_search_naming_step_and_candidate(monkeypatch):
    model = tiny_model("llama")

    def overflowing(self, hidden_states, *args, **kwargs):
        return torch.full_like(hidden_states, float("nan")), None

    monkeypatch.setattr(RemovedAttention, "forward", overflowing)
    with pytest.raises(NonFiniteOutputError, match=r"step 1: candidate 2\.attn .*bfloat16 or float32"):
        run_search(model, FastScorer, target=1)


def test_prune_api_returns_a_complete_record():
    model = tiny_model("gpt2")
    result = finercut.prune(model, input_ids=tiny_input_ids(), ratio=0.25, progress=False)
    record = result.record
    assert record["reached"]["count"] == 2 and record["reached"]["ratio"] == 0.25
    assert [Unit.from_dict(entry) for entry in record["removed"]] == result.removed
    assert record["calibration"]["source"] == "tensor" and record["calibration"]["num_samples"] == 3
    step = record["steps"][0]
    assert set(step) == {"step", "removed", "distance", "window_first_block", "block_executions", "seconds",
                         "candidates"}
    assert len(step["candidates"]) == 2 * (LAYERS - 2)  # window: blocks ceil(0.4 * 4) = 2 and 3
    for key in ("torch", "transformers", "finercut", "threads"):
        assert key in record["environment"]
