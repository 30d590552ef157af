"""The greedy search: fast (early abort, exhaustive) == naive, block executions as the formula says, known-redundant
units go first, the record counts the samples each candidate was scored on."""

import dataclasses

import pytest
import torch
from tiny_models import ARCHITECTURES, HIDDEN, LAYERS, SEQ, VOCAB, tiny_input_ids, tiny_model

import finercut
from finercut.adapters import adapter_for
from finercut.candidates import Unit
from finercut.distances import NonFiniteOutputError, metric_named
from finercut.masking import masked
from finercut.pruned_modeling import RemovedAttention
from finercut.scoring import FastScorer, NaiveScorer, ScoringContext
from finercut.search import greedy_search

WINDOW = dict(window_until_ratio=0.4, window_first_block=2)


def run_search(model, scorer_class, *, target=5, granularity="sublayer", metric="js", batch_size=2, samples=3,
               exhaustive=False, build=None, scorer_options=None, **window):
    context = ScoringContext.build(model, adapter_for(model), metric_named(metric), tiny_input_ids(samples=samples),
                                   batch_size=batch_size, **(build or {}))
    try:
        return greedy_search(scorer_class(context, exhaustive=exhaustive, **(scorer_options or {})), num_blocks=LAYERS,
                             granularity=granularity, target=target, **(window or WINDOW))
    finally:
        context.close()


def assert_same_search(fast, naive, *, rtol=1e-6):
    """Same removals; every distance the fast path completed equals the naive one; every aborted bound is at
    least the winner's distance and at most the candidate's naive distance."""
    assert [s.unit for s in fast] == [s.unit for s in naive]
    for fast_step, naive_step in zip(fast, naive):
        assert [c.unit for c in fast_step.candidates] == [c.unit for c in naive_step.candidates]
        assert fast_step.distance == pytest.approx(naive_step.distance, rel=rtol, abs=1e-12)
        for fast_score, naive_score in zip(fast_step.candidates, naive_step.candidates):
            if fast_score.distance is not None:
                assert fast_score.distance == pytest.approx(naive_score.distance, rel=rtol, abs=1e-12)
            else:
                assert fast_score.lower_bound >= fast_step.distance
                assert fast_score.lower_bound <= naive_score.distance * (1 + rtol) + 1e-12


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_fast_search_equals_naive_search_in_float64(name):
    model = tiny_model(name, dtype=torch.float64)
    fast = run_search(model, FastScorer, batch_size=1, samples=4)
    exhaustive = run_search(model, FastScorer, batch_size=1, samples=4, exhaustive=True)
    naive = run_search(model, NaiveScorer, batch_size=1, samples=4)
    assert_same_search(fast, naive)
    assert_same_search(exhaustive, naive)
    # The early abort changes nothing but the work: the winners' distances are bit-identical to exhaustive.
    assert [(s.unit, s.distance) for s in fast] == [(s.unit, s.distance) for s in exhaustive]
    assert all(c.distance is not None for s in exhaustive for c in s.candidates)
    assert len(fast) == 5 and all(s.distance > 0 for s in fast)


@pytest.mark.parametrize("metric", ["angular", "euclidean", "js_official"])
def test_fast_equals_naive_for_every_metric(metric):
    model = tiny_model("llama", dtype=torch.float64)
    naive = run_search(model, NaiveScorer, metric=metric)
    assert_same_search(run_search(model, FastScorer, metric=metric), naive)
    assert_same_search(run_search(model, FastScorer, metric=metric, exhaustive=True), naive)


@pytest.mark.parametrize("metric", ["js", "angular"])
@pytest.mark.parametrize("build", [
    {"chunk_bytes": 5 * VOCAB * 4},  # 5 positions per head chunk: 5 chunks per batch of 2 x 12 positions
    {"max_reference_bytes": 0},  # the original side recomputed for every chunk instead of kept
    {"chunk_bytes": 7 * VOCAB * 4, "max_reference_bytes": 0},
], ids=["several-chunks", "recomputed-reference", "both"])
def test_fast_equals_naive_with_several_head_chunks_and_a_recomputed_reference(metric, build):
    model = tiny_model("qwen2", dtype=torch.float64)
    if metric == "angular":  # the full-head path: a biased head has no vocabulary-free form
        model.lm_head.bias = torch.nn.Parameter(0.1 * torch.randn(VOCAB, dtype=torch.float64))
    naive = run_search(model, NaiveScorer, metric=metric, build=build)
    fast = run_search(model, FastScorer, metric=metric, build=build)
    exhaustive = run_search(model, FastScorer, metric=metric, build=build, exhaustive=True)
    assert_same_search(fast, naive)
    assert_same_search(exhaustive, naive)
    context = ScoringContext.build(model, adapter_for(model), metric_named(metric), tiny_input_ids(), batch_size=2,
                                   **build)
    assert context.reference.keeps_prepared == ("max_reference_bytes" not in build)
    assert FastScorer(context).distance_path == "full_head"
    context.close()


def test_the_naive_scorer_uses_the_plain_distance_functions():
    # Prepared forms that fail if called: the naive scorer must not touch them, and its distances are exactly
    # what the plain function gives on the full logits of the masked model's own forward.
    plain = metric_named("js")
    calls = []

    def recording_distance(ref_logits, logits):
        calls.append(logits.shape)
        return plain.distance(ref_logits, logits)

    def refuse(*args):
        raise AssertionError("the naive scorer used a prepared form")

    metric = dataclasses.replace(plain, distance=recording_distance, prepare=refuse, per_position=refuse,
                                 gram=refuse)
    model = tiny_model("llama", dtype=torch.float64)
    input_ids = tiny_input_ids()
    context = ScoringContext.build(model, adapter_for(model), metric, input_ids, batch_size=3)
    unit = Unit(3, "ffn")
    try:
        (score,) = NaiveScorer(context).score([], [unit])
    finally:
        context.close()
    assert calls and all(shape[-1] == VOCAB for shape in calls)
    with torch.no_grad():
        reference = model(input_ids).logits
        with masked(model, adapter_for(model), [unit]):
            pruned = model(input_ids).logits
    assert score.distance == pytest.approx(float(plain.distance(reference, pruned).mean()), rel=1e-12)
    assert score.samples == 3 and not score.aborted


def test_block_level_fast_equals_naive():
    model = tiny_model("qwen3", dtype=torch.float64)
    fast = run_search(model, FastScorer, target=2, granularity="block", window_until_ratio=0.4, window_first_block=1)
    naive = run_search(model, NaiveScorer, target=2, granularity="block", window_until_ratio=0.4, window_first_block=1)
    assert_same_search(fast, naive)
    assert all(step.unit.kind == "block" for step in fast)


def test_block_executions_follow_the_formula():
    # Without replay states: a step first refreshes the cached block inputs after the last removal at block q
    # (blocks q..L-2, all L-1 on the first step), then a candidate at block p replays blocks p..L-1 (every
    # candidate on every sample when exhaustive). Naive: L per candidate.
    model = tiny_model("llama", dtype=torch.float64)
    options = dict(target=6, exhaustive=True, window_until_ratio=1.0, window_first_block=1)
    fast = run_search(model, FastScorer, scorer_options={"replay_state_bytes": 0}, **options)
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


def test_replay_states_cut_the_block_executions_to_the_formula():
    # With replay states: after the first step (blocks 0..L-2 to fill the cache) the refresh takes the winner's
    # states and runs no block, and a candidate at block p
    # that was a candidate in the previous step resumes from its state at the input of the previous winner's
    # block q when q > p (blocks q..L-1), else replays p..L-1.
    model = tiny_model("llama", dtype=torch.float64)
    options = dict(target=6, exhaustive=True, window_until_ratio=1.0, window_first_block=1)
    kept = run_search(model, FastScorer, **options)
    plain = run_search(model, FastScorer, scorer_options={"replay_state_bytes": 0}, **options)
    assert [(s.unit, s.candidates) for s in kept] == [(s.unit, s.candidates) for s in plain]  # bit for bit
    previous = None
    for step in kept:
        earlier = {c.unit for c in previous.candidates} if previous else set()
        replays = sum(LAYERS - (max(c.unit.block, previous.unit.block) if c.unit in earlier else c.unit.block)
                      for c in step.candidates)
        refresh = LAYERS - 1 if previous is None else 0
        assert step.block_executions == refresh + replays
        previous = step
    assert sum(s.block_executions for s in kept) < sum(s.block_executions for s in plain)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("state_bytes", [None, 12 * 2 * SEQ * HIDDEN * 8])  # default; room for 12 states (stride 2)
def test_replay_states_change_no_result(arch, state_bytes):
    """The states kept across steps are the very tensors a replay would compute: the records are identical,
    early abort included, whether all, a few (stride and budget) or none of them are kept."""
    model = tiny_model(arch, dtype=torch.float64)
    options = {} if state_bytes is None else {"replay_state_bytes": state_bytes}
    kept = run_search(model, FastScorer, target=6, scorer_options=options)
    plain = run_search(model, FastScorer, target=6, scorer_options={"replay_state_bytes": 0})
    assert [(s.unit, s.distance, s.candidates) for s in kept] == [(s.unit, s.distance, s.candidates) for s in plain]
    assert sum(s.block_executions for s in kept) < sum(s.block_executions for s in plain)


def test_exactly_redundant_sublayers_are_removed_first_earliest_on_ties():
    model = tiny_model("llama", dtype=torch.float64)
    with torch.no_grad():  # make block 3's attention and block 2's FFN add exactly zero
        model.model.layers[3].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    steps = run_search(model, FastScorer, target=3)
    assert [s.unit for s in steps[:2]] == [Unit(2, "ffn"), Unit(3, "attention")]
    # The output is bit-identical to the original's: JS is 0 up to the rounding of log(exp(x)) vs x.
    assert steps[0].distance < 1e-14 and steps[1].distance < 1e-14
    assert steps[2].distance > 1e-6


def test_shorter_run_is_a_prefix_of_a_longer_one():
    model = tiny_model("mistral", dtype=torch.float64)
    short = run_search(model, FastScorer, target=2)
    long = run_search(model, FastScorer, target=6)
    assert [s.unit for s in long[:2]] == [s.unit for s in short]
    assert [s.distance for s in long[:2]] == [s.distance for s in short]


def test_resuming_evaluates_only_the_remaining_steps_with_the_same_results():
    model = tiny_model("llama", dtype=torch.float64)
    full = run_search(model, FastScorer, target=4)
    without_states = run_search(model, FastScorer, target=4, scorer_options={"replay_state_bytes": 0})
    context = ScoringContext.build(model, adapter_for(model), metric_named("js"), tiny_input_ids(), batch_size=2)
    seen = []
    try:
        resumed = greedy_search(FastScorer(context), num_blocks=LAYERS, granularity="sublayer", target=4,
                                completed=full[:2], on_step=seen.append, **WINDOW)
    finally:
        context.close()
    assert [s.index for s in seen] == [2, 3]
    assert [(s.unit, s.distance, s.candidates) for s in resumed] == [(s.unit, s.distance, s.candidates) for s in full]
    # The replay states of the step before the crash are gone: the first resumed step costs what it costs
    # without them; the next one has its own again and costs what it costs in the uninterrupted run.
    assert resumed[2].block_executions == without_states[2].block_executions
    assert resumed[3].block_executions == full[3].block_executions


def test_a_search_driven_one_step_at_a_time_costs_what_one_call_costs():
    # Each call after the first goes through restore(): on the scorer that ran the steps before, it keeps the
    # block-input cache and the replay states.
    model = tiny_model("llama", dtype=torch.float64)
    whole = run_search(model, FastScorer, target=4)
    context = ScoringContext.build(model, adapter_for(model), metric_named("js"), tiny_input_ids(), batch_size=2)
    scorer, steps = FastScorer(context), []
    try:
        for count in range(1, 5):
            steps = greedy_search(scorer, num_blocks=LAYERS, granularity="sublayer", target=count,
                                  completed=steps, **WINDOW)
    finally:
        context.close()
    assert [(s.unit, s.candidates, s.block_executions) for s in steps] == [
        (s.unit, s.candidates, s.block_executions) for s in whole]


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
    record = result.record.to_dict()
    assert record["reached"]["count"] == 2 and record["reached"]["ratio"] == 0.25
    assert [Unit.from_dict(entry) for entry in record["removed"]] == result.removed
    assert record["calibration"]["source"] == "tensor" and record["calibration"]["num_samples"] == 3
    step = record["steps"][0]
    assert set(step) == {"step", "removed", "distance", "window_first_block", "block_executions", "seconds",
                         "samples_evaluated", "aborted", "candidates"}
    assert len(step["candidates"]) == 2 * (LAYERS - 2)  # window: blocks ceil(0.4 * 4) = 2 and 3
    assert step["samples_evaluated"] == sum(c["samples"] for c in step["candidates"])
    assert record["scoring"]["distance_path"] == "full_head" and record["scoring"]["early_abort"]
    assert record["scoring"]["samples_per_batch"] == 1
    for key in ("torch", "transformers", "finercut", "threads"):
        assert key in record["environment"]
