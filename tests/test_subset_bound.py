"""Vocabulary-subset bounds of JS: the bound itself, its use by the early abort, and that selection is unchanged."""

import math

import pytest
import torch
from tiny_models import LAYERS, tiny_input_ids, tiny_model
from torch import nn

from finercut.adapters import adapter_for
from finercut.candidates import Unit, select_least
from finercut.cli import format_step
from finercut.distances import js_divergence, js_subset_lower_bound, metric_named
from finercut.study.report import step_rows
from finercut.scoring import FastScorer, ScoringContext, best_first, describe_scoring
from finercut.search import CandidateScore, greedy_search

A, B, C = Unit(2, "attention"), Unit(2, "ffn"), Unit(3, "attention")


def f(a: float, b: float) -> float:
    """One outcome's JS term, ½[a log(2a/(a+b)) + b log(2b/(a+b))]."""
    return 0.5 * sum(x * math.log(2 * x / (a + b)) for x in (a, b) if x > 0)


def test_the_tangent_bound_at_the_original_subset_mass_by_hand():
    # P = (0.5, 0.25, 0.25), S = the first two tokens, equal pruned logits on S (q^ = ½, ½). With no Newton step
    # the tangent point is s0 = P(S) = 0.75: g(0.75) = f(.5, .375) + f(.25, .375) + f(.25, .25), and
    # g'(0.75) = ½[½ log(.75/.875) + ½ log(.75/.625) - log(.5/.5)] > 0, so the bound is g(0.75) - 0.75 g'(0.75).
    value = f(0.5, 0.375) + f(0.25, 0.375) + f(0.25, 0.25)
    slope = 0.5 * (0.5 * math.log(0.75 / 0.875) + 0.5 * math.log(0.75 / 0.625))
    expected = value - 0.75 * slope
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    bound = js_subset_lower_bound(as_tensor([0.5, 0.25]), as_tensor(0.25), as_tensor([0.0, 0.0]), newton_steps=0)
    assert bound.item() == pytest.approx(expected, rel=1e-12)
    assert 0 < expected < value


def g_on_grid(p_subset, tail, logits_subset, points=200001):
    """min over s of g(s) = sum f(p_v, s q^_v) + f(tail, 1 - s), by brute force (the best any s could give)."""
    q_hat = torch.softmax(logits_subset, -1)
    s = torch.linspace(0, 1, points, dtype=torch.float64)
    sq, rest = s[:, None] * q_hat, 1 - s

    def terms(a, b):
        return 0.5 * (torch.special.xlogy(a, 2 * a / (a + b)) + torch.special.xlogy(b, 2 * b / (a + b)))

    return (terms(p_subset, sq).sum(-1) + terms(tail, rest)).min()


@pytest.mark.parametrize("seed", range(6))
def test_the_bound_never_exceeds_js_and_newton_reaches_the_best_bound_of_the_subset(seed):
    generator = torch.Generator().manual_seed(seed)
    vocab, subset_size = 40, [4, 10, 20][seed % 3]
    scale = [1.0, 4.0][seed % 2]
    ref = torch.randn(8, vocab, dtype=torch.float64, generator=generator) * scale
    pruned = ref + torch.randn(8, vocab, dtype=torch.float64, generator=generator) * scale * 0.5
    p = torch.softmax(ref, -1)
    subset = torch.randperm(vocab, generator=generator)[:subset_size]
    p_subset, tail = p[:, subset], 1 - p[:, subset].sum(-1)
    js = js_divergence(ref, pruned)
    for steps in (0, 1, 3):
        assert (js_subset_lower_bound(p_subset, tail, pruned[:, subset], newton_steps=steps) <= js).all()
    bound = js_subset_lower_bound(p_subset, tail, pruned[:, subset], newton_steps=8, tolerance=0.0)
    for position in range(8):
        best = g_on_grid(p_subset[position], tail[position], pruned[position, subset])
        assert best - 1e-6 <= bound[position] <= best + 1e-12


def test_refining_stops_within_the_tolerance_of_the_best_bound_of_the_subset():
    # The refinement stops once the tangents could gain at most `tolerance` of the bound in sum, so the sum is
    # within that fraction of the sum of the exact minima of g.
    generator = torch.Generator().manual_seed(11)
    ref = torch.randn(16, 40, dtype=torch.float64, generator=generator) * 3
    pruned = ref + torch.randn(16, 40, dtype=torch.float64, generator=generator)
    p = torch.softmax(ref, -1)
    subset = p.sum(0).topk(10).indices
    p_subset, tail = p[:, subset], 1 - p[:, subset].sum(-1)
    bound = js_subset_lower_bound(p_subset, tail, pruned[:, subset], newton_steps=50, tolerance=0.01)
    best = sum(g_on_grid(p_subset[i], tail[i], pruned[i, subset]) for i in range(16))
    assert best / 1.01 - 1e-9 <= bound.sum() <= best + 1e-9
    prepared = torch.special.xlogy(p_subset, p_subset).sum(-1)
    assert torch.equal(js_subset_lower_bound(p_subset, tail, pruned[:, subset], newton_steps=50, tolerance=0.01,
                                             p_log_p=prepared), bound)


def test_the_bound_is_zero_for_an_unchanged_distribution_and_positive_for_a_changed_one():
    ref = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    p = torch.softmax(ref, -1)
    subset = torch.tensor([0, 1])
    tail = 1 - p[:, subset].sum(-1)
    assert js_subset_lower_bound(p[:, subset], tail, ref[:, subset]).item() == pytest.approx(0.0, abs=1e-15)
    changed = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    assert js_subset_lower_bound(p[:, subset], tail, changed).item() > 0.01


# ----------------------------------------------------------------------------------------------------------------
# best_first with a cheap bound per batch


def run_with_bounds(exact, cheap):
    calls = []

    def batch_sum(unit, index):
        calls.append(("sum", unit, index))
        return exact[unit][index]

    def batch_bound(unit, index):
        calls.append(("bound", unit, index))
        return cheap[unit][index]

    units = list(exact)
    result = best_first(units, batch_sum, num_batches=len(exact[units[0]]), num_positions=3, batch_bound=batch_bound)
    return result, calls


def test_a_candidate_losing_on_bounds_alone_never_pays_an_exact_sum():
    exact = {A: [1.0, 1.0, 1.0], B: [1.1, 1.0, 1.0], C: [5.0, 5.0, 5.0]}
    cheap = {u: [0.9 * v for v in sums] for u, sums in exact.items()}
    result, calls = run_with_bounds(exact, cheap)
    assert select_least([(u, r.value(3)) for u, r in result.items() if r.complete]) == (A, 1.0)
    assert [c for c in calls if c[1] == C] == [("bound", C, 0)]  # 4.5 / 3 > 1 after one bound
    assert result[C].sums == {} and result[C].bounds == {0: 4.5} and result[C].value(3) == pytest.approx(1.5)
    # B (3.1 in all) is bounded on every batch (2.79 < 3), then scored exactly until its bound reaches A's 3
    # (a tie B, the later unit, would lose): exact on two batches, the third only bounded
    assert not result[B].complete and result[B].value(3) == 1.0
    assert result[B].sums == {0: 1.1, 1: 1.0} and result[B].bounds == {2: 0.9}
    assert all(("bound", B, b) in calls for b in range(3)) and ("sum", B, 0) in calls


def test_a_candidate_that_wins_only_on_its_last_exact_sum_still_wins():
    # B's bounds are loose; its exact sums make it the winner only once all three are known.
    exact = {A: [1.0, 1.0, 1.0], B: [1.5, 1.4, 0.0]}
    cheap = {A: [0.5, 0.5, 0.5], B: [1.4, 1.3, 0.0]}
    result, _ = run_with_bounds(exact, cheap)
    assert result[B].complete
    assert select_least([(u, r.value(3)) for u, r in result.items() if r.complete]) == (B, pytest.approx(2.9 / 3))


def test_a_bound_above_its_exact_sum_is_refused():
    with pytest.raises(ValueError, match="would not be exact"):
        run_with_bounds({A: [1.0, 1.0]}, {A: [1.5, 0.5]})


# ----------------------------------------------------------------------------------------------------------------
# On models


def biased_head(model):
    """The model with its output head replaced by a linear layer with a bias (same weight, random bias)."""
    head = model.lm_head
    biased = nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        bias = torch.randn(head.out_features, generator=torch.Generator().manual_seed(5))
        biased.bias.copy_(bias.to(head.weight.dtype))
    model.lm_head = biased
    return model


def search(model, *, exhaustive, subset_tokens=None, target=4, samples=5):
    context = ScoringContext.build(model, adapter_for(model), metric_named("js"), tiny_input_ids(samples=samples),
                                   batch_size=1)
    try:
        scorer = FastScorer(context, exhaustive=exhaustive, subset_tokens=subset_tokens)
        steps = greedy_search(scorer, num_blocks=LAYERS, granularity="sublayer", target=target,
                              window_until_ratio=0.4, window_first_block=2)
        return steps, scorer, context
    finally:
        context.close()


@pytest.mark.parametrize("name, dtype", [("llama", torch.float64), ("gemma2", torch.float64),
                                         ("biased_llama", torch.float64), ("llama", torch.float32)])
def test_subset_bounds_select_what_exhaustive_selects_with_the_same_distances(name, dtype):
    # gemma2: final-logit soft-capping; biased_llama: a head with a bias. Both keep the bound (each logit depends
    # on its own head row), while neither has the vocabulary-free form of angular / Euclidean. float32: the
    # exact JS comes from float32 probabilities, the bound from float64 ones (the margins cover the difference).
    model = tiny_model(name.removeprefix("biased_"), dtype=dtype, seed=3)
    if name.startswith("biased"):
        model = biased_head(model)
    fast, scorer, _ = search(model, exhaustive=False, subset_tokens=24)
    assert scorer.subset is not None and scorer.subset.tokens == 24
    full, _, _ = search(model, exhaustive=True)
    plain, plain_scorer, _ = search(model, exhaustive=False, subset_tokens=0)
    assert plain_scorer.subset is None
    assert [(s.unit, s.distance) for s in fast] == [(s.unit, s.distance) for s in full] == \
        [(s.unit, s.distance) for s in plain]
    bounded = 0
    for fast_step, full_step in zip(fast, full):
        for a, b in zip(fast_step.candidates, full_step.candidates):
            if a.distance is not None:
                assert a.distance == b.distance and a.subset_samples is None
            else:
                assert fast_step.distance <= a.lower_bound <= b.distance
                bounded += a.subset_samples
    assert bounded > 0  # some candidate was left behind on subset bounds it was never scored exactly on
    assert sum(s.samples_evaluated for s in fast) < sum(s.samples_evaluated for s in plain)


def test_a_subset_bound_left_candidate_is_recorded_with_its_bounded_samples():
    model = tiny_model("llama", dtype=torch.float64, seed=3)
    fast, _, context = search(model, exhaustive=False, subset_tokens=24)
    step = next(s for s in fast if any(c.subset_samples for c in s.candidates))
    candidate = next(c for c in step.candidates if c.subset_samples)
    data = candidate.to_dict()
    assert data["distance"] is None and data["subset_samples"] == candidate.subset_samples
    assert CandidateScore.from_dict(data) == candidate
    bounded = sum(c.subset_samples or 0 for c in step.candidates)
    row = step_rows([step.to_dict()])[0]
    assert row[-1] == f"{step.samples_evaluated} + {bounded} bounded"
    shown = format_step(step.to_dict(), 5)
    seen = f"{candidate.samples}+{candidate.subset_samples}b"
    assert f"{candidate.unit} >={candidate.lower_bound:.4g} [{seen}/5]" in shown
    assert describe_scoring(context, scorer="fast", exhaustive=False)["subset_bound_tokens"] == 24  # 96 // 4
    assert describe_scoring(context, scorer="fast", exhaustive=True)["subset_bound_tokens"] == 0


def test_the_subset_bound_applies_to_js_only():
    model = tiny_model("llama", dtype=torch.float64)
    for metric in ("angular", "js_official"):
        context = ScoringContext.build(model, adapter_for(model), metric_named(metric), tiny_input_ids(), batch_size=1)
        try:
            assert FastScorer(context).subset is None
            assert describe_scoring(context, scorer="fast", exhaustive=False)["subset_bound_tokens"] == 0
        finally:
            context.close()


def test_batches_replayed_again_beyond_the_kept_output_budget_give_the_same_search(monkeypatch):
    # With no memory for kept block outputs, every exactly scored batch replays its blocks a second time.
    import finercut.scoring.replay as replay

    model = tiny_model("llama", dtype=torch.float64, seed=3)
    kept, _, _ = search(model, exhaustive=False, subset_tokens=24)
    monkeypatch.setattr(replay, "BOUNDED_OUTPUT_BYTES", 0)
    replayed, _, _ = search(model, exhaustive=False, subset_tokens=24)
    assert [s.to_dict()["candidates"] for s in replayed] == [s.to_dict()["candidates"] for s in kept]


def test_infinite_negative_logits_give_a_finite_bound():
    # A logit of -inf is a probability of 0, as in the exact JS (which clamps it the same way).
    ref = torch.tensor([[1.0, 0.5, 0.0, -1.0]], dtype=torch.float64)
    pruned = torch.tensor([[2.0, -math.inf, 0.0, -1.0]], dtype=torch.float64)
    p = torch.softmax(ref, -1)
    subset = torch.tensor([0, 1, 2])
    bound = js_subset_lower_bound(p[:, subset], 1 - p[:, subset].sum(-1), pruned[:, subset])
    nearly_zero = pruned.nan_to_num(neginf=-1e4)  # the plain JS has no clamp: a logit far below instead
    assert torch.isfinite(bound).all() and 0 < bound.item() <= js_divergence(ref, nearly_zero).item()


def test_the_record_says_how_many_subset_tokens_were_asked_for():
    model = tiny_model("llama", dtype=torch.float64)
    context = ScoringContext.build(model, adapter_for(model), metric_named("js"), tiny_input_ids(), batch_size=1)
    try:
        assert describe_scoring(context, scorer="fast", exhaustive=False, subset_tokens=12)["subset_bound_tokens"] == 12
        assert describe_scoring(context, scorer="fast", exhaustive=False, subset_tokens=0)["subset_bound_tokens"] == 0
        assert FastScorer(context, subset_tokens=12).subset.tokens == 12
    finally:
        context.close()
