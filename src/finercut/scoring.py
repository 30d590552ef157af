"""Scoring candidates: how far the model's output moves when one more unit is removed (EvalOutputChange).

Two scorers with the same interface and, up to floating-point rounding, the same results:

* :class:`FastScorer` caches the current model's input to every block once per step. A candidate at block ``p``
  leaves everything before ``p`` unchanged, so it is scored by replaying blocks ``p..L-1`` from the cache.
* :class:`NaiveScorer` runs the whole masked model's own forward for every candidate. It is the reference the
  fast path is tested against.

Both compare with the **original** model's output, computed once (:class:`ReferenceOutput`), never holding
full-vocabulary logits for more than a chunk of positions at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from finercut.adapters import ArchitectureAdapter
from finercut.candidates import Unit
from finercut.distances import Metric, NonFiniteOutputError, PreparedReference
from finercut.masking import masked

DEFAULT_CHUNK_BYTES = 64 * 2**20
DEFAULT_MAX_REFERENCE_BYTES = 2 * 2**30

CandidateCallback = Callable[[Unit, float], None]


@dataclass
class BlockCall:
    """What one block receives besides the hidden states (masks, position embeddings, ...), as captured."""

    args: tuple
    kwargs: dict


@dataclass
class CalibrationBatch:
    """One batch of calibration samples and what the original model's blocks saw and produced on it."""

    input_ids: torch.Tensor
    """``[batch, seq]`` token ids."""
    first_block_input: torch.Tensor
    """``[batch, seq, hidden]`` embedding output: the input of block 0, unchanged by any removal."""
    block_calls: list[BlockCall]
    """Per block, the non-hidden-state arguments of its call."""
    reference_output: torch.Tensor
    """``[batch, seq, hidden]`` the original model's last-block output."""


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """One decoder block through its own forward: ``[batch, seq, hidden] -> [batch, seq, hidden]``."""
    output = block(hidden, *call.args, **call.kwargs)
    return output[0] if isinstance(output, tuple) else output


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


@torch.inference_mode()
def capture_calibration(
    model: nn.Module, adapter: ArchitectureAdapter, input_ids: torch.Tensor, *, batch_size: int
) -> list[CalibrationBatch]:
    """Run the original model once over the samples, recording each block's call and the final block output.

    Args:
        input_ids: ``[samples, seq]`` calibration token ids.
        batch_size: samples per forward pass.
    """
    blocks = adapter.blocks_of(model)
    batches = []
    for start in range(0, input_ids.shape[0], batch_size):
        batch_ids = input_ids[start : start + batch_size]
        calls: list[BlockCall | None] = [None] * len(blocks)
        captured: dict[str, torch.Tensor] = {}

        def record_call(index: int):
            def hook(module, args, kwargs):
                hidden, rest_args, rest_kwargs = _split_hidden(args, kwargs)
                calls[index] = BlockCall(rest_args, rest_kwargs)
                if index == 0:
                    captured["first"] = hidden

            return hook

        def record_output(module, args, kwargs, output):
            captured["last"] = output[0] if isinstance(output, tuple) else output

        handles = [block.register_forward_pre_hook(record_call(i), with_kwargs=True) for i, block in enumerate(blocks)]
        handles.append(blocks[-1].register_forward_hook(record_output, with_kwargs=True))
        try:
            model.base_model(input_ids=batch_ids.to(model.device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        batches.append(CalibrationBatch(batch_ids, captured["first"], calls, captured["last"]))
    return batches


class ReferenceOutput:
    """The original model's output on the calibration batches, prepared for one metric.

    Prepared chunks are kept while they fit in ``max_bytes``; otherwise each chunk is recomputed from the stored
    last-block output when needed (one more output-head product per chunk, but memory stays flat).
    """

    def __init__(
        self, model: nn.Module, adapter: ArchitectureAdapter, metric: Metric, batches: Sequence[CalibrationBatch],
        *, chunk_rows: int, max_bytes: int,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.metric = metric
        self.batches = batches
        self.chunk_rows = chunk_rows
        vocab = model.get_submodule(adapter.head).out_features
        rows = sum(batch.reference_output.shape[0] * batch.reference_output.shape[1] for batch in batches)
        bytes_per_value = 8 if model.dtype == torch.float64 else 4  # distances run in float32 or float64
        self.keeps_prepared = rows * vocab * bytes_per_value <= max_bytes
        # Preparing every chunk once also checks that the original output is finite.
        self._prepared: list[list[PreparedReference]] = []
        for batch in batches:
            chunks = (self._prepare(rows_) for rows_ in self._row_chunks(batch.reference_output))
            if self.keeps_prepared:
                self._prepared.append(list(chunks))
            else:
                for _ in chunks:
                    pass

    def _row_chunks(self, output: torch.Tensor) -> Iterator[torch.Tensor]:
        rows = output.reshape(-1, output.shape[-1])
        for start in range(0, rows.shape[0], self.chunk_rows):
            yield rows[start : start + self.chunk_rows]

    @torch.inference_mode()
    def _prepare(self, rows: torch.Tensor) -> PreparedReference:
        logits = self.adapter.logits(self.model, rows)
        if not torch.isfinite(logits).all():
            raise NonFiniteOutputError(
                f"the original model's logits contain NaN or inf (dtype {logits.dtype}); load the model in "
                "bfloat16 or float32 instead of float16"
            )
        return self.metric.prepare(logits)

    def chunks(self, batch_index: int) -> Iterator[PreparedReference]:
        """The prepared reference of batch ``batch_index``, chunk by chunk of ``chunk_rows`` positions."""
        if self.keeps_prepared:
            yield from self._prepared[batch_index]
        else:
            for rows in self._row_chunks(self.batches[batch_index].reference_output):
                yield self._prepare(rows)


@dataclass
class ScoringContext:
    """Everything both scorers share: the model, the calibration replay data and the prepared reference."""

    model: nn.Module
    adapter: ArchitectureAdapter
    metric: Metric
    batches: list[CalibrationBatch]
    reference: ReferenceOutput
    chunk_rows: int
    block_rows: int = 0
    """Rows (samples) processed by decoder blocks; divided by the sample count it counts block executions."""
    _hooks: list = field(default_factory=list)

    @classmethod
    def build(
        cls, model: nn.Module, adapter: ArchitectureAdapter, metric: Metric, input_ids: torch.Tensor, *,
        batch_size: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_reference_bytes: int = DEFAULT_MAX_REFERENCE_BYTES,
    ) -> "ScoringContext":
        """Run the original model once over ``input_ids`` (``[samples, seq]``) and prepare its output."""
        vocab = model.get_submodule(adapter.head).out_features
        chunk_rows = max(1, chunk_bytes // (vocab * 4))
        batches = capture_calibration(model, adapter, input_ids, batch_size=batch_size or input_ids.shape[0])
        reference = ReferenceOutput(model, adapter, metric, batches, chunk_rows=chunk_rows,
                                    max_bytes=max_reference_bytes)
        context = cls(model, adapter, metric, batches, reference, chunk_rows)
        context._count_block_rows()
        return context

    def _count_block_rows(self) -> None:
        def count(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.block_rows += hidden.shape[0]

        for block in self.adapter.blocks_of(self.model):
            self._hooks.append(block.register_forward_pre_hook(count, with_kwargs=True))

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @property
    def num_samples(self) -> int:
        return sum(batch.input_ids.shape[0] for batch in self.batches)

    @property
    def num_positions(self) -> int:
        return sum(batch.input_ids.numel() for batch in self.batches)

    @property
    def block_executions(self) -> int:
        """Block runs over the whole calibration set so far (each block call on a batch counts its share)."""
        return self.block_rows // self.num_samples

    def distance_sum(self, batch_index: int, hidden: torch.Tensor, *, normed: bool = False) -> float:
        """Sum over positions of the metric between the original output and the one from ``hidden``.

        Works chunk by chunk of positions against the prepared reference, so that full-vocabulary logits never
        exist for more than ``chunk_rows`` positions.

        Args:
            hidden: ``[batch, seq, hidden]`` the last block's output, or with ``normed`` the final norm's.
        """
        rows = hidden.reshape(-1, hidden.shape[-1])
        to_logits = self.adapter.head_logits if normed else self.adapter.logits
        total = 0.0
        for chunk_index, prepared in enumerate(self.reference.chunks(batch_index)):
            start = chunk_index * self.chunk_rows
            logits = to_logits(self.model, rows[start : start + self.chunk_rows])
            total += float(self.metric.per_position(prepared, logits).sum())
        return total


def check_finite(distance: float, unit: Unit, dtype: torch.dtype) -> float:
    if not math.isfinite(distance):
        raise NonFiniteOutputError(
            f"candidate {unit} gives NaN or inf logits (model dtype {dtype}); this usually means float16 "
            "overflow: load the model in bfloat16 or float32"
        )
    return distance


class FastScorer:
    """Scores candidates by replaying blocks from cached block inputs (the prefix cache)."""

    def __init__(self, context: ScoringContext) -> None:
        self.context = context
        num_blocks = context.adapter.num_blocks(context.model)
        self._inputs = [[batch.first_block_input] + [None] * (num_blocks - 1) for batch in context.batches]
        self._valid_through = 0  # block inputs 0.._valid_through are current
        self._cached_for: list[Unit] = []

    @property
    def block_executions(self) -> int:
        return self.context.block_executions

    @torch.inference_mode()
    def score(
        self, removed: Sequence[Unit], candidates: Sequence[Unit], *, on_candidate: CandidateCallback | None = None
    ) -> list[tuple[Unit, float]]:
        context = self.context
        self._invalidate_for(list(removed))
        results = []
        with masked(context.model, context.adapter, removed):
            self._refresh()
            for unit in candidates:
                with masked(context.model, context.adapter, [unit]):
                    total = sum(
                        context.distance_sum(b, self._replay_from(b, unit.block)) for b in range(len(context.batches))
                    )
                distance = check_finite(total / context.num_positions, unit, context.model.dtype)
                results.append((unit, distance))
                if on_candidate:
                    on_candidate(unit, distance)
        return results

    @torch.inference_mode()
    def restore(self, removed: Sequence[Unit]) -> None:
        """Rebuild the cache a run would hold after removing ``removed`` (resuming), so that the next step costs
        exactly what it costs in an uninterrupted run: only the inputs up to the last removal's block."""
        removed = list(removed)
        if not removed:
            return
        last_block = removed[-1].block
        blocks = self.context.adapter.blocks_of(self.context.model)
        with masked(self.context.model, self.context.adapter, removed):
            for b, batch in enumerate(self.context.batches):
                inputs = self._inputs[b]
                for i in range(last_block):
                    inputs[i + 1] = run_block(blocks[i], inputs[i], batch.block_calls[i])
        self._valid_through = last_block
        self._cached_for = removed

    def _invalidate_for(self, removed: list[Unit]) -> None:
        # Removing a unit at block q changes the inputs of blocks after q only.
        if removed[: len(self._cached_for)] == self._cached_for:
            new_units = removed[len(self._cached_for) :]
            if new_units:
                self._valid_through = min(self._valid_through, *(unit.block for unit in new_units))
        else:
            self._valid_through = 0
        self._cached_for = removed

    def _refresh(self) -> None:
        blocks = self.context.adapter.blocks_of(self.context.model)
        for b, batch in enumerate(self.context.batches):
            inputs = self._inputs[b]
            for i in range(self._valid_through, len(blocks) - 1):
                inputs[i + 1] = run_block(blocks[i], inputs[i], batch.block_calls[i])
        self._valid_through = len(blocks) - 1

    def _replay_from(self, batch_index: int, first_block: int) -> torch.Tensor:
        blocks = self.context.adapter.blocks_of(self.context.model)
        batch = self.context.batches[batch_index]
        hidden = self._inputs[batch_index][first_block]
        for i in range(first_block, len(blocks)):
            hidden = run_block(blocks[i], hidden, batch.block_calls[i])
        return hidden


class NaiveScorer:
    """Scores every candidate with a full forward of the masked model through its own ``transformers`` code.

    Only the forward differs from :class:`FastScorer`: the output head and the distance are computed the same
    way (chunked, against the same prepared reference), so comparing the two measures what caching saves.
    """

    def __init__(self, context: ScoringContext) -> None:
        self.context = context

    @property
    def block_executions(self) -> int:
        return self.context.block_executions

    def restore(self, removed: Sequence[Unit]) -> None:
        """Nothing is cached between candidates, so resuming needs no preparation."""

    @torch.inference_mode()
    def score(
        self, removed: Sequence[Unit], candidates: Sequence[Unit], *, on_candidate: CandidateCallback | None = None
    ) -> list[tuple[Unit, float]]:
        context = self.context
        results = []
        for unit in candidates:
            with masked(context.model, context.adapter, [*removed, unit]):
                total = sum(self._batch_distance_sum(b) for b in range(len(context.batches)))
            distance = check_finite(total / context.num_positions, unit, context.model.dtype)
            results.append((unit, distance))
            if on_candidate:
                on_candidate(unit, distance)
        return results

    def _batch_distance_sum(self, batch_index: int) -> float:
        context = self.context
        input_ids = context.batches[batch_index].input_ids.to(context.model.device)
        normed = context.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        return context.distance_sum(batch_index, normed, normed=True)


SCORERS: dict[str, Callable[[ScoringContext], Any]] = {"fast": FastScorer, "naive": NaiveScorer}
