"""Recovery without fine-tuning: emulate removed sub-layers by cheap maps fitted in closed form.

Each removed sub-layer, or each maximal run of consecutive removed sub-layers (``group="run"``), is replaced by an
affine map of its input ``x`` (the residual stream where the removed part began) that predicts the residual term
``y`` the removed part would have added there:

* ``bias``: ``y ~ b``, the mean of ``y`` over the calibration tokens (the study's additive bias);
* ``linear``: ``y ~ x W + b`` by least squares, optionally with a ridge term (ReplaceMe's linear replacement,
  arXiv 2505.02819);
* ``lowrank``: the same with ``W`` cut to rank ``R`` by truncated SVD (the study's low-rank linear adapter).

The maps are fitted in model order on activations of the *pruned* model: every kept sub-layer runs, every earlier
group already runs its fitted map, so each replacement sees what the earlier ones produce. Only the removed
sub-layers' own output ``y`` is computed with their dense weights. One pass over the calibration tokens, block by
block, fits them all.

    model = finercut.recover(dense_model, removed, method="lowrank", rank=64, tokenizer=tokenizer)
    finercut.save_pruned(model, "pruned")   # the replacements are saved in the checkpoint and reload with it
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from finercut.adapters import ArchitectureAdapter, adapter_for
from finercut.candidates import KIND_ORDER, Unit, removed_sublayers
from finercut.masking import masked
from finercut.pruned_modeling import ATTENTION, FFN, REPLACEMENT_MAPS, replacement_module
from finercut.record import ConfigError

GROUPS = ("sublayer", "run")
TARGETS = ("sublayer", "dense")
DEFAULT_NUM_SAMPLES = 32
DEFAULT_SEQ_LEN = 512


# ---------------------------------------------------------------------------------------------------------------------
# The math: moment sums and closed-form fits (float64)


@dataclass
class MomentSums:
    """Running sums over tokens of ``x``, ``y``, ``x^T x`` and ``x^T y`` (float64), for one least-squares fit."""

    hidden: int
    count: int = 0
    sum_x: torch.Tensor = field(init=False)
    sum_y: torch.Tensor = field(init=False)
    xx: torch.Tensor = field(init=False)
    xy: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sum_x = torch.zeros(self.hidden, dtype=torch.float64)
        self.sum_y = torch.zeros(self.hidden, dtype=torch.float64)
        self.xx = torch.zeros(self.hidden, self.hidden, dtype=torch.float64)
        self.xy = torch.zeros(self.hidden, self.hidden, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor, *, with_products: bool = True) -> None:
        """Add tokens: ``x``, ``y`` ``[..., hidden]`` (flattened over the leading dims)."""
        x = x.reshape(-1, self.hidden).double().cpu()
        y = y.reshape(-1, self.hidden).double().cpu()
        self.count += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_y += y.sum(0)
        if with_products:
            self.xx += x.T @ x
            self.xy += x.T @ y

    def mean_x(self) -> torch.Tensor:
        return self.sum_x / self.count

    def mean_y(self) -> torch.Tensor:
        return self.sum_y / self.count

    def covariances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token covariance of ``x`` ``[hidden, hidden]`` and cross-covariance of ``x`` and ``y``."""
        mx, my = self.mean_x(), self.mean_y()
        return self.xx / self.count - torch.outer(mx, mx), self.xy / self.count - torch.outer(mx, my)


def fit_bias(sums: MomentSums) -> torch.Tensor:
    """The additive bias: the mean residual term ``[hidden]`` (minimises the squared error among constants)."""
    return sums.mean_y()


def fit_linear(sums: MomentSums, *, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``y ~ x W + b`` with ridge ``ridge * ||W||^2`` per token (the bias is not penalised).

    Returns:
        ``W`` ``[hidden_in, hidden_out]`` and ``b`` ``[hidden_out]``, float64:
        ``W = (Cov(x) + ridge I)^-1 Cov(x, y)``, ``b = mean(y) - mean(x) W``.
    """
    if ridge < 0:
        raise ConfigError(f"ridge must be >= 0, got {ridge}")
    cxx, cxy = sums.covariances()
    regularised = cxx + ridge * torch.eye(sums.hidden, dtype=cxx.dtype)
    # lstsq rather than solve: a singular covariance (fewer tokens than dimensions, constant directions) still has
    # the minimum-norm solution.
    weight = torch.linalg.lstsq(regularised, cxy).solution
    return weight, sums.mean_y() - sums.mean_x() @ weight


def truncate_rank(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of ``weight`` ``[in, out]`` (truncated SVD), as two factors.

    Returns:
        ``down`` ``[in, rank]`` and ``up`` ``[rank, out]`` with ``down @ up = U_R S_R V_R^T``.
    """
    if not 1 <= rank <= min(weight.shape):
        raise ConfigError(f"rank must be between 1 and {min(weight.shape)}, got {rank}")
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def fit_map(sums: MomentSums, method: str, *, rank: int | None = None, ridge: float = 0.0) -> dict[str, torch.Tensor]:
    """The tensors of one replacement (``nn.Linear`` layout: ``weight`` is ``[out, in]``), float64.

    ``lowrank`` refits the bias for the truncated map: ``b = mean(y) - mean(x) W_R``.
    """
    if method == "bias":
        return {"bias": fit_bias(sums)}
    weight, bias = fit_linear(sums, ridge=ridge)
    if method == "linear":
        return {"weight": weight.T.contiguous(), "bias": bias}
    if method == "lowrank":
        down, up = truncate_rank(weight, rank)
        bias = sums.mean_y() - sums.mean_x() @ down @ up
        return {"down": down.T.contiguous(), "up": up.T.contiguous(), "bias": bias}
    raise ConfigError(f"unknown recovery method {method!r}; choose one of {REPLACEMENT_MAPS}")


def map_parameters(method: str, hidden: int, rank: int | None) -> int:
    """Parameters of one replacement: ``h``, ``h^2 + h`` or ``2 h R + h``."""
    return {"bias": hidden, "linear": hidden * hidden + hidden, "lowrank": 2 * hidden * (rank or 0) + hidden}[method]


# ---------------------------------------------------------------------------------------------------------------------
# Groups: which removed sub-layers one replacement covers


def model_order(units: Iterable[Unit]) -> list[Unit]:
    """Sub-layers in the order the model runs them: by block, attention before FFN."""
    return sorted(units, key=lambda unit: (unit.block, KIND_ORDER[unit.kind]))


def replacement_groups(removed: Iterable[Unit], *, num_blocks: int, group: str) -> list[list[Unit]]:
    """The removed sub-layers one replacement each stands for, in model order.

    ``sublayer``: one group per removed sub-layer. ``run``: maximal runs of sub-layers consecutive in model order
    (``b.ffn`` is followed by ``(b+1).attention``), e.g. ``12.attn 12.ffn 13.attn`` is one run.
    """
    if group not in GROUPS:
        raise ConfigError(f"unknown recovery group {group!r}; choose one of {GROUPS}")
    ordered = model_order(removed_sublayers(removed))
    if group == "sublayer":
        return [[unit] for unit in ordered]
    position = {Unit(b, kind): 2 * b + k for b in range(num_blocks) for k, kind in enumerate((ATTENTION, FFN))}
    groups: list[list[Unit]] = []
    for unit in ordered:
        if groups and position[unit] == position[groups[-1][-1]] + 1:
            groups[-1].append(unit)
        else:
            groups.append([unit])
    return groups


# ---------------------------------------------------------------------------------------------------------------------
# Fitting on a model


@dataclass(frozen=True)
class Replacement:
    """One fitted replacement: the layout entry (dense block numbering) and its tensors."""

    entry: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


@dataclass
class RecoveryResult:
    """What :func:`recover` fitted and what it cost."""

    replacements: list[Replacement]
    method: str
    rank: int | None
    ridge: float
    group: str
    target: str
    calibration: dict
    seconds: float
    tokens: int
    extra_parameters: int
    residual_error: list[dict] = field(default_factory=list)
    """Per replacement: mean squared norm of the target ``y`` and of the fit's error on the calibration tokens."""

    def to_dict(self) -> dict:
        return {
            "method": self.method, "rank": self.rank, "ridge": self.ridge, "group": self.group, "target": self.target,
            "calibration": self.calibration, "seconds": self.seconds, "tokens": self.tokens,
            "extra_parameters": self.extra_parameters, "replacements": [r.entry for r in self.replacements],
            "residual_error": self.residual_error,
        }


def _calibration_tools():
    """``capture_calibration`` and ``run_block`` of the scorer (a module or a package, depending on the version)."""
    try:
        from finercut.scoring.context import capture_calibration, run_block
    except ImportError:
        from finercut.scoring import capture_calibration, run_block
    return capture_calibration, run_block


def _run_sublayer(model: nn.Module, adapter: ArchitectureAdapter, unit: Unit, hidden: torch.Tensor,
                  call: Any) -> torch.Tensor:
    """The residual stream after the dense sub-layer ``unit``: its block with the other sub-layer masked.

    In a sequential block (``h' = h + Attn(h)``, ``h'' = h' + FFN(h')``) this splits the block exactly in two.
    """
    _, run_block = _calibration_tools()
    other = Unit(unit.block, FFN if unit.kind == ATTENTION else ATTENTION)
    with masked(model, adapter, [other]):
        return run_block(adapter.blocks_of(model)[unit.block], hidden, call)


def _module_tensors(tensors: dict[str, torch.Tensor], like: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: value.to(dtype=like.dtype, device=like.device) for name, value in tensors.items()}


@torch.inference_mode()
def fit_replacements(
    model: nn.Module, adapter: ArchitectureAdapter, groups: Sequence[Sequence[Unit]], batches: Sequence[Any], *,
    method: str, rank: int | None = None, ridge: float = 0.0, target: str = "sublayer", skip_first: int = 0,
) -> tuple[list[Replacement], list[dict]]:
    """Fit one replacement per group, in model order, on the pruned model's own activations.

    Args:
        model: the dense model (left unchanged); its removed sub-layers compute the targets.
        groups: removed sub-layers in model order (:func:`replacement_groups`), each run consecutive.
        batches: calibration batches as :func:`finercut.scoring.capture_calibration` records them.
        target: ``sublayer``: ``y`` is what the removed sub-layers add to the pruned model's stream ``x``;
            ``dense``: ``y`` is the dense model's stream after the group minus ``x`` (so a replacement also
            corrects the drift the earlier removals left, as ReplaceMe does).
        skip_first: leave the first positions of every window out of the fit (the replacement still runs there):
            a window's first token is an attention sink whose sub-layer outputs can be orders of magnitude
            larger than elsewhere, and would dominate a mean or a least-squares fit.

    Returns:
        The replacements, and per replacement the mean squared norm of its target and of the fit's error.
    """
    like = next(model.parameters())
    hidden_size = int(model.config.hidden_size)
    removed = {unit for g in groups for unit in g}
    starts = {g[0]: list(g) for g in groups}
    if target not in TARGETS:
        raise ConfigError(f"unknown recovery target {target!r}; choose one of {TARGETS}")
    states = [batch.first_block_input for batch in batches]
    dense_states = list(states) if target == "dense" else None
    replacements, errors = [], []
    sublayers = [Unit(b, kind) for b in range(adapter.num_blocks(model)) for kind in (ATTENTION, FFN)]
    index = 0
    while index < len(sublayers):
        unit = sublayers[index]
        if unit not in removed:
            states = [_run_sublayer(model, adapter, unit, h, batch.block_calls[unit.block])
                      for h, batch in zip(states, batches)]
            if dense_states is not None:
                dense_states = [_run_sublayer(model, adapter, unit, h, batch.block_calls[unit.block])
                                for h, batch in zip(dense_states, batches)]
            index += 1
            continue
        covered = starts[unit]
        sums = MomentSums(hidden_size)
        targets = []
        for b, (h, batch) in enumerate(zip(states, batches)):
            out = h if dense_states is None else dense_states[b]
            for sub in covered:
                out = _run_sublayer(model, adapter, sub, out, batch.block_calls[sub.block])
            if dense_states is not None:
                dense_states[b] = out
            targets.append(out - h)
            sums.add(h[:, skip_first:], targets[-1][:, skip_first:], with_products=method != "bias")
        tensors = _module_tensors(fit_map(sums, method, rank=rank, ridge=ridge), like)
        module = replacement_module(unit.kind, hidden_size, method, rank).to(device=like.device, dtype=like.dtype)
        module.load_state_dict(tensors)
        outputs = [module(h)[0] if unit.kind == ATTENTION else module(h) for h in states]
        errors.append({
            "covers": [str(u) for u in covered],
            "target_mean_square": float(sum((t[:, skip_first:].double() ** 2).sum() for t in targets) / sums.count),
            "error_mean_square": float(sum(((t - o)[:, skip_first:].double() ** 2).sum()
                                           for t, o in zip(targets, outputs)) / sums.count),
        })
        states = [h + o for h, o in zip(states, outputs)]
        entry = {"block": unit.block, "kind": unit.kind, "map": method, "rank": rank if method == "lowrank" else None,
                 "covers": [u.to_dict() for u in covered]}
        replacements.append(Replacement(entry, tensors))
        index += len(covered)
    return replacements, errors


def check_recovery_options(method: str, *, rank: int | None, ridge: float, group: str) -> None:
    """Refuse bad options before any calibration work."""
    if method not in REPLACEMENT_MAPS:
        raise ConfigError(f"unknown recovery method {method!r}; choose one of {', '.join(REPLACEMENT_MAPS)}")
    if method == "lowrank" and (rank is None or rank < 1):
        raise ConfigError("recovery method lowrank needs a rank >= 1 (--rank R)")
    if method != "lowrank" and rank is not None:
        raise ConfigError(f"--rank applies only to recovery method lowrank, not {method}")
    if ridge < 0:
        raise ConfigError(f"ridge must be >= 0, got {ridge}")
    if group not in GROUPS:
        raise ConfigError(f"unknown recovery group {group!r}; choose one of {GROUPS}")


def parse_recovery_spec(spec: str) -> dict:
    """A recovery named in one word, as ``finercut compare --recover`` takes it: ``bias``, ``linear`` or
    ``lowrank<R>``, with ``-run`` for one replacement per run of consecutive removed sub-layers.

    >>> parse_recovery_spec("lowrank64-run")
    {'method': 'lowrank', 'rank': 64, 'group': 'run'}
    """
    name, _, group = spec.partition("-")
    method = name.rstrip("0123456789")
    rank = int(name[len(method):]) if name != method else None
    if group not in ("", "run") or method not in REPLACEMENT_MAPS or (method == "lowrank") != (rank is not None):
        raise ConfigError(f"unknown recovery {spec!r}: give bias, linear or lowrank<R> (e.g. lowrank64), each "
                          "optionally with -run (one replacement per run of consecutive removed sub-layers)")
    options = {"method": method, "rank": rank, "group": group or "sublayer"}
    check_recovery_options(**options, ridge=0.0)
    return options


def recovery_samples(
    tokenizer: Any, *, input_ids: torch.Tensor | None, calibration: str, data_dir: str | os.PathLike | None,
    num_samples: int, seq_len: int, seed: int,
) -> tuple[torch.Tensor, dict]:
    """The calibration token ids ``[samples, seq]`` of a recovery, and what to record about them."""
    from finercut.calibration import calibration_samples, resolve_source, samples_info

    if input_ids is not None:
        return input_ids, {"source": "tensor", "description": "token ids passed through the API",
                           **samples_info(input_ids, seed=None)}
    if tokenizer is None:
        raise ConfigError("recover needs a tokenizer, or calibration token ids as input_ids")
    source = resolve_source(calibration, data_dir)
    return calibration_samples(tokenizer, source, num_samples=num_samples, seq_len=seq_len, seed=seed)


def recover(
    model: nn.Module, removed: Iterable[Unit | dict[str, Any]], *, method: str = "bias", rank: int | None = None,
    ridge: float = 0.0, group: str = "sublayer", target: str = "sublayer", skip_first: int = 0,
    tokenizer: Any = None, input_ids: torch.Tensor | None = None,
    calibration: str = "wikitext2", data_dir: str | os.PathLike | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0,
    batch_size: int | None = None, num_blocks: int | None = None,
) -> tuple[nn.Module, RecoveryResult]:
    """Remove ``removed`` from a dense model, in place, with every removed part replaced by a fitted map.

    Args:
        model: the dense ``*ForCausalLM`` (as for :func:`finercut.apply_removal`).
        removed: units in removal order (a record's ``removed``).
        method: ``bias``, ``lowrank`` (needs ``rank``) or ``linear``.
        ridge: ridge term per token for ``lowrank`` / ``linear`` (on the covariance of the input).
        group: ``sublayer`` (one replacement per removed sub-layer) or ``run`` (one per maximal run of
            consecutive removed sub-layers, placed in the run's first slot).
        target: what a replacement predicts: ``sublayer`` (the removed sub-layers' own output on the pruned
            model's stream) or ``dense`` (the dense model's stream after them); see :func:`fit_replacements`.
        skip_first: positions at the start of every calibration window left out of the fit.
        tokenizer, calibration, data_dir, num_samples, seq_len, seed: calibration windows as for
            :func:`finercut.prune` (default WikiText-2 validation, kept apart from the test text), unless
            ``input_ids`` ``[samples, seq]`` are given.
        batch_size: samples per forward pass (default: all).
        num_blocks: the block count the units were found on, checked if given.

    Returns:
        ``model``, now the pruned class with its replacements (save it with :func:`finercut.save_pruned`), and
        the :class:`RecoveryResult`.
    """
    from finercut.checkpoint import apply_removal, is_pruned

    check_recovery_options(method, rank=rank, ridge=ridge, group=group)
    if target not in TARGETS:
        raise ConfigError(f"unknown recovery target {target!r}; choose one of {TARGETS}")
    if is_pruned(model):
        raise ConfigError("recover needs the dense model (its removed sub-layers compute the targets)")
    adapter_for(model)  # an unknown architecture fails here, before any calibration work
    if getattr(model.config, "use_parallel_residual", False):
        raise ConfigError("recovery supports sequential blocks only; this model has a parallel residual")
    units = [unit if isinstance(unit, Unit) else Unit.from_dict(unit) for unit in removed]
    hidden = int(model.config.hidden_size)
    if method == "lowrank" and rank > hidden:
        raise ConfigError(f"rank {rank} exceeds the hidden size {hidden}")
    input_ids, calibration_info = recovery_samples(tokenizer, input_ids=input_ids, calibration=calibration,
                                                   data_dir=data_dir, num_samples=num_samples, seq_len=seq_len,
                                                   seed=seed)
    replacements, errors, seconds = fit_recovery(model, units, input_ids, method=method, rank=rank, ridge=ridge,
                                                 group=group, target=target, skip_first=skip_first,
                                                 batch_size=batch_size)
    apply_removal(model, units, num_blocks=num_blocks, replacements=[(r.entry, r.tensors) for r in replacements])
    result = RecoveryResult(
        replacements=replacements, method=method, rank=rank, ridge=ridge, group=group, target=target,
        calibration=calibration_info,
        seconds=seconds, tokens=int(input_ids.numel()), extra_parameters=sum(r.parameters for r in replacements),
        residual_error=errors,
    )
    return model, result


def fit_recovery(
    model: nn.Module, removed: Sequence[Unit], input_ids: torch.Tensor, *, method: str, rank: int | None = None,
    ridge: float = 0.0, group: str = "sublayer", target: str = "sublayer", skip_first: int = 0,
    batch_size: int | None = None,
) -> tuple[list[Replacement], list[dict], float]:
    """Fit the replacements of ``removed`` on the calibration ids ``[samples, seq]``; the dense ``model`` is left
    unchanged (use them with :func:`masked_with_replacements`, or let :func:`recover` build the pruned model).

    Returns:
        The replacements, their fit errors (as :func:`fit_replacements`) and the seconds the fit took.
    """
    adapter = adapter_for(model)
    groups = replacement_groups(removed, num_blocks=adapter.num_blocks(model), group=group)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        capture_calibration, _ = _calibration_tools()
        batches = capture_calibration(model, adapter, input_ids, batch_size=batch_size or input_ids.shape[0])
        replacements, errors = fit_replacements(model, adapter, groups, batches, method=method, rank=rank,
                                                ridge=ridge, target=target, skip_first=skip_first)
    finally:
        model.train(was_training)
    return replacements, errors, time.perf_counter() - started


@contextmanager
def masked_with_replacements(model: nn.Module, adapter: ArchitectureAdapter, removed: Iterable[Unit],
                             replacements: Sequence[Replacement]) -> Iterator[nn.Module]:
    """Like :func:`finercut.masking.masked`, with the replacements in their slots: the recovered model, unpruned.

    The plain reference a recovered (physically pruned) model must equal.
    """
    names = adapter.module_names()
    blocks = adapter.blocks_of(model)
    like = next(model.parameters())
    with masked(model, adapter, list(removed)):
        stubs = []
        for replacement in replacements:
            entry = replacement.entry
            block = blocks[int(entry["block"])]
            name = names["attention"] if entry["kind"] == ATTENTION else names["ffn"]
            module = replacement_module(entry["kind"], int(model.config.hidden_size), entry["map"], entry["rank"])
            module = module.to(device=like.device, dtype=like.dtype)
            module.load_state_dict(replacement.tensors)
            stubs.append((block, name, getattr(block, name)))
            setattr(block, name, module)
        try:
            yield model
        finally:
            for block, name, stub in reversed(stubs):
                setattr(block, name, stub)


def recover_record(
    record: dict, output: str | os.PathLike, *, method: str, rank: int | None = None, ridge: float = 0.0,
    group: str = "sublayer", target: str = "sublayer", count: int | None = None, model_name: str | None = None,
    dtype: str | None = None,
    data_dir: str | os.PathLike | None = None, num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0, overwrite: bool = False, provenance: dict | None = None,
    log=print,
) -> RecoveryResult:
    """Apply a finished run's removals to its dense model with fitted replacements, and save the pruned folder.

    The dense model and tokenizer are the run's (or ``model_name``); calibration is WikiText-2 validation from
    ``data_dir`` (default: the run's data folder). ``pruning.json`` records the recovery (method, cost, windows).
    """
    from pathlib import Path

    from finercut.checkpoint import check_save_target, parameter_stats, save_pruned
    from finercut.modelio import load_model, load_tokenizer, resolve_model_source
    from finercut.record import RunConfig, removed_units

    check_recovery_options(method, rank=rank, ridge=ridge, group=group)
    saved = RunConfig.from_dict(record["config"])
    units = removed_units(record)
    if count is not None:
        if not 1 <= count <= len(units):
            raise ConfigError(f"count must be between 1 and the {len(units)} units the record removed")
        units = units[:count]
    check_save_target(Path(output), overwrite=overwrite)
    source = resolve_model_source(model_name if model_name is not None else saved.model, saved.revision)
    tokenizer = load_tokenizer(source)
    model, _ = load_model(source, dtype=dtype or saved.dtype, device="cpu")
    dense_stats = parameter_stats(model)
    model, result = recover(
        model, units, method=method, rank=rank, ridge=ridge, group=group, target=target, tokenizer=tokenizer,
        data_dir=data_dir if data_dir is not None else saved.data_dir, num_samples=num_samples, seq_len=seq_len,
        seed=seed, num_blocks=record["model"]["num_blocks"],
    )
    share = result.extra_parameters / dense_stats.total_parameters
    log(f"finercut: {method} recovery of {len(units)} units: {len(result.replacements)} replacements, "
        f"{result.extra_parameters:,} extra parameters ({share:.2%} of dense), fitted in {result.seconds:.1f} s")
    report = save_pruned(model, output, tokenizer=tokenizer, dense_stats=dense_stats, overwrite=overwrite,
                         provenance={**(provenance or {}), "source_model": record["model"], "count": len(units),
                                     "recovery": result.to_dict()})
    log(report.format())
    return result
