"""The run config (a frozen dataclass, ``run.json``) and the record of what a run removed (``record.json``)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from finercut.candidates import (
    GRANULARITIES, ONLY_KINDS, Unit, count_units, first_window_block, removed_sublayers, target_count,
)
from finercut.distances import METRICS
from finercut.errors import ConfigError
from finercut.pruned_modeling import ATTENTION, FFN
from finercut.search import Step

RUN_FORMAT = "finercut-run/1"
RECORD_FORMAT = "finercut-record/1"
PROGRESS_FORMAT = "finercut-progress/1"
METHOD_GRANULARITIES = {
    "finercut": ("sublayer", "block"),
    "random": ("sublayer", "block"),
    "shortgpt": ("block",),
    "deeper_layers": ("block",),
    "shapley": ("sublayer", "block"),
    "blockpruner": ("sublayer", "block"),
}
"""Pruning methods and the granularities each supports; the first is its default."""
ONLY_METHODS = ("finercut", "random", "shapley", "blockpruner")
"""Methods that can restrict their candidates to one kind of sub-layer (``only``)."""
SCORER_NAMES = ("fast", "naive")
PERPLEXITY_METRIC = "ppl"
"""BlockPruner's score, the calibration perplexity of the pruned model: ``metric="ppl"`` and
``method="blockpruner"`` name the same search."""
DISTANCE_METRIC_METHODS = ("finercut", "shapley")
"""Methods that score by an output distance to the original model (``metric``)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything needed to re-run (or resume) a pruning run.

    ``None`` in ``threads`` and ``batch_size`` means "this machine's thread count" and "one sample per batch";
    a run resolves them (and ``auto`` device and dtype) before writing ``run.json``, so the file states exactly
    what ran.
    """

    model: str | None = None
    """Hub id, local folder or .gguf file; None: the default SmolLM2-135M-Instruct."""
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    method: str = "finercut"
    granularity: str | None = None
    """sublayer (attention and FFN separately) or block; None: the method's own (block for ShortGPT and
    DeeperLayers, which score whole blocks)."""
    only: str | None = None
    """attention or ffn: only sub-layers of that kind are candidates, and ratio counts them (L units)."""
    metric: str = "js"
    ratio: float | None = None
    """Layer pruning ratio r; removes round(r * units). Exactly one of ratio, count and cost_target."""
    count: int | None = None
    cost_target: str | None = None
    """params, macs, kv_cache or latency: remove the least distance per cost saved until the model costs at
    most cost_fraction of the dense model under this measure (finercut.budgets)."""
    cost_fraction: float | None = None
    """The cost target as a fraction of the dense model, in (0, 1)."""
    cost_context: int | None = None
    """macs: the context length (tokens of one forward pass) the MACs are counted for."""
    window_until_ratio: float = 0.4
    window_fraction: float = 0.4
    """While the window applies, candidates come from blocks >= ceil(window_fraction * L)."""
    window_first_block: int | None = None
    """Explicit first candidate block (overrides window_fraction)."""
    calibration: str = "wikitext2"
    data_dir: str | None = None
    num_samples: int = 10
    seq_len: int = 256
    seed: int = 0
    batch_size: int | None = None
    scorer: str = "fast"
    exhaustive: bool = False
    """Score every candidate on every sample (no early abort; the same selection, every distance complete)."""
    replay_memory_gb: float = 2.0
    """Fast scorer: GiB for the candidates' replay states kept from one step to the next (0: none). Changes the
    work, never a result."""
    threads: int | None = None
    save_model: bool = True
    shapley_permutations: int = 10
    """method shapley: random orders of removal sampled (see finercut.importance)."""
    shapley_truncation: float | None = None
    """method shapley: truncate a walk once its distance is this fraction from removing everything."""

    def __post_init__(self) -> None:
        self._resolve_perplexity_metric()
        _check_choice("method", self.method, tuple(METHOD_GRANULARITIES))
        if self.granularity is None:
            object.__setattr__(self, "granularity", METHOD_GRANULARITIES[self.method][0])
        _check_choice("granularity", self.granularity, GRANULARITIES)
        if self.granularity not in METHOD_GRANULARITIES[self.method]:
            raise ConfigError(f"method {self.method} removes whole blocks; use granularity block (or leave it unset)")
        if self.only is not None:
            _check_choice("only", self.only, ONLY_KINDS)
            if self.granularity != "sublayer" or self.method not in ONLY_METHODS:
                raise ConfigError(f"only={self.only} needs granularity sublayer and a method that scores sub-layers "
                                  f"({', '.join(ONLY_METHODS)}), not {self.method} with {self.granularity}")
        _check_choice("metric", self.metric, (*METRICS, PERPLEXITY_METRIC))
        _check_choice("scorer", self.scorer, SCORER_NAMES)
        if sum(value is not None for value in (self.ratio, self.count, self.cost_target)) != 1:
            raise ConfigError("give exactly one of ratio, count and a cost target")
        self._check_cost_target()
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"count must be at least 1, got {self.count}")
        for name in ("window_until_ratio", "window_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.replay_memory_gb >= 0:
            raise ConfigError(f"replay_memory_gb must be >= 0 (GiB; 0 keeps no replay states), got "
                              f"{self.replay_memory_gb}")
        if self.shapley_truncation is not None and not 0.0 <= self.shapley_truncation < 1.0:
            raise ConfigError(f"shapley_truncation must be in [0, 1), got {self.shapley_truncation}")
        for name, minimum in (("num_samples", 1), ("seq_len", 2), ("batch_size", 1), ("threads", 1),
                              ("window_first_block", 0), ("shapley_permutations", 1)):
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ConfigError(f"{name} must be at least {minimum}, got {value}")

    def _resolve_perplexity_metric(self) -> None:
        """``metric="ppl"`` selects BlockPruner; BlockPruner's metric is always ``ppl``. Runs saved before the
        alias existed hold BlockPruner with the default ``js``, which reads back as ``ppl``."""
        if self.metric == PERPLEXITY_METRIC and self.method not in ("finercut", "blockpruner"):
            raise ConfigError(f"metric ppl is BlockPruner's calibration perplexity and works with method blockpruner "
                              f"(or no method), not {self.method}; {self.method} takes one of {', '.join(METRICS)}")
        if self.metric == PERPLEXITY_METRIC:
            object.__setattr__(self, "method", "blockpruner")
        elif self.method == "blockpruner":
            if self.metric != "js":
                raise ConfigError(f"method blockpruner scores candidates by calibration perplexity, not by "
                                  f"{self.metric}; leave the metric unset or give metric ppl")
            object.__setattr__(self, "metric", PERPLEXITY_METRIC)

    def _check_cost_target(self) -> None:
        from finercut.budgets import MEASURES

        if self.cost_target is None:
            if self.cost_fraction is not None or self.cost_context is not None:
                raise ConfigError("cost_fraction and cost_context need a cost target (--target-params, "
                                  "--target-macs, --target-kv-cache or --target-latency)")
            return
        _check_choice("cost_target", self.cost_target, MEASURES)
        if self.cost_fraction is None or not 0.0 < self.cost_fraction < 1.0:
            raise ConfigError(f"a cost target is a fraction of the dense model in (0, 1), got {self.cost_fraction}")
        if self.cost_target == "macs":
            if self.cost_context is None or self.cost_context < 1:
                raise ConfigError("a MACs target needs the context length it is counted for: --context T "
                                  f"(tokens, at least 1), got {self.cost_context}")
        elif self.cost_context is not None:
            raise ConfigError(f"--context is the context length of a MACs target; a {self.cost_target} target "
                              "does not use it")
        if self.method != "finercut":
            raise ConfigError(f"a cost target needs method finercut (the distance-per-cost search), not {self.method}")

    def target(self, num_blocks: int) -> int:
        """Units to remove from a model with ``num_blocks`` blocks (at least one, and never all of them)."""
        if self.cost_target is not None:
            raise ConfigError("a cost target is met after a number of units known only once the costs are counted")
        total_units = count_units(num_blocks, self.granularity, self.only)
        count = self.count if self.count is not None else target_count(self.ratio, total_units)
        if count >= total_units:
            what = f"count {count}" if self.count is not None else f"ratio {self.ratio} (= {count} units)"
            raise ConfigError(f"{what} must be smaller than the {total_units} candidate units of this model: "
                              "removing all of them leaves no model")
        if count < 1:
            raise ConfigError(f"ratio {self.ratio} removes nothing from a model with {total_units} units")
        return count

    def first_candidate_block(self, num_blocks: int) -> int:
        if self.window_first_block is not None:
            if self.window_first_block >= num_blocks:
                raise ConfigError(f"window_first_block {self.window_first_block} >= number of blocks {num_blocks}")
            return self.window_first_block
        return first_window_block(num_blocks, self.window_fraction)

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown run settings {unknown}")
        return cls(**data)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


TARGET_FIELDS = ("ratio", "count", "cost_fraction")
"""Fields a run may change to extend itself: the count (ratio or count) or, keeping the same cost measure, the
fraction (a smaller fraction extends a finished run). A change of cost measure, or between a cost target and a
count, changes the selection rule: it is a difference."""
SELECTED_PER_TARGET = ("deeper_layers",)
"""Methods whose selection for n units need not contain the one for n-1: a run cannot be extended."""


WORK_ONLY_FIELDS = ("replay_memory_gb",)
"""Run settings that change how much work the search does, never its result: a resume may change them."""


def config_differences(saved: RunConfig, new: RunConfig) -> list[str]:
    """Fields in which two run configs differ, as ``name: saved -> new`` lines.

    The target (ratio or count; the fraction of a cost target) may differ where a larger one extends the run
    (prefix-consistent methods), and settings that change only the work (:data:`WORK_ONLY_FIELDS`) always may.
    """
    ignored = WORK_ONLY_FIELDS + (() if saved.method in SELECTED_PER_TARGET else TARGET_FIELDS)
    return [
        f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(new, f.name)!r}"
        for f in fields(RunConfig)
        if f.name not in ignored and getattr(saved, f.name) != getattr(new, f.name)
    ]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over ``path`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def environment_info(*, threads: int, device: str) -> dict:
    import transformers

    from finercut import __version__

    return {
        "finercut": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": threads,
        "device": device,
    }


def removal_summary(removed_units: Sequence[Unit], *, num_blocks: int, granularity: str) -> dict:
    """Counts of what was removed and the ratio reached (r = removed / units)."""
    sublayers = removed_sublayers(removed_units)
    attention_blocks = {unit.block for unit in sublayers if unit.kind == ATTENTION}
    ffn_blocks = {unit.block for unit in sublayers if unit.kind == FFN}
    return {
        "count": len(removed_units),
        "ratio": len(removed_units) / count_units(num_blocks, granularity),
        "sublayers": len(sublayers),
        "sublayer_ratio": len(sublayers) / (2 * num_blocks),
        "attention": len(attention_blocks),
        "ffn": len(ffn_blocks),
        "whole_blocks": len(attention_blocks & ffn_blocks),
    }


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_record(
    *, config: RunConfig, model_info: dict, calibration_info: dict, environment: dict, steps: Sequence[Step],
    num_blocks: int, target: int, window_first_block: int | None, timings: dict, extra: dict | None = None,
) -> dict:
    """The record of a run: what ran, on what, and per step what was removed and why."""
    removed = [step.unit for step in steps]
    return {
        "format": RECORD_FORMAT,
        "created": now_iso(),
        "method": config.method,
        "granularity": config.granularity,
        "metric": config.metric if config.method in (*DISTANCE_METRIC_METHODS, "blockpruner") else None,
        "scorer": config.scorer if config.method == "finercut" else None,
        "model": {**model_info, "num_blocks": num_blocks},
        "calibration": calibration_info,
        "environment": environment,
        "config": config.to_dict(),
        "target": {"count": target, "ratio": config.ratio},
        "reached": removal_summary(removed, num_blocks=num_blocks, granularity=config.granularity),
        "window": {"until_ratio": config.window_until_ratio, "first_block": window_first_block},
        "removed": [unit.to_dict() for unit in removed],
        "steps": [step.to_dict() for step in steps],
        "timings": timings,
        **(extra or {}),
    }


def removed_units(record: dict) -> list[Unit]:
    """The units a record removed, in order."""
    return [Unit.from_dict(entry) for entry in record["removed"]]


def prefix_record(record: dict, count: int) -> dict:
    """The record of the same run stopped after ``count`` removals (greedy runs are prefix-consistent)."""
    if count > len(record["removed"]):
        raise ConfigError(f"the record removed {len(record['removed'])} units; cannot take a prefix of {count}")
    units = removed_units(record)[:count]
    num_blocks = record["model"]["num_blocks"]
    return {
        **record,
        "removed": [unit.to_dict() for unit in units],
        "steps": record["steps"][:count],
        "target": {"count": count, "ratio": None},
        "reached": removal_summary(units, num_blocks=num_blocks, granularity=record["granularity"]),
        "prefix_of": {"count": len(record["removed"])},
        **_cost_prefix(record, count),
    }


def _cost_prefix(record: dict, count: int) -> dict:
    """A cost-target record's trajectory cut to the prefix (the prefix need not meet the run's target)."""
    if not record.get("cost_trajectory"):
        return {}
    trajectory = record["cost_trajectory"][:count]
    target = record.get("cost_target")
    if target:
        target = {**target, "reached": trajectory[-1][target["measure"]] if trajectory else 1.0}
    return {"cost_trajectory": trajectory, "cost_target": target}
