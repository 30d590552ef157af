"""From a record to a pruned model: the one way ``prune``, ``apply``, ``eval`` and recovery build and save one.

:func:`pruned_from_record` takes a record (or its first ``count`` removals), the dense model (loaded from the
record's own model unless one is given) and optionally a recovery, and returns the physically pruned model;
:func:`write_pruned_folder` saves it as a folder that reloads. :class:`RecoveryOptions` are checked when made and
against the model's shape (:meth:`RecoveryOptions.check_model`) before anything is loaded or searched.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from finercut.errors import ConfigError
from finercut.record import Record

Log = Callable[[str], None]


@dataclass(frozen=True)
class RecoveryOptions:
    """A recovery of the removed sub-layers (:func:`finercut.recover`), checked before any work."""

    method: str
    rank: int | None = None
    ridge: float = 0.0
    group: str | None = None
    """None: the method's default (``sublayer``; ``run`` for ``fold``)."""
    target: str | None = None
    """None: the method's default (``sublayer``; :data:`finercut.recovery.FOLD_TARGET` for ``fold``)."""
    num_samples: int = 32
    seq_len: int = 512
    data_dir: str | None = None
    """Calibration data folder (default: the run's)."""
    seed: int = 0

    def __post_init__(self) -> None:
        from finercut.recovery import TARGETS, check_recovery_options, default_group, default_target

        if not isinstance(self.ridge, (int, float)) or not math.isfinite(self.ridge):
            raise ConfigError(f"--ridge must be a finite number >= 0, got {self.ridge}")
        check_recovery_options(self.method, rank=self.rank, ridge=self.ridge, group=self.group)
        # the defaults resolved here, so the signature of an explicit default equals the default's
        object.__setattr__(self, "group", self.group or default_group(self.method))
        object.__setattr__(self, "target", self.target or default_target(self.method))
        if self.target not in TARGETS:
            raise ConfigError(f"unknown recovery target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.num_samples < 1:
            raise ConfigError(f"--recover-samples must be at least 1, got {self.num_samples}")
        if self.seq_len < 2:
            raise ConfigError(f"--recover-seq-len must be at least 2 tokens, got {self.seq_len}")

    def check_model(self, model_config: Any) -> None:
        """Refuse a recovery this model cannot take, from its config alone (before the weights load)."""
        from finercut.recovery import FOLD, check_foldable

        if self.method == FOLD:
            check_foldable(model_config)
        hidden = getattr(model_config, "hidden_size", None)
        if self.rank is not None and hidden is not None and self.rank > hidden:
            raise ConfigError(f"--rank {self.rank} exceeds the model's hidden size {hidden}; use at most {hidden}")
        limit = getattr(model_config, "max_position_embeddings", None)
        if limit is not None and self.seq_len > limit:
            raise ConfigError(f"--recover-seq-len {self.seq_len} is longer than the model's context ({limit} "
                              f"positions); use {limit} or less")
        if getattr(model_config, "use_parallel_residual", False):
            raise ConfigError("recovery supports sequential blocks only; this model has a parallel residual")

    @property
    def signature(self) -> str:
        """What distinguishes one recovered model from another made of the same removals."""
        return ",".join(f"{key}={value}" for key, value in sorted(asdict(self).items()))

    def fit_options(self) -> dict:
        return {"method": self.method, "rank": self.rank, "ridge": self.ridge, "group": self.group,
                "target": self.target, "num_samples": self.num_samples, "seq_len": self.seq_len, "seed": self.seed}


@dataclass
class PrunedModel:
    """A pruned model built from a record: the model, its tokenizer, the record (prefix) it realises."""

    model: nn.Module
    tokenizer: Any
    record: Record
    dense_stats: Any
    recovery: Any = None
    """The :class:`finercut.recovery.RecoveryResult`, if recovered."""

    def provenance(self, extra: dict | None = None) -> dict:
        facts = {**(extra or {}), "source_model": self.record.model, "count": len(self.record.steps)}
        if self.recovery is not None:
            facts["recovery"] = self.recovery.to_dict()
        return facts


def load_dense(record: Record, *, model_name: str | None = None, dtype: str | None = None) -> tuple[nn.Module, Any]:
    """The dense model and tokenizer a record was searched on (or ``model_name``), on the CPU."""
    from finercut.modelio import load_model, load_tokenizer, resolve_model_source

    source = resolve_model_source(model_name if model_name is not None else record.config.model,
                                  record.config.revision)
    tokenizer = load_tokenizer(source)
    model, _ = load_model(source, dtype=dtype or record.config.dtype, device="cpu")
    return model, tokenizer


def pruned_from_record(
    record: Record, *, count: int | None = None, model: nn.Module | None = None, tokenizer: Any = None,
    model_name: str | None = None, dtype: str | None = None, recovery: RecoveryOptions | None = None,
    log: Log | None = None,
) -> PrunedModel:
    """The dense model (``model``, changed in place, or loaded) with the record's first ``count`` removals
    (default: all) physically removed, and replaced by fitted maps when ``recovery`` is given."""
    from finercut.checkpoint import apply_removal, parameter_stats

    prefix = record if count is None else record.prefix(count)
    if model is None:
        model, tokenizer = load_dense(record, model_name=model_name, dtype=dtype)
    dense_stats = parameter_stats(model)
    result = None
    if recovery is None:
        apply_removal(model, prefix.removed, num_blocks=record.num_blocks)
    else:
        from finercut.recovery import recover

        recovery.check_model(model.config)
        model, result = recover(
            model, prefix.removed, tokenizer=tokenizer, num_blocks=record.num_blocks,
            data_dir=recovery.data_dir if recovery.data_dir is not None else record.config.data_dir,
            log=log, **recovery.fit_options(),
        )
        if log:
            log(result.summary(len(prefix.steps), dense_stats.total_parameters))
    return PrunedModel(model, tokenizer, prefix, dense_stats, result)


def write_pruned_folder(
    record: Record, output: str | os.PathLike, *, count: int | None = None, model: nn.Module | None = None,
    tokenizer: Any = None, model_name: str | None = None, dtype: str | None = None,
    recovery: RecoveryOptions | None = None, overwrite: bool = False, provenance: dict | None = None,
    log: Log | None = None,
) -> tuple[PrunedModel, Any]:
    """Build the pruned model of a record (:func:`pruned_from_record`) and save it to ``output``.

    Returns:
        The pruned model and the :class:`finercut.checkpoint.SizeReport` of the save.
    """
    from finercut.checkpoint import check_save_target, save_pruned

    output = Path(output).expanduser().resolve()
    check_save_target(output, overwrite=overwrite)
    for stale in output.parent.glob(f".{output.name}.partial-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    pruned = pruned_from_record(record, count=count, model=model, tokenizer=tokenizer, model_name=model_name,
                                dtype=dtype, recovery=recovery, log=log)
    report = save_pruned(pruned.model, output, tokenizer=pruned.tokenizer, dense_stats=pruned.dense_stats,
                         overwrite=overwrite, provenance=pruned.provenance(provenance))
    return pruned, report


def save_record_model(model: nn.Module, record: Record, folder: Path, *, tokenizer: Any = None,
                      provenance: dict | None = None, recovery: RecoveryOptions | None = None,
                      log: Log | None = None) -> Any:
    """A run's own ``model/``: the in-memory dense model it searched, pruned (in place) and saved over any
    earlier one."""
    _, report = write_pruned_folder(record, folder, model=model, tokenizer=tokenizer, recovery=recovery,
                                    overwrite=True, provenance=provenance, log=log)
    return report
