"""The run config (a frozen dataclass, ``run.json``) and the typed record of what a run removed (``record.json``).

:class:`RunConfig` holds every setting of a run; what a setting means for the chosen method (its granularities,
whether ``only``, a metric or a cost target applies, its own ``options``) is the method's declaration
(:mod:`finercut.methods`), checked when the config is made. :class:`Record` is ``record.json`` as a dataclass:
:meth:`Record.from_dict` reads every format finercut has written (``finercut-record/1`` and ``/2``) and
:meth:`Record.to_dict` writes the current one. Nothing outside this module reads a record by its keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import typing
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from finercut.candidates import (
    GRANULARITIES, ONLY_KINDS, Unit, count_units, first_window_block, removed_sublayers, target_count,
)
from finercut.distances import METRICS
from finercut.errors import ConfigError
from finercut.jsonio import read_json, write_json_atomic
from finercut.methods import DISTANCE, PERPLEXITY, PERPLEXITY_METRIC, Method, method_for_metric, method_named
from finercut.methods.base import options_from_dict
from finercut.pruned_modeling import ATTENTION, FFN
from finercut.search import Step

RUN_FORMAT = "finercut-run/1"
RECORD_FORMAT = "finercut-record/2"
RECORD_FORMATS = ("finercut-record/1", RECORD_FORMAT)
"""Record formats this version reads. /2 holds the method's ``options`` in the config (/1 had Shapley's two
settings as top-level config fields) and the list of the run's ``outputs``."""
PROGRESS_FORMAT = "finercut-progress/1"
SCORER_NAMES = ("fast", "naive")
DEFAULT_METHOD = "finercut"
MAX_SEED = 2**63 - 1
LEGACY_OPTION_FIELDS = {"shapley_permutations": "permutations", "shapley_truncation": "truncation"}
"""Config fields of run files written before methods had options of their own, and the option each became."""


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
    method: str = DEFAULT_METHOD
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
    options: Any = None
    """The method's own options (its :attr:`Method.options` dataclass; a dict is converted); None: its
    defaults."""

    def __post_init__(self) -> None:
        self._check_types()
        self._resolve_metric_alias()
        method = method_named(self.method)
        if self.granularity is None:
            object.__setattr__(self, "granularity", method.granularities[0])
        _check_choice("granularity", self.granularity, GRANULARITIES)
        if self.granularity not in method.granularities:
            raise ConfigError(f"method {self.method} removes whole blocks; use granularity block (or leave it unset)"
                              if method.granularities == ("block",) else
                              f"method {self.method} supports granularity {', '.join(method.granularities)}, "
                              f"not {self.granularity}")
        if self.only is not None:
            _check_choice("only", self.only, ONLY_KINDS)
            if self.granularity != "sublayer" or not method.supports_only:
                raise ConfigError(f"only={self.only} needs granularity sublayer and a method that scores sub-layers "
                                  f"({', '.join(_names_where(lambda m: m.supports_only))}), not {self.method} with "
                                  f"{self.granularity}")
        self._check_metric(method)
        _check_choice("scorer", self.scorer, SCORER_NAMES)
        if sum(value is not None for value in (self.ratio, self.count, self.cost_target)) != 1:
            raise ConfigError("give exactly one of ratio, count and a cost target")
        self._check_cost_target(method)
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"count must be at least 1, got {self.count}")
        for name in ("window_until_ratio", "window_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not (self.replay_memory_gb >= 0 and math.isfinite(self.replay_memory_gb)):
            raise ConfigError(f"replay_memory_gb must be >= 0 (GiB; 0 keeps no replay states), got "
                              f"{self.replay_memory_gb}")
        for name, minimum in (("num_samples", 1), ("seq_len", 2), ("batch_size", 1), ("threads", 1),
                              ("window_first_block", 0), ("seed", 0)):
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ConfigError(f"{name} must be at least {minimum}, got {value}")
        if self.seed > MAX_SEED:
            raise ConfigError(f"seed must be at most {MAX_SEED} (2^63 - 1), got {self.seed}")
        options = self.options
        if options is None or isinstance(options, dict):
            options = options_from_dict(method.options, options, method.name)
        elif not isinstance(options, method.options):
            raise ConfigError(f"options of method {method.name} must be {method.options.__name__}, got "
                              f"{type(options).__name__}")
        object.__setattr__(self, "options", options)
        method.check(self)

    @property
    def method_spec(self) -> Method:
        """The registered method this config runs."""
        return method_named(self.method)

    def _check_types(self) -> None:
        """Every field has its declared type (a run.json edited by hand, or a wrong value from an API caller)."""
        hints = typing.get_type_hints(RunConfig)
        for spec in fields(self):
            value, hint = getattr(self, spec.name), hints[spec.name]
            if hint is Any:
                continue
            allowed = tuple(t for t in (typing.get_args(hint) or (hint,)))
            if value is None and type(None) in allowed:
                continue
            if float in allowed and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, spec.name, value)
            ok = isinstance(value, tuple(t for t in allowed if t is not type(None)))
            if ok and isinstance(value, bool) and bool not in allowed:
                ok = False
            if not ok:
                names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
                raise ConfigError(f"run setting {spec.name} must be {names}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value) and spec.name != "replay_memory_gb":
                raise ConfigError(f"run setting {spec.name} must be a finite number, got {value}")

    def _resolve_metric_alias(self) -> None:
        """A metric that names a method by itself (``ppl``: BlockPruner) selects it; that method's metric is
        always its alias (runs saved before the alias existed hold BlockPruner with the default ``js``)."""
        aliased = method_for_metric(self.metric)
        if aliased is not None:
            if self.method not in (DEFAULT_METHOD, aliased.name):
                other = method_named(self.method)
                takes = f"{self.method} takes one of {', '.join(METRICS)}" if other.objective == DISTANCE else \
                    f"{self.method} takes no metric"
                raise ConfigError(f"metric {self.metric} is {aliased.label}'s calibration perplexity and works with "
                                  f"method {aliased.name} (or no method), not {self.method}; {takes}")
            object.__setattr__(self, "method", aliased.name)

    def _check_metric(self, method: Method) -> None:
        if method.objective == PERPLEXITY:
            if self.metric not in (PERPLEXITY_METRIC, "js"):
                raise ConfigError(f"method {self.method} scores candidates by calibration perplexity, not by "
                                  f"{self.metric}; leave the metric unset or give metric {PERPLEXITY_METRIC}")
            object.__setattr__(self, "metric", PERPLEXITY_METRIC)
        else:
            _check_choice("metric", self.metric, (*METRICS, PERPLEXITY_METRIC))

    def _check_cost_target(self, method: Method) -> None:
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
        if not method.cost_targets:
            raise ConfigError(f"a cost target needs method {', '.join(_names_where(lambda m: m.cost_targets))} "
                              f"(the distance-per-cost search), not {self.method}")

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
        if "method" in changes and "options" not in changes and changes["method"] != self.method:
            changes["options"] = None  # another method's options start from its defaults
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["options"] = dataclasses.asdict(self.options)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "RunConfig":
        """A config as :meth:`to_dict` wrote it, or as an older finercut wrote it (see :func:`migrate_config`)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a run config is a JSON object of settings, got {type(data).__name__}")
        data = migrate_config(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown run settings {unknown}")
        return cls(**data)


def migrate_config(data: dict) -> dict:
    """A config dict of any earlier format in today's form: Shapley's ``shapley_permutations`` and
    ``shapley_truncation`` fields become the Shapley method's options (other methods ignored them)."""
    data = dict(data)
    legacy = {LEGACY_OPTION_FIELDS[name]: data.pop(name) for name in list(data) if name in LEGACY_OPTION_FIELDS}
    if legacy and data.get("options") is None:
        method = method_named(str(data.get("method") or DEFAULT_METHOD))
        names = {spec.name for spec in dataclasses.fields(method.options)}
        options = {name: value for name, value in legacy.items() if name in names}
        if options:
            data["options"] = options
    return data


def _names_where(test) -> list[str]:
    from finercut.methods import registered

    return [name for name, method in registered().items() if test(method)]


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


TARGET_FIELDS = ("ratio", "count", "cost_fraction")
"""Fields a run may change to extend itself: the count (ratio or count) or, keeping the same cost measure, the
fraction (a smaller fraction extends a finished run). A change of cost measure, or between a cost target and a
count, changes the selection rule: it is a difference."""
WORK_ONLY_FIELDS = ("replay_memory_gb",)
"""Run settings that change how much work the search does, never its result: a resume may change them."""


def config_differences(saved: RunConfig, new: RunConfig) -> list[str]:
    """Fields in which two run configs differ, as ``name: saved -> new`` lines (method options as
    ``options.name``).

    The target (ratio or count; the fraction of a cost target) may differ where a larger one extends the run
    (methods whose runs are prefixes of longer ones), and settings that change only the work
    (:data:`WORK_ONLY_FIELDS`) always may.
    """
    ignored = WORK_ONLY_FIELDS + (TARGET_FIELDS if saved.method_spec.extendable else ()) + ("options",)
    lines = [
        f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(new, f.name)!r}"
        for f in fields(RunConfig)
        if f.name not in ignored and getattr(saved, f.name) != getattr(new, f.name)
    ]
    if saved.method == new.method:
        old, current = dataclasses.asdict(saved.options), dataclasses.asdict(new.options)
        lines += [f"options.{name}: {old.get(name)!r} -> {current.get(name)!r}"
                  for name in sorted(set(old) | set(current)) if old.get(name) != current.get(name)]
    return lines


def environment_info(*, threads: int, device: str) -> dict:
    import transformers

    from finercut.version import __version__

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


def removal_key(units: Sequence[Unit]) -> str:
    """A short hash of a removal order: what an output made for exactly these removals is tagged with."""
    payload = json.dumps([unit.to_dict() for unit in units], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------------
# The record


class RecordError(ConfigError):
    """A record.json that is not a finercut record or contradicts itself."""


COMPUTED_KEYS = ("format", "created", "method", "granularity", "metric", "scorer", "model", "calibration",
                 "environment", "config", "target", "reached", "window", "removed", "steps", "timings", "outputs")
"""The keys :meth:`Record.to_dict` writes from the record's fields; every other key is an extra (``kv_cache``,
``scoring``, ``importance``, ``cost_target``, ``cost_model``, ``cost_trajectory``, ``distributed``, ...)."""


@dataclass(frozen=True)
class Record:
    """What a run removed, on what, and per step why: ``record.json`` as a dataclass.

    The removals are the steps' units; the counts reached, the method, granularity and metric follow from the
    steps and the config. ``extras`` holds what a method or the run adds (``scoring``, ``importance``,
    ``kv_cache``, ``cost_target``/``cost_model``/``cost_trajectory``, ``distributed``, ``prefix_of``, ``gains``).
    """

    config: RunConfig
    model: dict
    """What the record keeps about the model: ``id``, ``architecture``, ``num_blocks``, ``dtype``, ..."""
    calibration: dict
    environment: dict
    steps: tuple[Step, ...]
    target_count: int
    window_first_block: int | None
    timings: dict = field(default_factory=dict)
    created: str = field(default_factory=now_iso)
    outputs: tuple[str, ...] = ()
    """The files and folders of the run folder made for this record (``layer_map.png``, ``model``, ...)."""
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        if not isinstance(self.model.get("num_blocks"), int) or self.model["num_blocks"] < 1:
            raise RecordError("a record's model needs its block count (num_blocks), got "
                              f"{self.model.get('num_blocks')!r}")

    # -- what follows from the fields -----------------------------------------------------------------------------

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def method_spec(self) -> Method:
        return self.config.method_spec

    @property
    def granularity(self) -> str:
        return self.config.granularity

    @property
    def metric(self) -> str | None:
        return self.config.metric if self.method_spec.objective else None

    @property
    def num_blocks(self) -> int:
        return int(self.model["num_blocks"])

    @property
    def removed(self) -> list[Unit]:
        return [step.unit for step in self.steps]

    @property
    def reached(self) -> dict:
        return removal_summary(self.removed, num_blocks=self.num_blocks, granularity=self.granularity)

    @property
    def removal_key(self) -> str:
        return removal_key(self.removed)

    @property
    def prefix_of(self) -> int | None:
        """The length of the record this one is a prefix of (None: a whole run)."""
        prefix = self.extras.get("prefix_of")
        return None if prefix is None else int(prefix["count"])

    @property
    def cost_target(self) -> dict | None:
        return self.extras.get("cost_target")

    @property
    def cost_trajectory(self) -> list[dict] | None:
        return self.extras.get("cost_trajectory")

    def title(self) -> str:
        """One line naming model, method and what was removed (the layer map's title)."""
        reached = self.reached
        method = self.method + (f" ({self.metric})" if self.metric else "")
        return (f"{self.model.get('id')}: {method}, {reached['sublayers']}/{2 * self.num_blocks} "
                f"sub-layers removed (ratio {reached['sublayer_ratio']:.1%})")

    def prefix(self, count: int) -> "Record":
        """The record of the same run stopped after ``count`` removals (runs of prefix-consistent methods)."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(self.steps):
            raise ConfigError(f"count must be between 1 and the {len(self.steps)} units the record removed, "
                              f"got {count}")
        if count == len(self.steps):
            return self
        extras = {**self.extras, "prefix_of": {"count": len(self.steps)}}
        if self.cost_trajectory:  # a cost-target record's trajectory cut to the prefix (it need not meet the target)
            trajectory = self.cost_trajectory[:count]
            extras["cost_trajectory"] = trajectory
            if self.cost_target:
                extras["cost_target"] = {**self.cost_target, "reached": trajectory[-1][self.cost_target["measure"]]}
        return dataclasses.replace(self, steps=self.steps[:count], target_count=count, outputs=(), extras=extras,
                                   config=self.config)

    # -- JSON ------------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        prefix = self.prefix_of is not None
        return {
            "format": RECORD_FORMAT,
            "created": self.created,
            "method": self.method,
            "granularity": self.granularity,
            "metric": self.metric,
            "scorer": self.config.scorer if self.method_spec.scorer_options else None,
            "model": {**self.model, "num_blocks": self.num_blocks},
            "calibration": self.calibration,
            "environment": self.environment,
            "config": self.config.to_dict(),
            "target": {"count": self.target_count, "ratio": None if prefix else self.config.ratio},
            "reached": self.reached,
            "window": {"until_ratio": self.config.window_until_ratio, "first_block": self.window_first_block},
            "removed": [unit.to_dict() for unit in self.removed],
            "steps": [step.to_dict() for step in self.steps],
            "timings": self.timings,
            "outputs": list(self.outputs),
            **self.extras,
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str | Path | None = None) -> "Record":
        """A record of any format this version reads (:data:`RECORD_FORMATS`); a malformed one is a one-line
        :class:`RecordError` naming ``source``."""
        where = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise RecordError(f"{where}not a finercut record (a JSON object), got {type(data).__name__}")
        if data.get("format") not in RECORD_FORMATS:
            raise RecordError(f"{where}not a finercut record (format {data.get('format')!r}; this version reads "
                              f"{', '.join(RECORD_FORMATS)})")
        try:
            config = RunConfig.from_dict(data["config"])
            steps = tuple(Step.from_dict(step) for step in data["steps"])
            removed = [Unit.from_dict(entry) for entry in data["removed"]]
            record = cls(
                config=config, model=dict(data["model"]), calibration=dict(data.get("calibration") or {}),
                environment=dict(data.get("environment") or {}), steps=steps,
                target_count=int((data.get("target") or {}).get("count") or len(steps)),
                window_first_block=(data.get("window") or {}).get("first_block"),
                timings=dict(data.get("timings") or {}), created=str(data.get("created") or ""),
                outputs=tuple(data.get("outputs") or ()),
                extras={key: value for key, value in data.items() if key not in COMPUTED_KEYS},
            )
        except ConfigError as error:
            raise RecordError(f"{where}{error}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise RecordError(f"{where}not a complete finercut record ({type(error).__name__}: {error}); "
                              "run the pruning again or restore the file") from None
        if removed != record.removed:
            raise RecordError(f"{where}its removed units disagree with its steps: the record is corrupt")
        return record


def read_record(path: str | Path) -> Record:
    """``record.json`` (or a run folder holding one) as a :class:`Record`; any problem is one line naming the
    file."""
    path = Path(path)
    if path.is_dir():
        path = path / "record.json"
    return Record.from_dict(read_json(path, expect=dict, what="record"), source=path)


def read_run_config(path: str | Path) -> RunConfig:
    """The config of ``run.json`` (``{"format": ..., "config": {...}}``), one line naming the file if unusable."""
    path = Path(path)
    data = read_json(path, expect=dict, what="run settings file")
    if data.get("format") != RUN_FORMAT or not isinstance(data.get("config"), dict):
        raise ConfigError(f"{path}: not a finercut run file (format {data.get('format')!r}, expected {RUN_FORMAT} "
                          "with a config)")
    try:
        return RunConfig.from_dict(data["config"])
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


__all__ = [
    "PROGRESS_FORMAT", "RECORD_FORMAT", "RUN_FORMAT", "ConfigError", "Record", "RecordError", "RunConfig",
    "config_differences", "environment_info", "read_json", "read_record", "read_run_config", "removal_key",
    "removal_summary", "write_json_atomic",
]
