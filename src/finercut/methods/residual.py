"""The residual stream's local scores of ShortGPT and Gromov et al.'s "deeper layers", from one pass of the original
model: how little each block changes its input (Block Influence), and how close the stream's last-position states
are across a run of blocks. Computed on the original model only.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from finercut.scoring import ScoringContext, run_block


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dim, in float64: ``[..., hidden] x [..., hidden] -> [...]``."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def block_influence(block_input: torch.Tensor, block_output: torch.Tensor) -> float:
    """ShortGPT's Block Influence: ``1 - mean cos(input, output)`` over all samples and positions.

    Args:
        block_input, block_output: ``[samples, seq, hidden]``.
    """
    return float(1.0 - _cosine(block_input, block_output).mean())


def last_token_angular_distance(earlier: torch.Tensor, later: torch.Tensor) -> float:
    """Gromov et al.'s distance of two residual states at the last token: ``arccos(cos) / pi``, sample mean.

    Args:
        earlier, later: ``[samples, hidden]`` the states at each sample's last position.
    """
    cosine = _cosine(earlier, later).clamp(-1.0, 1.0)
    return float((torch.arccos(cosine) / math.pi).mean())


def best_contiguous_run(last_tokens: Sequence[torch.Tensor], length: int) -> tuple[int, list[float]]:
    """Start of the ``length`` consecutive blocks whose input and output are closest (earliest on ties).

    Args:
        last_tokens: ``L + 1`` last-position states ``[samples, hidden]``: each block's input, then the last
            block's output.

    Returns:
        The best start and the distance of every start ``0..L-length``.
    """
    num_blocks = len(last_tokens) - 1
    if not 1 <= length <= num_blocks:
        raise ValueError(f"cannot remove {length} consecutive blocks of {num_blocks}")
    distances = [last_token_angular_distance(last_tokens[s], last_tokens[s + length])
                 for s in range(num_blocks - length + 1)]
    return min(range(len(distances)), key=lambda s: (distances[s], s)), distances


@torch.inference_mode()
def residual_summary(context: ScoringContext) -> tuple[list[float], list[torch.Tensor]]:
    """One pass of the original model: every block's influence, and the residual stream's last-position states.

    Streams over blocks and batches, holding one ``[batch, seq, hidden]`` state at a time.

    Returns:
        ``L`` block influences, and ``L + 1`` tensors ``[samples, hidden]`` on the CPU: each block's input at the
        last position, then the last block's output there.
    """
    blocks = context.adapter.blocks_of(context.model)
    cosine_sums = [0.0] * len(blocks)
    positions = 0
    last_tokens: list[list[torch.Tensor]] = [[] for _ in range(len(blocks) + 1)]
    for batch in context.batches:
        hidden = batch.first_block_input
        last_tokens[0].append(hidden[:, -1].float().cpu())
        for i, block in enumerate(blocks):
            output = run_block(block, hidden, batch.block_calls[i])
            cosine_sums[i] += float(_cosine(hidden, output).sum())
            last_tokens[i + 1].append(output[:, -1].float().cpu())
            hidden = output
        positions += batch.input_ids.numel()
    influences = [1.0 - total / positions for total in cosine_sums]
    return influences, [torch.cat(states) for states in last_tokens]
