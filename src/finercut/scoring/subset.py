"""A cheap lower bound of a candidate's JS divergence from a few thousand rows of the output head.

Per calibration batch, the tokens ``S`` carrying most of the original model's probability over the batch's
positions are chosen once (4,096 by default, at most a quarter of the vocabulary), with the original
probabilities on ``S``, the mass outside it and the head's rows for ``S``. A candidate's batch then costs its
blocks, ``K`` of the head's ``vocab`` rows and :func:`finercut.distances.js_subset_lower_bound`: a bound of its
JS on the batch, about 90% of it on SmolLM2-135M, where the full head and JS pass cost about nine times as much.

:func:`finercut.scoring.bounds.best_first` uses it as a first pass over each candidate's batches: a candidate
that would lose on the bounds alone never pays the full head, and one that stays close to the winner is scored
exactly batch by batch (its kept block output is reused), each exact sum replacing a bound. Selection is
unchanged: a bound never exceeds the exact sum it stands for (each is lowered by a relative and an absolute
margin for the rounding of both sides, :data:`SAFETY` and :data:`ROUNDING_PER_POSITION`, and checked against
the exact sum whenever one is computed).

It applies to the ``js`` metric with a head that is a plain linear layer (with a bias or a final soft-capping:
each logit still depends on its own row only).
"""

from __future__ import annotations

import torch
from accelerate.utils import align_module_device
from torch.nn import functional

from finercut.distances import js_subset_lower_bound
from finercut.scoring.context import ScoringContext

DEFAULT_SUBSET_TOKENS = 4096
"""Tokens per batch in the subset: about 90% of the JS for a twelfth of SmolLM2's head."""
SAFETY = 1.0 - 2.0**-10
"""Each batch's bound is scaled by this and lowered by :data:`ROUNDING_PER_POSITION` per position, so that the
rounding of the bound and of the exact sum cannot put a bound above the exact sum it stands for; the bound is
several per cent below it anyway."""
ROUNDING_PER_POSITION = {torch.float64: 1e-12}
"""Absolute margin per position (nats) by model dtype, default :data:`ROUNDING_PER_POSITION_FLOAT32`: the exact
JS of a float32 (or lower precision) model is computed from float32 probabilities, a few 1e-9 nats per position
off, which matters for a candidate whose whole JS is of that order."""
ROUNDING_PER_POSITION_FLOAT32 = 1e-7


def subset_size(context: ScoringContext, requested: int | None) -> int:
    """Tokens in the subset for this context: 0 where the bound does not apply (another metric, a head that is
    not a plain linear layer) or where the subset would not be much smaller than the vocabulary."""
    if context.metric.name != "js" or context.adapter.linear_head(context.model) is None:
        return 0
    if context.batches[0].reference_output.device.type == "mps":  # no float64 on MPS
        return 0
    vocab = context.model.get_submodule(context.adapter.head).out_features
    tokens = DEFAULT_SUBSET_TOKENS if requested is None else requested
    return max(0, min(tokens, vocab // 4))


class SubsetBound:
    """The original side of the bound per calibration batch: the subset, P on it, P's mass outside it and the
    head's rows for it."""

    def __init__(self, context: ScoringContext, tokens: int) -> None:
        if tokens <= 0:
            raise ValueError("a vocabulary subset needs at least one token")
        self.context = context
        self.tokens = tokens
        model, adapter = context.model, context.adapter
        self.final_norm = model.get_submodule(adapter.final_norm)
        head = model.get_submodule(adapter.head)
        self.vocab = head.out_features
        self.rounding = ROUNDING_PER_POSITION.get(model.dtype, ROUNDING_PER_POSITION_FLOAT32)
        self.p_subset: list[torch.Tensor] = []  # per batch [positions, K], float64
        self.tail_mass: list[torch.Tensor] = []  # per batch [positions], float64
        self.p_log_p: list[torch.Tensor] = []  # per batch [positions]: sum over S of p log p
        self.rows: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # per batch (W[S], b[S])
        with torch.inference_mode(), align_module_device(head):
            weight, bias, self.cap = adapter.linear_head(model)
            for batch in context.batches:
                subset, p_subset = self._subset(batch.reference_output)
                self.p_subset.append(p_subset)
                self.tail_mass.append((1.0 - p_subset.sum(-1)).clamp_(min=0.0))
                self.p_log_p.append(torch.special.xlogy(p_subset, p_subset).sum(-1))
                self.rows.append((weight[subset].clone(), None if bias is None else bias[subset].clone()))

    def _subset(self, block_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``K`` tokens of most summed original probability over the batch's positions, and P on them."""
        rows = block_output.reshape(-1, block_output.shape[-1])
        chunk_rows = self.context.chunk_rows

        def probabilities(start: int) -> torch.Tensor:
            logits = self.context.adapter.logits(self.context.model, rows[start : start + chunk_rows])
            return torch.softmax(logits.double(), dim=-1)

        starts = range(0, rows.shape[0], chunk_rows)
        mass = sum(probabilities(start).sum(0) for start in starts)
        subset = mass.topk(self.tokens).indices.sort().values
        # the second pass recomputes the chunks rather than keeping [positions, vocab] float64 probabilities
        return subset, torch.cat([probabilities(start)[:, subset] for start in starts])

    def bound_sum(self, batch_index: int, hidden: torch.Tensor) -> float:
        """A lower bound of the batch's JS summed over positions, from the last block's output
        ``[batch, seq, hidden]``."""
        work = self.context.work
        weight, bias = self.rows[batch_index]
        with work.timed("head"):
            normed = self.final_norm(hidden)
            # to the head's device, as its own forward (and accelerate's hook) would
            logits = functional.linear(normed.reshape(-1, normed.shape[-1]).to(weight.device), weight, bias)
            if self.cap is not None:
                logits = torch.tanh(logits / self.cap) * self.cap
        with work.timed("distance"):
            bounds = js_subset_lower_bound(self.p_subset[batch_index], self.tail_mass[batch_index], logits,
                                           p_log_p=self.p_log_p[batch_index])
            total = float(bounds.sum())
        work.subset_head_rows += logits.shape[0] * self.tokens / self.vocab
        return max(0.0, total * SAFETY - self.rounding * logits.shape[0])
