"""How far a pruned model's next-token output moved from the original model's (paper Eqs. 3-6).

Each distance compares, position by position, original logits ``z`` with pruned logits ``z~`` and returns one
value per position; the search averages them over all positions and samples (Eq. 3). Computation is in float32,
or float64 when the logits are float64.

Two forms of each distance:

* plain functions (:func:`js_divergence`, ...): short and direct, used as the specification and by the naive
  search;
* :class:`Metric` objects used by the fast search: the original side is prepared once (``prepare``), and
  ``per_position`` then works in place on the pruned logits, materialising as few full-vocabulary tensors as
  possible (over a 49k vocabulary a careless JS costs as much as the forward pass);
* vocabulary-free forms of angular and Euclidean (:func:`gram_angular_distance`, ...) for a linear head
  ``z = W h``: they need only ``G = W^T W`` (hidden x hidden) and the head's inputs.

Every per-position value is >= 0, so a partial sum over some samples bounds the mean from below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from finercut.errors import UserError


class NonFiniteOutputError(UserError, FloatingPointError):
    """The model produced NaN or inf logits; scoring them would pick garbage."""


def _float(x: torch.Tensor) -> torch.Tensor:
    """At least float32; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def js_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence of softmax(ref_logits) and softmax(logits), natural log (Eq. 6).

    ``JS = ½ KL(P || M) + ½ KL(Q || M)``, ``M = (P + Q) / 2``; in ``[0, ln 2]``.

    Args:
        ref_logits: ``[..., vocab]`` original logits ``z``.
        logits: ``[..., vocab]`` pruned logits ``z~``.

    Returns:
        ``[...]`` one divergence per position.
    """
    log_p = torch.log_softmax(_float(ref_logits), dim=-1)
    log_q = torch.log_softmax(_float(logits), dim=-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_p_m = (log_p.exp() * (log_p - log_m)).sum(dim=-1)
    kl_q_m = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
    return 0.5 * (kl_p_m + kl_q_m)


def js_divergence_official(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """What the FinerCut authors' released code computes under the name JS.

    Per position, the mean over vocabulary entries of ``½[M(log M - log P) + M(log M - log Q)]`` (that is,
    ``(KL(M || P) + KL(M || Q)) / (2 |V|)``); averaging these over positions gives their mean over
    (sample, position, vocabulary entry).

    Returns:
        ``[...]`` one value per position.
    """
    log_p = torch.log_softmax(_float(ref_logits), dim=-1)
    log_q = torch.log_softmax(_float(logits), dim=-1)
    m = 0.5 * (log_p.exp() + log_q.exp())
    terms = 2 * torch.special.xlogy(m, m) - m * log_p - m * log_q
    return 0.5 * terms.mean(dim=-1)


def angular_distance(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Angle between the logit vectors, ``arccos(z . z~ / (|z| |z~|))`` in radians (Eq. 4).

    Computed as ``2 asin(|z/|z| - z~/|z~|| / 2)``, the same angle without arccos's loss of precision near 0.
    """
    a = _float(ref_logits)
    b = _float(logits)
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    chord = (a - b).norm(dim=-1)
    return 2 * torch.asin((chord / 2).clamp(max=1.0))


def euclidean_distance(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """L2 distance of the logit vectors (Eq. 5)."""
    return (_float(logits) - _float(ref_logits)).norm(dim=-1)


def gram_matrix(weight: torch.Tensor, *, rows_per_chunk: int = 8192) -> torch.Tensor:
    """``G = W^T W`` of a linear head ``z = W h``, in float64: ``[vocab, hidden] -> [hidden, hidden]``.

    Accumulated over chunks of vocabulary rows, so no float64 copy of ``W`` is ever whole.
    """
    gram = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], rows_per_chunk):
        rows = weight[start : start + rows_per_chunk].double()
        gram.addmm_(rows.T, rows)
    return gram


def _gram_norm_sq(gram: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x^T G x`` per row (``|W x|^2``), clamped at 0 against rounding: ``[..., hidden] -> [...]``."""
    return ((x @ gram) * x).sum(dim=-1).clamp_(min=0.0)


def gram_angular_distance(gram: torch.Tensor, ref_hidden: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """:func:`angular_distance` of the logits ``W ref_hidden`` and ``W hidden``, without the vocabulary.

    With ``u = x / |W x|`` the unit logit vector is ``W u``, and the chord ``|W u - W u~|`` is
    ``sqrt((u - u~)^T G (u - u~))``: the same chord form as the plain function, in float64.

    Args:
        gram: ``[hidden, hidden]`` float64 ``W^T W``.
        ref_hidden, hidden: ``[..., hidden]`` the head's inputs (after the final norm), original and pruned.
    """
    a = ref_hidden.double()
    b = hidden.double()
    a = a / _gram_norm_sq(gram, a).sqrt().unsqueeze(-1)
    b = b / _gram_norm_sq(gram, b).sqrt().unsqueeze(-1)
    chord = _gram_norm_sq(gram, a - b).sqrt()
    return 2 * torch.asin((chord / 2).clamp(max=1.0))


def gram_euclidean_distance(gram: torch.Tensor, ref_hidden: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """:func:`euclidean_distance` of ``W ref_hidden`` and ``W hidden``: ``sqrt((h - h~)^T G (h - h~))``."""
    return _gram_norm_sq(gram, hidden.double() - ref_hidden.double()).sqrt()


def js_subset_lower_bound(
    p_subset: torch.Tensor, tail_mass: torch.Tensor, logits_subset: torch.Tensor, *, newton_steps: int = 3,
    tolerance: float = 1e-3, p_log_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """A lower bound of :func:`js_divergence` from the pruned logits on a subset ``S`` of the vocabulary only.

    Within ``S``, Q is ``s q^`` with ``q^`` the softmax of the logits over ``S`` and ``s = Q(S)`` in (0, 1],
    unknown without the other logits. Merging the tokens outside ``S`` into one outcome cannot increase an
    f-divergence (data processing), so with ``f(a, b) = ½[a log(2a / (a+b)) + b log(2b / (a+b))]`` and the true
    ``s``::

        JS(P, Q) >= g(s) = sum over v in S of f(p_v, s q^_v) + f(P(not S), 1 - s)

    ``g`` is convex on [0, 1] (``f`` is jointly convex), so its tangent at any ``s0`` lies below it and the
    tangent's minimum over [0, 1] bounds ``g(s)`` from below whatever ``s`` is. ``s0`` is ``P(S)`` refined by
    up to ``newton_steps`` safeguarded Newton steps on ``g'``, stopping once the tangents could gain no more than
    ``tolerance`` of the bound (the gap ``g(s0) - tangent``, summed over positions): near the minimum the
    tangent is flat and the bound is close to ``min g``. With ``S`` the tokens carrying most of P's mass the
    bound is most of the divergence (about 90% with 4,096 of 49,152 tokens on SmolLM2-135M) at a fraction of
    the output head's cost. Computed in float64.

    Args:
        p_subset: ``[..., K]`` the original distribution P on ``S``.
        tail_mass: ``[...]`` P's mass outside ``S`` (``1 - P(S)``).
        logits_subset: ``[..., K]`` the pruned logits on ``S`` (after any soft-capping).
        newton_steps: at most this many refinements of the tangent point.
        tolerance: stop refining once the bound can rise by no more than this fraction.
        p_log_p: ``[...]`` ``sum over S of p log p``, if already known (it depends on P only).

    Returns:
        ``[...]`` one bound >= 0 per position.
    """
    p = p_subset.double()
    tail = tail_mass.double().clamp(0.0, 1.0)
    shifted = logits_subset.double()
    # -inf (probability 0) becomes the lowest finite value, so that 0 * shifted is 0 rather than NaN
    shifted = (shifted - shifted.amax(dim=-1, keepdim=True)).clamp_(min=torch.finfo(torch.float64).min)
    exp = shifted.exp()
    total = exp.sum(-1)
    q_hat = exp / total.unsqueeze(-1)
    q_log_q = (exp * shifted).sum(-1) / total - total.log()  # no second transcendental pass
    tiny = torch.finfo(torch.float64).tiny
    edge = 1e-12  # keeps s inside (0, 1), where g' and g'' exist
    xlogy, log2 = torch.special.xlogy, math.log(2.0)
    mass_in = p.sum(-1)
    p_log_p = xlogy(p, p).sum(-1) if p_log_p is None else p_log_p.double()

    def tangent_at(s: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tangent's minimum over [0, 1], g(s), g'(s) and g''(s); one log per subset entry. With
        m = p + s q^: g = ½[(P(S) + s) log 2 + sum p log p + s log s + s sum q^ log q^ - sum m log m]
        + f(P(T), 1 - s)."""
        mix = (p + q_hat * s.unsqueeze(-1)).clamp_(min=tiny)
        log_mix = mix.log()
        rest = 1.0 - s
        tail_mix = tail + rest
        tail_term = 0.5 * (xlogy(tail, 2.0 * tail / tail_mix) + xlogy(rest, 2.0 * rest / tail_mix))
        inside = (mass_in + s) * log2 + p_log_p + s * s.log() + s * q_log_q - (mix * log_mix).sum(-1)
        value = 0.5 * inside + tail_term
        slope = 0.5 * (log2 + s.log() + q_log_q - (q_hat * log_mix).sum(-1) - torch.log(2.0 * rest / tail_mix))
        curvature = 0.5 * ((q_hat * p / mix).sum(-1) / s + tail / (rest * tail_mix))
        # at 0 if the tangent rises, at 1 if it falls
        tangent = torch.where(slope > 0, value - slope * s, value + slope * rest)
        return tangent, value, slope, curvature

    # Newton on g' from P(S), kept inside the bracket of its sign change (g' < 0 near 0, > 0 near 1) and
    # bisecting where a step would leave it; every tangent is a valid bound, so the best one is kept.
    s = (1.0 - tail).clamp(edge, 1.0 - edge)
    low, high = torch.zeros_like(s), torch.ones_like(s)
    bound, value, slope, curvature = tangent_at(s)
    for _ in range(newton_steps):
        if float((value - bound).sum()) <= tolerance * float(bound.sum()):
            break
        rising = slope > 0
        high, low = torch.where(rising, s, high), torch.where(rising, low, s)
        newton = s - slope / curvature.clamp(min=tiny)
        s = torch.where((newton > low) & (newton < high), newton, 0.5 * (low + high)).clamp(edge, 1.0 - edge)
        tangent, value, slope, curvature = tangent_at(s)
        bound = torch.maximum(bound, tangent)
    return bound.clamp(min=0.0)


PreparedReference = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Metric:
    """A distance in two forms: plain (``distance``) and prepared-reference, in-place (``prepare``/``per_position``).

    ``per_position(prepare(z), z~)`` equals ``distance(z, z~)``; it may overwrite ``z~``.
    """

    name: str
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    prepare: Callable[[torch.Tensor], PreparedReference]
    per_position: Callable[[PreparedReference, torch.Tensor], torch.Tensor]
    description: str
    gram: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """The same distance from the head's inputs and ``G = W^T W`` (linear heads without bias or soft-capping),
    if the metric has such a form: ``gram(G, ref_hidden, hidden)`` equals ``distance(W ref_hidden, W hidden)``."""


def _vocab_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the vocabulary, accumulated in float64 (float32 where the device has no float64, i.e. MPS)."""
    return x.sum(dim=-1, dtype=torch.float32 if x.device.type == "mps" else torch.float64)


def _log_softmax_finite(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax with -inf (an entry of probability 0) clamped to the lowest finite value, so that
    ``p * log_p`` is 0 there rather than NaN; no transcendental pass beyond the log-softmax itself."""
    log_p = torch.log_softmax(_float(logits), dim=-1)
    return log_p.clamp_(min=torch.finfo(log_p.dtype).min)


JS_ROWS_PER_PASS = 4
"""Positions the fast JS works on at a time: a few full-vocabulary rows stay in the CPU's L2 cache through
the five passes over them, instead of streaming a whole chunk from memory once per pass."""


def _prepare_js(ref_logits: torch.Tensor) -> PreparedReference:
    log_p = _log_softmax_finite(ref_logits)
    p = log_p.exp()
    neg_entropy_p = _vocab_sum(log_p.mul_(p))
    return p.mul_(0.5), neg_entropy_p  # ½P is what M = ½(P + Q) needs


def _js_per_position(prepared: PreparedReference, logits: torch.Tensor) -> torch.Tensor:
    # JS = ½(Σ P log P + Σ Q log Q) - Σ M log M. The original's ½P and Σ P log P are prepared once. A candidate
    # costs one exp (float32) and one log (float64) per vocabulary entry: with e = exp(z - max) and S = Σ e,
    # Σ Q log Q = Σ e (z - max) / S - log S needs no second transcendental pass. Q = e / S and M are formed in
    # float64, so M is made of the very Q whose Σ Q log Q is used: a float32 Q would differ from it by a rounding
    # per entry, enough to move a late step's JS (1e-5 nats) by 1%. Sums are accumulated in float64 (their
    # difference is a small number from sums of several nats). Rounding can leave a tiny negative: clamped, so
    # every per-position term is >= 0 (early abort relies on it). Overwrites ``logits``.
    half_p, neg_entropy_p = prepared
    logits = _float(logits)
    lowest = torch.finfo(logits.dtype).min
    result = torch.empty(logits.shape[:-1], dtype=neg_entropy_p.dtype, device=logits.device)
    flat_logits, flat_half_p = logits.reshape(-1, logits.shape[-1]), half_p.reshape(-1, half_p.shape[-1])
    flat_result, flat_neg_entropy_p = result.reshape(-1), neg_entropy_p.reshape(-1)
    for start in range(0, flat_logits.shape[0], JS_ROWS_PER_PASS):
        rows = slice(start, start + JS_ROWS_PER_PASS)
        shifted = flat_logits[rows]
        # -inf (probability 0) becomes the lowest finite value, so that 0 * shifted is 0 rather than NaN
        shifted.sub_(shifted.amax(dim=-1, keepdim=True)).clamp_(min=lowest)
        exp = shifted.exp()
        total = _vocab_sum(exp)  # S
        neg_entropy_q = _vocab_sum(exp * shifted) / total - total.log()
        q = exp.to(total.dtype).div_(total.unsqueeze(-1))  # in place when e is float64 already
        m = q.mul_(0.5).add_(flat_half_p[rows])
        flat_result[rows] = 0.5 * (flat_neg_entropy_p[rows] + neg_entropy_q) - _vocab_sum(torch.special.xlogy(m, m))
    return result.clamp_(min=0.0)


def _prepare_js_official(ref_logits: torch.Tensor) -> PreparedReference:
    log_p = _log_softmax_finite(ref_logits)
    return log_p, log_p.exp()


def _js_official_per_position(prepared: PreparedReference, logits: torch.Tensor) -> torch.Tensor:
    # Σ [2 M log M - M log P - M log Q] = Σ M (2 log M - log P - log Q), clamped at 0 like JS (it is a sum of
    # two KL divergences); one exp (Q) and one log (M) per entry.
    log_p, p = prepared
    log_q = _log_softmax_finite(logits)
    m = log_q.exp().add_(p).mul_(0.5)
    log_q.add_(log_p)  # log P + log Q
    total = 2 * _vocab_sum(torch.special.xlogy(m, m)) - _vocab_sum(log_q.mul_(m))
    return (0.5 * total / logits.shape[-1]).clamp_(min=0.0)


def _prepare_angular(ref_logits: torch.Tensor) -> PreparedReference:
    z = _float(ref_logits)
    return (z / z.norm(dim=-1, keepdim=True),)


def _angular_per_position(prepared: PreparedReference, logits: torch.Tensor) -> torch.Tensor:
    (unit_ref,) = prepared
    z = _float(logits)
    chord = z.div_(z.norm(dim=-1, keepdim=True)).sub_(unit_ref).norm(dim=-1)
    return 2 * torch.asin((chord / 2).clamp(max=1.0))


def _prepare_euclidean(ref_logits: torch.Tensor) -> PreparedReference:
    return (_float(ref_logits).clone(),)


def _euclidean_per_position(prepared: PreparedReference, logits: torch.Tensor) -> torch.Tensor:
    (ref,) = prepared
    return _float(logits).sub_(ref).norm(dim=-1)


METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric("js", js_divergence, _prepare_js, _js_per_position,
               "Jensen-Shannon divergence of the next-token distributions (Eq. 6, natural log)"),
        Metric("angular", angular_distance, _prepare_angular, _angular_per_position,
               "angle between the logit vectors, arccos of their cosine similarity (Eq. 4)",
               gram=gram_angular_distance),
        Metric("euclidean", euclidean_distance, _prepare_euclidean, _euclidean_per_position,
               "L2 distance of the logit vectors (Eq. 5)", gram=gram_euclidean_distance),
        Metric("js_official", js_divergence_official, _prepare_js_official, _js_official_per_position,
               "the authors' released code: mean over vocabulary of ½[M(log M - log P) + M(log M - log Q)]"),
    )
}


def metric_named(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Likelihood: BlockPruner's perplexity and a task's answer likelihood


def mean_next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of each next token and the number of predictions.

    Args:
        logits: ``[batch, seq, vocab]``; input_ids: ``[batch, seq]`` (position ``t`` predicts token ``t + 1``).
    """
    targets = input_ids[:, 1:].reshape(-1)
    return nll_sum(logits[:, :-1].reshape(-1, logits.shape[-1]), targets), targets.numel()


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood of ``targets`` (``[n]``) under ``logits`` (``[n, vocab]``), in float32 at
    least."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return float(torch.nn.functional.cross_entropy(logits, targets.to(logits.device), reduction="sum").double())
