"""Exact early abort: the bound, the order it is applied in, and that it never changes what is selected."""

import pytest
import torch
from tiny_models import LAYERS, tiny_input_ids, tiny_model

from finercut.adapters import adapter_for
from finercut.candidates import Unit, select_least
from finercut.distances import metric_named
from finercut.scoring import FastScorer, ScoringContext, best_first, lower_bound, sample_order
from finercut.search import greedy_search

A, B, C = Unit(2, "attention"), Unit(2, "ffn"), Unit(3, "attention")


def run_best_first(table, *, num_positions, exhaustive=False, savings=None, score_of=None):
    """best_first over units whose per-batch sums are given by ``table`` (unit -> list), recording the calls;
    ``savings`` (unit -> cost saved) ranks them by distance per cost."""
    calls = []

    def batch_sum(unit, index):
        calls.append((unit, index))
        return table[unit][index]

    units = list(table)
    result = best_first(units, batch_sum, num_batches=len(table[units[0]]), num_positions=num_positions,
                        exhaustive=exhaustive, savings=savings.get if savings else None, score_of=score_of)
    return result, calls


def selected(result, num_positions):
    return select_least([(u, r.value(num_positions)) for u, r in result.items() if r.complete])


def test_lower_bound_divides_the_partial_sum_by_all_positions():
    assert lower_bound([1.0, 2.0], 10) == pytest.approx(0.3)
    assert lower_bound([], 10) == 0.0


def test_a_candidate_that_wins_only_on_its_last_sample_is_not_aborted():
    # A: 1 per sample (distance 1). B: 1.5 and 1.4 on its first two samples, more than A's, but 0 on the last:
    # distance 2.9 / 3 < 1. A bound by the positions seen so far (a mean) would have dropped B after one sample.
    table = {A: [1.0, 1.0, 1.0], B: [1.5, 1.4, 0.0]}
    result, _ = run_best_first(table, num_positions=3)
    assert selected(result, 3) == (B, pytest.approx(2.9 / 3))
    assert result[B].complete


def test_an_exact_tie_goes_to_the_earlier_unit_even_when_the_later_one_completes_first():
    # A (earlier) has 2 then 0, B has 1 then 1: both distance 1. B completes first; A's bound then equals B's
    # distance, which must not abort A: its last sample adds exactly 0 and the tie is A's.
    table = {A: [2.0, 0.0], B: [1.0, 1.0]}
    result, calls = run_best_first(table, num_positions=2)
    assert calls.index((B, 1)) < calls.index((A, 1))
    assert selected(result, 2) == (A, 1.0)
    assert result[A].complete and result[B].complete


def test_a_mapped_score_keeps_the_unit_the_mapped_selection_picks_ties_of_the_map_included():
    # BlockPruner compares perplexities exp(mean NLL). Means 2e-20 (A) and 1e-20 (B) differ, but both map to
    # exactly 1.0: by perplexity A and B tie and the earlier A wins, although B's mean is smaller.
    import math

    table = {A: [2e-20, 2e-20], B: [1e-20, 1e-20], C: [3.0, 3.0]}
    assert math.exp(2e-20) == math.exp(1e-20) == 1.0
    for exhaustive in (False, True):
        result, _ = run_best_first(table, num_positions=2, exhaustive=exhaustive, score_of=math.exp)
        scores = [(u, math.exp(r.value(2))) for u, r in result.items() if r.complete]
        assert select_least(scores) == (A, 1.0)
    result, _ = run_best_first(table, num_positions=2, score_of=math.exp)
    assert result[C].sums == {0: 3.0}  # exp(1.5) > 1: left behind after one sample
    plain, _ = run_best_first(table, num_positions=2)
    assert selected(plain, 2) == (B, 1e-20)  # on the means themselves, B is smaller


def test_a_tied_later_unit_is_left_with_a_bound_equal_to_the_winners_distance():
    table = {A: [1.0, 1.0], B: [2.0, 0.0]}
    result, _ = run_best_first(table, num_positions=2)
    assert selected(result, 2) == (A, 1.0)
    assert not result[B].complete and result[B].value(2) == 1.0  # aborted: a tie it would lose


def test_candidates_are_scored_only_while_they_could_win():
    # C is far worse: one sample puts its bound (5 / 3) above A's distance (1), so it is never scored again.
    table = {A: [1.0, 1.0, 1.0], B: [1.2, 1.0, 1.0], C: [5.0, 5.0, 5.0]}
    result, calls = run_best_first(table, num_positions=3)
    assert selected(result, 3) == (A, 1.0)
    assert [index for unit, index in calls if unit == C] == [0]
    assert not result[C].complete and result[C].value(3) == pytest.approx(5 / 3)
    exhaustive, exhaustive_calls = run_best_first(table, num_positions=3, exhaustive=True)
    assert len(exhaustive_calls) == 9 and selected(exhaustive, 3) == (A, 1.0)


def test_a_negative_sum_is_refused():
    with pytest.raises(ValueError, match="lower bound would not hold"):
        run_best_first({A: [1.0, -0.5]}, num_positions=2)


def test_samples_with_the_largest_share_come_first():
    assert sample_order([], 3) == [0, 1, 2]
    assert sample_order([[1.0, 3.0, 2.0], [0.0, 2.0, 2.0]], 3) == [1, 2, 0]


def search(model, *, metric, exhaustive, samples=3, target=3):
    context = ScoringContext.build(model, adapter_for(model), metric_named(metric), tiny_input_ids(samples=samples),
                                   batch_size=1)
    try:
        return greedy_search(FastScorer(context, exhaustive=exhaustive), num_blocks=LAYERS, granularity="sublayer",
                             target=target, window_until_ratio=0.4, window_first_block=2)
    finally:
        context.close()


@pytest.mark.parametrize("name, metric", [("llama", "js"), ("gemma2", "js"), ("gpt_neox", "angular"),
                                          ("mixtral", "euclidean"), ("phi3", "js_official")])
def test_early_abort_selects_what_exhaustive_selects_with_the_same_distances(name, metric):
    model = tiny_model(name, dtype=torch.float64, seed=3)
    fast = search(model, metric=metric, exhaustive=False, samples=5, target=4)
    full = search(model, metric=metric, exhaustive=True, samples=5, target=4)
    assert [(s.unit, s.distance) for s in fast] == [(s.unit, s.distance) for s in full]
    for fast_step, full_step in zip(fast, full):
        for a, b in zip(fast_step.candidates, full_step.candidates):
            if a.distance is not None:
                assert a.distance == b.distance  # bit-identical: the same sums, fsum-ed
            else:
                assert fast_step.distance <= a.lower_bound <= b.distance
    assert sum(s.samples_evaluated for s in fast) <= sum(s.samples_evaluated for s in full)


def test_constructed_exact_tie_on_a_model_goes_to_the_earlier_unit():
    # Block 2's FFN and block 3's attention add exactly zero: both removals leave the output bit-identical, so
    # with Euclidean both score exactly 0 on every sample. The earlier unit (2.ffn) must win, then 3.attn.
    model = tiny_model("llama", dtype=torch.float64)
    with torch.no_grad():
        model.model.layers[3].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    for exhaustive in (False, True):
        steps = search(model, metric="euclidean", exhaustive=exhaustive)
        assert [s.unit for s in steps[:2]] == [B, C]
        assert steps[0].distance == 0.0 and steps[1].distance == 0.0
    fast = search(model, metric="euclidean", exhaustive=False)
    tied = dict((c.unit, c) for c in fast[0].candidates)[C]
    assert tied.distance == 0.0 or (tied.aborted and tied.lower_bound == 0.0)


def test_samples_evaluated_are_counted_and_pinned_where_the_bound_must_abort():
    # Block 3's FFN adds exactly zero, so it scores 0 (Euclidean). Best-first scores every candidate's first
    # sample (bound 0 each to start with), then only 3.ffn, whose bound stays 0, until it is complete. The
    # others' first-sample bounds are above 0: aborted after exactly 1 of the 3 samples.
    model = tiny_model("llama", dtype=torch.float64)
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight.zero_()
    (step,) = search(model, metric="euclidean", exhaustive=False, target=1)
    assert step.unit == Unit(3, "ffn") and step.distance == 0.0
    by_unit = {c.unit: c for c in step.candidates}
    assert {str(u): c.samples for u, c in by_unit.items()} == {"2.attn": 1, "2.ffn": 1, "3.attn": 1, "3.ffn": 3}
    assert all(c.aborted and c.lower_bound > 0 for u, c in by_unit.items() if u != step.unit)
    assert step.samples_evaluated == 6
    record = step.to_dict()
    assert record["samples_evaluated"] == 6 and record["aborted"] == 3
    aborted = [c for c in record["candidates"] if c["distance"] is None]
    assert len(aborted) == 3 and all(c["samples"] == 1 and c["lower_bound"] > 0 for c in aborted)
    (full,) = search(model, metric="euclidean", exhaustive=True, target=1)
    assert full.samples_evaluated == 12 and full.to_dict()["aborted"] == 0
