"""Distances against values worked out by hand, and the fast (prepared, in-place) forms against the plain ones."""

import math

import pytest
import torch

from finercut.distances import (
    METRICS,
    angular_distance,
    euclidean_distance,
    gram_angular_distance,
    gram_euclidean_distance,
    gram_matrix,
    js_divergence,
    js_divergence_official,
    metric_named,
)

# P = softmax([0, 0]) = (1/2, 1/2); Q = softmax([ln 3, 0]) = (3/4, 1/4); M = (5/8, 3/8).
P = (0.5, 0.5)
Q = (0.75, 0.25)
M = (0.625, 0.375)
Z_P = torch.tensor([0.0, 0.0], dtype=torch.float64)
Z_Q = torch.tensor([math.log(3.0), 0.0], dtype=torch.float64)


def test_js_matches_hand_computation():
    kl_p_m = P[0] * math.log(P[0] / M[0]) + P[1] * math.log(P[1] / M[1])
    kl_q_m = Q[0] * math.log(Q[0] / M[0]) + Q[1] * math.log(Q[1] / M[1])
    expected = 0.5 * kl_p_m + 0.5 * kl_q_m
    # KL(P||M) = 0.032269, KL(Q||M) = 0.035375 -> JS = 0.033822 nats
    assert expected == pytest.approx(0.033822, abs=1e-6)
    assert js_divergence(Z_P, Z_Q).item() == pytest.approx(expected, rel=1e-12)


def test_js_is_symmetric_zero_for_equal_and_ln2_for_disjoint():
    assert js_divergence(Z_Q, Z_P).item() == pytest.approx(js_divergence(Z_P, Z_Q).item(), rel=1e-12)
    assert js_divergence(Z_Q, Z_Q).item() == pytest.approx(0.0, abs=1e-15)
    one_hot_a = torch.tensor([60.0, -60.0], dtype=torch.float64)
    assert js_divergence(one_hot_a, -one_hot_a).item() == pytest.approx(math.log(2.0), rel=1e-9)


def test_js_official_matches_hand_computation():
    # Mean over the 2 vocabulary entries of 1/2 [M(log M - log P) + M(log M - log Q)].
    terms = [0.5 * (m * (math.log(m) - math.log(p)) + m * (math.log(m) - math.log(q))) for p, q, m in zip(P, Q, M)]
    expected = sum(terms) / 2
    # entries: 0.012757 and 0.022084 -> mean 0.017421
    assert expected == pytest.approx(0.017421, abs=1e-6)
    assert js_divergence_official(Z_P, Z_Q).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([1.0, 0.0], [0.0, 1.0], math.pi / 2),
        ([1.0, 0.0], [1.0, 1.0], math.pi / 4),
        ([1.0, 0.0], [-1.0, 0.0], math.pi),
        ([2.0, 0.0, 0.0], [1.0, math.sqrt(3.0), 0.0], math.pi / 3),
        ([3.0, 4.0], [30.0, 40.0], 0.0),  # same direction, different norm: angle 0
    ],
)
def test_angular_distance_is_arccos_of_cosine(a, b, expected):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert angular_distance(a, b).item() == pytest.approx(expected, abs=1e-12)


def test_angular_distance_keeps_precision_for_tiny_angles():
    # arccos(cos) loses everything below ~1e-4 rad in float32; the chord form does not.
    a = torch.tensor([1.0, 0.0], dtype=torch.float32)
    b = torch.tensor([1.0, 1e-6], dtype=torch.float32)
    assert angular_distance(a, b).item() == pytest.approx(1e-6, rel=1e-3)


def test_euclidean_distance():
    assert euclidean_distance(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([3.0, 4.0, 0.0])).item() == 5.0


def test_distances_are_per_position():
    ref = torch.stack([Z_P, Z_Q, Z_P])
    out = torch.stack([Z_Q, Z_Q, Z_P])
    values = js_divergence(ref, out)
    assert values.shape == (3,)
    assert values[1].item() == pytest.approx(0.0, abs=1e-15)
    assert values[0].item() == pytest.approx(js_divergence(Z_P, Z_Q).item())


@pytest.mark.parametrize("name", list(METRICS))
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-10), (torch.float32, 2e-3)])
def test_prepared_form_equals_plain_form(name, dtype, rel):
    metric = metric_named(name)
    generator = torch.Generator().manual_seed(0)
    ref = 4 * torch.randn(7, 500, generator=generator, dtype=torch.float64)
    out = ref + 0.3 * torch.randn(7, 500, generator=generator, dtype=torch.float64)
    expected = metric.distance(ref, out)
    fast = metric.per_position(metric.prepare(ref.to(dtype)), out.to(dtype).clone())
    torch.testing.assert_close(fast.double(), expected, rtol=rel, atol=1e-6 if dtype == torch.float32 else 1e-14)


def test_fast_js_stays_accurate_in_float32_for_small_divergences():
    # A real vocabulary and a small change of the logits: JS ~ 1e-5 nats, the size that decides late steps.
    metric = metric_named("js")
    generator = torch.Generator().manual_seed(0)
    ref = 3 * torch.randn(16, 49152, generator=generator, dtype=torch.float64)
    out = ref + 0.01 * torch.randn(16, 49152, generator=generator, dtype=torch.float64)
    exact = js_divergence(ref, out)
    assert 1e-6 < exact.mean().item() < 1e-4
    fast = metric.per_position(metric.prepare(ref.float()), out.float())
    plain_float32 = js_divergence(ref.float(), out.float())
    fast_error = ((fast.double() - exact) / exact).abs().max()
    assert fast_error < 5e-3  # float32 rounding of each entry bounds it; the sums add nothing (float64)
    assert fast_error <= ((plain_float32.double() - exact) / exact).abs().max()


def test_js_handles_minus_infinity_logits():
    ref = torch.tensor([[0.0, 1.0, -math.inf]], dtype=torch.float64)
    out = torch.tensor([[1.0, 0.0, -math.inf]], dtype=torch.float64)
    metric = metric_named("js")
    plain = js_divergence(ref[:, :2], out[:, :2])
    assert metric.per_position(metric.prepare(ref), out.clone()).item() == pytest.approx(plain.item(), rel=1e-12)


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(ValueError, match="js, angular, euclidean, js_official"):
        metric_named("kl")


@pytest.mark.parametrize("name, plain, gram", [("angular", angular_distance, gram_angular_distance),
                                               ("euclidean", euclidean_distance, gram_euclidean_distance)])
def test_gram_forms_equal_the_plain_distances_of_the_full_logits(name, plain, gram):
    # z = W h: the distances of the logits from G = W^T W and the head inputs alone, float64, 1e-9 relative;
    # including tiny changes (where a cosine-based form would lose everything) and a vocabulary > hidden.
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 16, generator=generator, dtype=torch.float64)
    ref = torch.randn(9, 16, generator=generator, dtype=torch.float64)
    scales = torch.tensor([1.0, 0.3, 1e-2, 1e-4, 1e-6, 1e-8, 1.0, 0.5, 2.0], dtype=torch.float64)[:, None]
    hidden = ref + scales * torch.randn(9, 16, generator=generator, dtype=torch.float64)
    hidden[6] = 3.0 * ref[6]  # same direction: angle 0
    expected = plain(ref @ weight.T, hidden @ weight.T)
    got = gram(gram_matrix(weight, rows_per_chunk=64), ref, hidden)
    assert metric_named(name).gram is gram
    if name == "euclidean":
        # Below ~1e-6 the plain form loses digits subtracting two nearly equal logit vectors; the Gram form
        # subtracts in hidden space and stays exact there: compare those rows with the exact difference.
        tiny = scales[:, 0] < 1e-5
        torch.testing.assert_close(got[tiny], ((hidden - ref) @ weight.T).norm(dim=-1)[tiny], rtol=1e-9, atol=0.0)
        got, expected = got[~tiny], expected[~tiny]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-15 if name == "angular" else 0.0)


def test_gram_matrix_is_accumulated_in_float64_over_chunks():
    weight = torch.randn(1000, 8, dtype=torch.float32)
    gram = gram_matrix(weight, rows_per_chunk=128)
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, weight.double().T @ weight.double(), rtol=1e-12, atol=1e-10)


def test_only_angular_and_euclidean_have_a_vocabulary_free_form():
    assert {name for name, metric in METRICS.items() if metric.gram is not None} == {"angular", "euclidean"}
