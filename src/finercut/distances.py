"""How far a pruned model's next-token output moved from the original model's (paper Eqs. 3-6).

Each distance compares, position by position, original logits ``z`` with pruned logits ``z~`` and returns one
value per position; the search averages them over all positions and samples (Eq. 3). Computation is in float32,
or float64 when the logits are float64.

Two forms of each distance:

* plain functions (:func:`js_divergence`, ...): short and direct, used as the specification and by the naive
  search;
* :class:`Metric` objects used by the fast search: the original side is prepared once (``prepare``), and
  ``per_position`` then works in place on the pruned logits, materialising as few full-vocabulary tensors as
  possible (over a 49k vocabulary a careless JS costs as much as the forward pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


class NonFiniteOutputError(FloatingPointError):
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


def _log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim, in place."""
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def _vocab_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the vocabulary, accumulated in float64 (float32 where the device has no float64, i.e. MPS)."""
    return x.sum(dim=-1, dtype=torch.float32 if x.device.type == "mps" else torch.float64)


def _prepare_js(ref_logits: torch.Tensor) -> PreparedReference:
    p = torch.log_softmax(_float(ref_logits), dim=-1).exp_()
    return p, _vocab_sum(torch.special.xlogy(p, p))


def _js_per_position(prepared: PreparedReference, logits: torch.Tensor) -> torch.Tensor:
    # JS = ½(Σ P log P + Σ Q log Q) - Σ M log M: the original's Σ P log P is prepared once, so each candidate
    # costs a log-softmax, an exp and two xlogy passes over the vocabulary. The three sums are accumulated in
    # float64, which keeps their difference (a small number from sums of several nats) accurate in float32.
    # Q is computed exactly as P was, so an output identical to the original's scores exactly 0.
    p, neg_entropy_p = prepared
    q = torch.log_softmax(_float(logits), dim=-1).exp_()
    neg_entropy_q = _vocab_sum(torch.special.xlogy(q, q))
    m = q.add_(p).mul_(0.5)
    neg_entropy_m = _vocab_sum(torch.special.xlogy(m, m))
    return (0.5 * (neg_entropy_p + neg_entropy_q) - neg_entropy_m).clamp_(min=0.0)


def _prepare_js_official(ref_logits: torch.Tensor) -> PreparedReference:
    return (torch.log_softmax(_float(ref_logits), dim=-1),)


def _js_official_per_position(prepared: PreparedReference, logits: torch.Tensor) -> torch.Tensor:
    (log_p,) = prepared
    log_q = _log_softmax_(_float(logits))
    m = log_q.exp().add_(log_p.exp()).mul_(0.5)
    total = 2 * _vocab_sum(torch.special.xlogy(m, m)) - _vocab_sum(m * log_p) - _vocab_sum(m * log_q)
    return 0.5 * total / logits.shape[-1]


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
               "angle between the logit vectors, arccos of their cosine similarity (Eq. 4)"),
        Metric("euclidean", euclidean_distance, _prepare_euclidean, _euclidean_per_position,
               "L2 distance of the logit vectors (Eq. 5)"),
        Metric("js_official", js_divergence_official, _prepare_js_official, _js_official_per_position,
               "the authors' released code: mean over vocabulary of ½[M(log M - log P) + M(log M - log Q)]"),
    )
}


def metric_named(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}") from None
