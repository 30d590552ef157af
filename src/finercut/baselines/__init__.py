"""Baselines in FinerCut's record format: ShortGPT, DeeperLayers (Gromov et al.) and random removal.

FinerCut's block-level ablation is not here: it is the greedy search with ``granularity="block"``.
Each baseline returns :class:`~finercut.search.Step` s, so records, plots, pruned models and evaluation treat
every method alike. Their scores are local (block input vs. output), computed on the original model only.
"""

from __future__ import annotations

import math
import random
import time
from typing import Sequence

import torch

from finercut.candidates import BLOCK, Unit, all_units
from finercut.scoring import ScoringContext, run_block
from finercut.search import Step


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
    """Gromov et al.'s distance: ``arccos(cos) / pi`` of two residual states at the last token, sample mean.

    Args:
        earlier, later: ``[samples, seq, hidden]``.
    """
    cosine = _cosine(earlier[:, -1], later[:, -1]).clamp(-1.0, 1.0)
    return float((torch.arccos(cosine) / math.pi).mean())


def best_contiguous_run(residuals: Sequence[torch.Tensor], length: int) -> tuple[int, list[float]]:
    """Start of the ``length`` consecutive blocks whose input and output are closest (earliest on ties).

    Args:
        residuals: ``L + 1`` states ``[samples, seq, hidden]``: the input of each block, then the last output.

    Returns:
        The best start and the distance of every start ``0..L-length``.
    """
    num_blocks = len(residuals) - 1
    if not 1 <= length <= num_blocks:
        raise ValueError(f"cannot remove {length} consecutive blocks of {num_blocks}")
    distances = [last_token_angular_distance(residuals[s], residuals[s + length]) for s in range(num_blocks - length + 1)]
    return min(range(len(distances)), key=lambda s: (distances[s], s)), distances


@torch.inference_mode()
def original_residuals(context: ScoringContext) -> list[torch.Tensor]:
    """The original model's residual stream at every block boundary, all samples concatenated.

    Returns:
        ``L + 1`` tensors ``[samples, seq, hidden]`` on the CPU: each block's input, then the last block's output.
    """
    blocks = context.adapter.blocks_of(context.model)
    per_batch = []
    for batch in context.batches:
        states = [batch.first_block_input]
        for i, block in enumerate(blocks):
            states.append(run_block(block, states[-1], batch.block_calls[i]))
        per_batch.append([state.float().cpu() for state in states])
    return [torch.cat([states[i] for states in per_batch]) for i in range(len(blocks) + 1)]


def _steps_in_order(order: Sequence[Unit], scores: dict[Unit, float | None], seconds: float,
                    executions: int) -> list[Step]:
    """One-shot methods as steps: every step carries the same candidate scores; costs are booked on step 0."""
    candidates = tuple(scores.items())
    return [
        Step(index=k, unit=unit, distance=scores.get(unit), candidates=candidates, window_first_block=0,
             block_executions=executions if k == 0 else 0, seconds=seconds if k == 0 else 0.0)
        for k, unit in enumerate(order)
    ]


def shortgpt_steps(context: ScoringContext, *, count: int) -> list[Step]:
    """ShortGPT: remove the ``count`` blocks of lowest Block Influence, lowest first (earliest on ties)."""
    started, executions_before = time.perf_counter(), context.block_executions
    residuals = original_residuals(context)
    scores = {Unit(i, BLOCK): block_influence(residuals[i], residuals[i + 1]) for i in range(len(residuals) - 1)}
    order = sorted(scores, key=lambda unit: (scores[unit], unit.block))[:count]
    return _steps_in_order(order, scores, time.perf_counter() - started, context.block_executions - executions_before)


def deeper_layers_steps(context: ScoringContext, *, count: int) -> list[Step]:
    """DeeperLayers: remove the ``count`` consecutive blocks whose input and output are closest.

    Candidate scores are keyed by the run's first block. Unlike greedy removal, the best run of n blocks need
    not contain the best run of n-1, so each target is a separate selection.
    """
    started, executions_before = time.perf_counter(), context.block_executions
    residuals = original_residuals(context)
    start, distances = best_contiguous_run(residuals, count)
    scores = {Unit(s, BLOCK): d for s, d in enumerate(distances)}
    order = [Unit(b, BLOCK) for b in range(start, start + count)]
    steps = _steps_in_order(order, scores, time.perf_counter() - started, context.block_executions - executions_before)
    return [Step(step.index, step.unit, distances[start], step.candidates, 0, step.block_executions, step.seconds)
            for step in steps]


def random_steps(num_blocks: int, *, granularity: str, count: int, seed: int) -> list[Step]:
    """Uniformly random units: the first ``count`` of a seeded shuffle, so smaller counts are prefixes."""
    order = all_units(num_blocks, granularity)
    random.Random(seed).shuffle(order)
    return _steps_in_order(order[:count], {}, 0.0, 0)
