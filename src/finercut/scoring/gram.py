"""Angular and Euclidean distances without the vocabulary, for a linear head ``z = W h``.

``z . z~ = h^T G h~`` and ``|z - z~|^2 = (h - h~)^T G (h - h~)`` with ``G = W^T W`` (hidden x hidden, computed
once), so a candidate costs two ``[positions, hidden] x [hidden, hidden]`` products instead of the output head
and a pass over the vocabulary. It applies when the adapter says the head is exactly that product (no bias, no
final soft-capping); otherwise the scorer uses the full head. Plain path: the metric's ``distance`` on the full
logits (:func:`finercut.distances.angular_distance`, ...), which the tests compare it with.
"""

from __future__ import annotations

import torch
from accelerate.utils import align_module_device

from finercut.distances import gram_matrix
from finercut.scoring.context import ScoringContext

GRAM = "gram"
FULL_HEAD = "full_head"
DISTANCE_PATHS = {
    GRAM: "vocabulary-free: G = W^T W of the linear head (hidden x hidden), float64",
    FULL_HEAD: "full output head and the distance over the vocabulary, chunked",
}


def gram_applies(context: ScoringContext) -> bool:
    """Whether the metric has a vocabulary-free form and the model's head admits it."""
    if context.metric.gram is None:
        return False
    weight = context.adapter.linear_head_weight(context.model)
    return weight is not None and weight.device.type != "mps"  # no float64 on MPS


class GramReference:
    """``G`` and the original model's head inputs (float64) per calibration batch."""

    def __init__(self, context: ScoringContext) -> None:
        if not gram_applies(context):
            raise ValueError(f"no vocabulary-free form of {context.metric.name} for this model's head")
        self.context = context
        self.final_norm = context.model.get_submodule(context.adapter.final_norm)
        head = context.model.get_submodule(context.adapter.head)
        # An offloaded head (accelerate's device map) keeps its weight on the meta device between calls.
        with torch.inference_mode(), align_module_device(head):
            gram = gram_matrix(context.adapter.linear_head_weight(context.model).detach())
        with torch.inference_mode():
            self.reference = [self._head_input(batch.reference_output) for batch in context.batches]
        self.gram = gram.to(self.reference[0].device)  # where the final norm's output lives

    def _head_input(self, block_output: torch.Tensor) -> torch.Tensor:
        normed = self.final_norm(block_output)
        return normed.reshape(-1, normed.shape[-1]).double()

    def distance_sum(self, batch_index: int, hidden: torch.Tensor) -> float:
        """Sum over the batch's positions of the metric, from the last block's output ``[batch, seq, hidden]``."""
        work = self.context.work
        with work.timed("distance"):
            normed = self._head_input(hidden)
            total = float(self.context.metric.gram(self.gram, self.reference[batch_index], normed).sum())
        work.gram_rows += normed.shape[0]
        return total
