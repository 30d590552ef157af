"""What every scorer shares: the calibration replay data, the original model's output, and the work counters.

The original model runs once over the calibration samples (:func:`capture_calibration`), recording what every
block receives besides the hidden states and the last block's output. :class:`ReferenceOutput` turns that
output into logits, chunk by chunk of positions, never holding full-vocabulary logits for more than a chunk
unless all of them fit in a memory budget.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, Union

import torch
from torch import nn

from finercut.adapters import ArchitectureAdapter
from finercut.candidates import Unit
from finercut.distances import Metric, NonFiniteOutputError, PreparedReference
from finercut.placement import input_device

DEFAULT_CHUNK_BYTES = 64 * 2**20
DEFAULT_MAX_REFERENCE_BYTES = 2 * 2**30
DEFAULT_BATCH_SIZE = 1
"""Samples per forward pass: also the granularity of the early abort (one sample at a time)."""


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

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """One decoder block through its own forward: ``[batch, seq, hidden] -> [batch, seq, hidden]``."""
    output = block(hidden, *call.args, **call.kwargs)
    return output[0] if isinstance(output, tuple) else output


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


CalibrationIds = Union[torch.Tensor, Sequence[torch.Tensor]]
"""``[samples, seq]`` token ids cut into batches of ``batch_size``, or a list of ``[batch_i, seq_i]`` tensors,
each one batch as given (samples of different lengths, e.g. a task's examples, one per batch)."""


def calibration_batches(input_ids: CalibrationIds, batch_size: int) -> list[torch.Tensor]:
    """The batches of :data:`CalibrationIds`, each ``[batch, seq]``."""
    if isinstance(input_ids, torch.Tensor):
        return [input_ids[start : start + batch_size] for start in range(0, input_ids.shape[0], batch_size)]
    batches = list(input_ids)
    if not batches or any(batch.dim() != 2 or batch.numel() == 0 for batch in batches):
        raise ValueError("a list of calibration batches must hold non-empty [batch, seq] tensors")
    return batches


@torch.inference_mode()
def capture_calibration(
    model: nn.Module, adapter: ArchitectureAdapter, input_ids: CalibrationIds, *, batch_size: int
) -> list[CalibrationBatch]:
    """Run the original model once over the samples, recording each block's call and the final block output.

    Args:
        input_ids: ``[samples, seq]`` calibration token ids, or a list of ``[batch_i, seq_i]`` batches.
        batch_size: samples per forward pass (a list's batches are used as given).
    """
    blocks = adapter.blocks_of(model)
    batches = []
    for batch_ids in calibration_batches(input_ids, batch_size):
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
            model.base_model(input_ids=batch_ids.to(input_device(model)), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        batches.append(CalibrationBatch(batch_ids, captured["first"], calls, captured["last"]))
    return batches


@dataclass
class Work:
    """What scoring has cost so far, for the record and the benchmark."""

    block_runs: list[int]
    """Per block index: samples run through that block (each block call on a batch adds its size)."""
    head_rows: int = 0
    """Positions run through the full output head (vocabulary-sized logits)."""
    gram_rows: int = 0
    """Positions scored by a vocabulary-free (Gram-matrix) distance instead."""
    subset_head_rows: float = 0.0
    """Output-head rows' worth of work in vocabulary-subset bounds (positions x subset tokens / vocabulary)."""
    seconds: dict[str, float] = field(default_factory=lambda: {"blocks": 0.0, "head": 0.0, "distance": 0.0})
    """Wall time in decoder blocks (whole forwards for the naive scorer), in the output head, in distances."""
    on_block_run: Callable[[int], None] | None = None
    """Called with the samples of every block run as it starts (a progress bar counting the work)."""

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - started


class ReferenceOutput:
    """The original model's output on the calibration batches, as logits or prepared for the metric.

    A form (``prepared`` for the fast scorer's in-place distances, ``logits`` for the plain ones) is computed
    for every chunk of ``chunk_rows`` positions at its first use and kept while all chunks fit in
    ``max_bytes``; otherwise each chunk is recomputed from the stored last-block output when needed (one more
    output-head product per chunk, but memory stays flat). Building it checks once that the original output is
    finite.
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
        self._kept: dict[str, list[list]] = {}
        for batch in batches:
            for rows_ in self._row_chunks(batch.reference_output):
                self._logits(rows_)

    def _row_chunks(self, output: torch.Tensor) -> Iterator[torch.Tensor]:
        rows = output.reshape(-1, output.shape[-1])
        for start in range(0, rows.shape[0], self.chunk_rows):
            yield rows[start : start + self.chunk_rows]

    @torch.inference_mode()
    def _logits(self, rows: torch.Tensor) -> torch.Tensor:
        logits = self.adapter.logits(self.model, rows)
        if not torch.isfinite(logits).all():
            raise NonFiniteOutputError(
                f"the original model's logits contain NaN or inf (dtype {logits.dtype}); load the model in "
                "bfloat16 or float32 instead of float16"
            )
        return logits

    def _form(self, rows: torch.Tensor, form: str):
        logits = self._logits(rows)
        return self.metric.prepare(logits) if form == "prepared" else logits

    def _chunks(self, batch_index: int, form: str) -> Iterator:
        if self.keeps_prepared and form not in self._kept:
            self._kept[form] = [[self._form(rows, form) for rows in self._row_chunks(batch.reference_output)]
                                for batch in self.batches]
        if self.keeps_prepared:
            yield from self._kept[form][batch_index]
        else:
            for rows in self._row_chunks(self.batches[batch_index].reference_output):
                yield self._form(rows, form)

    def chunks(self, batch_index: int) -> Iterator[PreparedReference]:
        """The prepared reference of batch ``batch_index``, chunk by chunk of ``chunk_rows`` positions."""
        return self._chunks(batch_index, "prepared")

    def logit_chunks(self, batch_index: int) -> Iterator[torch.Tensor]:
        """The original logits (``[chunk_rows, vocab]``) of batch ``batch_index``, chunk by chunk."""
        return self._chunks(batch_index, "logits")


@dataclass
class ScoringContext:
    """Everything the scorers share: the model, the calibration replay data and the original output."""

    model: nn.Module
    adapter: ArchitectureAdapter
    metric: Metric
    batches: list[CalibrationBatch]
    reference: ReferenceOutput
    chunk_rows: int
    work: Work = None
    _hooks: list = field(default_factory=list)

    @classmethod
    def build(
        cls, model: nn.Module, adapter: ArchitectureAdapter, metric: Metric, input_ids: CalibrationIds, *,
        batch_size: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_reference_bytes: int = DEFAULT_MAX_REFERENCE_BYTES,
    ) -> "ScoringContext":
        """Run the original model once over ``input_ids`` (``[samples, seq]``, or a list of ``[batch_i, seq_i]``
        batches of different lengths) and check its output.

        Args:
            batch_size: samples per forward pass (default 1; a list's batches are used as given); the fast
                scorer's early abort decides after each batch whether to go on, so smaller batches abort sooner.
            chunk_bytes: full-vocabulary logits are computed for at most this many bytes of positions at once.
            max_reference_bytes: keep the original side of the distance in memory up to this size.
        """
        vocab = model.get_submodule(adapter.head).out_features
        chunk_rows = max(1, chunk_bytes // (vocab * 4))
        batches = capture_calibration(model, adapter, input_ids, batch_size=batch_size or DEFAULT_BATCH_SIZE)
        reference = ReferenceOutput(model, adapter, metric, batches, chunk_rows=chunk_rows,
                                    max_bytes=max_reference_bytes)
        context = cls(model, adapter, metric, batches, reference, chunk_rows,
                      Work(block_runs=[0] * adapter.num_blocks(model)))
        context._count_block_runs()
        return context

    def _count_block_runs(self) -> None:
        def counter(index: int):
            def count(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                self.work.block_runs[index] += hidden.shape[0]
                if self.work.on_block_run is not None:
                    self.work.on_block_run(hidden.shape[0])

            return count

        for index, block in enumerate(self.adapter.blocks_of(self.model)):
            self._hooks.append(block.register_forward_pre_hook(counter(index), with_kwargs=True))

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @property
    def num_samples(self) -> int:
        return sum(batch.num_samples for batch in self.batches)

    @property
    def num_positions(self) -> int:
        return sum(batch.input_ids.numel() for batch in self.batches)

    @property
    def block_rows(self) -> int:
        """Samples run through decoder blocks, summed over blocks."""
        return sum(self.work.block_runs)

    @property
    def block_executions(self) -> int:
        """Block runs over the whole calibration set so far (each block call on a batch counts its share)."""
        return self.block_rows // self.num_samples

    def distance_sum(self, batch_index: int, hidden: torch.Tensor, *, normed: bool = False) -> float:
        """Sum over positions of the metric's prepared form between the original output and the one from
        ``hidden``, through the full output head.

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
            chunk = rows[start : start + self.chunk_rows]
            with self.work.timed("head"):
                logits = to_logits(self.model, chunk)
            with self.work.timed("distance"):
                total += float(self.metric.per_position(prepared, logits).sum())
            self.work.head_rows += chunk.shape[0]
        return total


def check_finite(distance: float, unit: Unit, dtype: torch.dtype) -> float:
    if not math.isfinite(distance):
        raise NonFiniteOutputError(
            f"candidate {unit} gives NaN or inf logits (model dtype {dtype}); this usually means float16 "
            "overflow: load the model in bfloat16 or float32"
        )
    return distance
