"""Recovery without fine-tuning: emulate removed sub-layers by cheap maps fitted in closed form.

Each removed sub-layer, or each maximal run of consecutive removed sub-layers (``group="run"``), is replaced by an
affine map of its input ``x`` (the residual stream where the removed part began) that predicts the residual term
``y`` the removed part would have added there:

* ``bias``: ``y ~ b``, the mean of ``y`` over the calibration tokens (the study's additive bias);
* ``linear``: ``y ~ x W + b`` by least squares, optionally with a ridge term (ReplaceMe's linear replacement,
  arXiv 2505.02819);
* ``lowrank``: the same with ``W`` cut to rank ``R`` by truncated SVD (the study's low-rank linear adapter).

``fold`` adds no module: for every maximal run of removed sub-layers, the kept sub-layer just before it writes
``P(z) = z W^T (+ b)`` into the residual stream through its output projection, and a map ``T`` fitted so that
``P(z) T (+ c)`` approximates ``P(z) + y`` is merged into that projection (``W <- T^T W``, ``b <- b T + c``), as
ReplaceMe (arXiv 2505.02819) and LinearPatch do. The result is the plain pruned architecture, with no extra
parameters, which the exports accept. A run at the very start of the model (block 0's attention removed) has no
kept sub-layer before it and stays unrecovered (the result lists it).

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
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from finercut.adapters import ArchitectureAdapter, adapter_for, adapter_for_config
from finercut.candidates import KIND_ORDER, Unit, removed_sublayers
from finercut.masking import masked
from finercut.pruned_modeling import ATTENTION, FFN, REPLACEMENT_MAPS, replacement_module
from finercut.record import ConfigError

GROUPS = ("sublayer", "run")
TARGETS = ("sublayer", "dense")
FOLD = "fold"
RECOVERY_METHODS = (*REPLACEMENT_MAPS, FOLD)
FOLD_TARGET = "sublayer"
"""The default target of ``fold``: on SmolLM2-135M at 25% within 1.5% of the dense-stream target's perplexity at the
default calibration, and far better with fewer calibration tokens (docs/results.md)."""
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


def fit_linear(sums: MomentSums, *, ridge: float = 0.0, intercept: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``y ~ x W + b`` with ridge ``ridge * ||W||^2`` per token (the bias is not penalised).

    Returns:
        ``W`` ``[hidden_in, hidden_out]`` and ``b`` ``[hidden_out]``, float64:
        ``W = (Cov(x) + ridge I)^-1 Cov(x, y)``, ``b = mean(y) - mean(x) W``. Without ``intercept``, ``y ~ x W``
        through the origin: ``W = (E[x^T x] + ridge I)^-1 E[x^T y]`` and ``b = 0``.
    """
    if ridge < 0:
        raise ConfigError(f"ridge must be >= 0, got {ridge}")
    if intercept:
        cxx, cxy = sums.covariances()
    else:
        cxx, cxy = sums.xx / sums.count, sums.xy / sums.count
    regularised = cxx + ridge * torch.eye(sums.hidden, dtype=cxx.dtype)
    # lstsq rather than solve: a singular covariance (fewer tokens than dimensions, constant directions) still has
    # the minimum-norm solution.
    weight = torch.linalg.lstsq(regularised, cxy).solution
    if not intercept:
        return weight, torch.zeros(sums.hidden, dtype=weight.dtype)
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


def fit_fold(sums: MomentSums, *, ridge: float = 0.0, intercept: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The map folded into an output projection, from sums of ``x = P(z)`` (what the projection writes) and ``y``
    (what the removed run would have added after it): ``P(z) T + c ~ P(z) + y``.

    Fitted as ``T = I + D`` with ``y ~ x D + c`` (:func:`fit_linear`), so the ridge shrinks ``T`` towards the
    identity (no recovery), not towards zero.

    Returns:
        ``T`` ``[hidden, hidden]`` (``x T``: rows in, columns out) and ``c`` ``[hidden]`` (zero without
        ``intercept``), float64.
    """
    weight, bias = fit_linear(sums, ridge=ridge, intercept=intercept)
    return torch.eye(sums.hidden, dtype=weight.dtype) + weight, bias


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
    folds: list[Fold] = field(default_factory=list)
    """``fold``: the maps merged into output projections (``replacements`` is then empty)."""
    unrecovered: list[list[Unit]] = field(default_factory=list)
    """``fold``: the runs left without recovery (a run at the very start of the model)."""

    def to_dict(self) -> dict:
        facts = {
            "method": self.method, "rank": self.rank, "ridge": self.ridge, "group": self.group, "target": self.target,
            "calibration": self.calibration, "seconds": self.seconds, "tokens": self.tokens,
            "extra_parameters": self.extra_parameters, "replacements": [r.entry for r in self.replacements],
            "residual_error": self.residual_error,
        }
        if self.method == FOLD:
            facts["folded"] = ("weights: each run's map is merged into the output projection of the kept sub-layer "
                               "before it; the model has no replacement modules")
            facts["folds"] = [f.entry for f in self.folds]
            facts["unrecovered"] = [[u.to_dict() for u in run] for run in self.unrecovered]
        return facts

    def summary(self, units: int, dense_parameters: int) -> str:
        """One line: what was fitted, its parameters, its time."""
        if self.method == FOLD:
            return (f"finercut: fold recovery of {units} units: {len(self.folds)} runs folded into the output "
                    f"projections before them ({self.target} target), 0 extra parameters, "
                    f"{len(self.unrecovered)} runs unrecovered, fitted in {self.seconds:.1f} s")
        share = self.extra_parameters / dense_parameters
        return (f"finercut: {self.method} recovery of {units} units: {len(self.replacements)} replacements, "
                f"{self.extra_parameters:,} extra parameters ({share:.2%} of dense), fitted in {self.seconds:.1f} s")

    def notes(self) -> list[str]:
        """Warning lines: the runs left unrecovered."""
        return [unrecovered_note(run) for run in self.unrecovered]


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


# ---------------------------------------------------------------------------------------------------------------------
# Folding: a map merged into the output projection of the kept sub-layer before each run (no extra parameters)


def default_group(method: str) -> str:
    """``run`` for ``fold`` (it always works per run), ``sublayer`` for the replacement maps."""
    return "run" if method == FOLD else "sublayer"


def default_target(method: str) -> str:
    return FOLD_TARGET if method == FOLD else "sublayer"


def previous_sublayer(unit: Unit) -> Unit | None:
    """The sub-layer the model runs just before ``unit`` (None for block 0's attention)."""
    if unit.kind == FFN:
        return Unit(unit.block, ATTENTION)
    return Unit(unit.block - 1, FFN) if unit.block > 0 else None


def fold_plan(removed: Iterable[Unit], *, num_blocks: int) -> tuple[list[tuple[Unit, list[Unit]]], list[list[Unit]]]:
    """Each maximal run of removed sub-layers (model order) with the kept sub-layer just before it, and apart the
    run at the very start of the model, if any (it has no kept sub-layer before it: it stays unrecovered)."""
    folds, unrecovered = [], []
    for run in replacement_groups(removed, num_blocks=num_blocks, group="run"):
        before = previous_sublayer(run[0])
        if before is None:
            unrecovered.append(run)
        else:
            folds.append((before, run))
    return folds, unrecovered


def unrecovered_note(run: Sequence[Unit]) -> str:
    span = str(run[0]) if len(run) == 1 else f"{run[0]}..{run[-1]}"
    return (f"finercut: fold: the removed run {span} starts the model (no kept sub-layer before it to fold into) "
            "and stays unrecovered; --recover linear replaces it by a map")


def check_foldable(model_config: Any) -> None:
    """Refuse ``fold`` in one line for a model whose output projections cannot take a map exactly (from its config
    alone, before any weights load or any fitting)."""
    adapter = adapter_for_config(model_config)
    problem = adapter.fold_problem(model_config)
    if problem is None:
        return
    if getattr(model_config, "use_parallel_residual", False):
        instead = "no recovery supports it (prune without --recover)"
    else:
        instead = "use --recover linear or lowrank, which replace the removed sub-layers by maps"
    raise ConfigError(f"--recover fold does not apply to {adapter.name} models: {problem}; {instead}")


def _is_stacked(projection: Any) -> bool:
    return isinstance(projection, torch.Tensor)


def projection_has_bias(projection: Any) -> bool:
    return not _is_stacked(projection) and getattr(projection, "bias", None) is not None


def projection_tensors(projection: Any) -> list[torch.Tensor]:
    """The tensors a fold changes: a stacked expert weight itself, or a layer's weight and bias."""
    if _is_stacked(projection):
        return [projection]
    return [t for t in (projection.weight, getattr(projection, "bias", None)) if t is not None]


@torch.no_grad()
def fold_into_projection(projection: Any, transform: torch.Tensor, intercept: torch.Tensor | None = None) -> None:
    """Merge ``P(z) -> P(z) T + c`` into an output projection, in place (float64 arithmetic, stored in its dtype).

    ``nn.Linear`` (``P = z W^T + b``, ``W`` ``[hidden, width]``): ``W <- T^T W``, ``b <- b T + c``. GPT-2's
    ``Conv1D`` (``P = z W + b``, ``W`` ``[width, hidden]``): ``W <- W T``. A stack of expert weights
    ``[experts, hidden, width]`` (each expert ``z W_e^T``, an MoE output a gate-weighted sum of them): every
    ``W_e <- T^T W_e``. A projection without a bias takes no intercept.
    """
    from transformers.pytorch_utils import Conv1D

    if intercept is not None and not projection_has_bias(projection) and bool(torch.any(intercept != 0)):
        raise ValueError("the output projection has no bias to hold the fit's intercept")
    weight = projection if _is_stacked(projection) else projection.weight
    t = transform.to(device=weight.device, dtype=torch.float64)
    if isinstance(projection, Conv1D):
        weight.copy_((weight.double() @ t).to(weight.dtype))
    elif _is_stacked(projection) or isinstance(projection, nn.Linear):
        weight.copy_(torch.matmul(t.T, weight.double()).to(weight.dtype))
    else:
        raise TypeError(f"cannot fold a map into a {type(projection).__name__}: expected nn.Linear, Conv1D or a "
                        "stack of expert weights")
    if projection_has_bias(projection):
        bias = projection.bias
        new = bias.double() @ t
        if intercept is not None:
            new = new + intercept.to(device=bias.device, dtype=torch.float64)
        bias.copy_(new.to(bias.dtype))


@dataclass(frozen=True)
class Fold:
    """One fitted fold: where it goes (dense block numbering) and its tensors (float64): ``transform`` ``T``
    ``[hidden, hidden]`` and, when the projection has a bias, ``intercept`` ``c``."""

    entry: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def parameters(self) -> int:
        return 0  # merged into weights the model already has

    def projection(self, model: nn.Module, adapter: ArchitectureAdapter) -> Any:
        return adapter.output_projection(adapter.blocks_of(model)[int(self.entry["block"])], self.entry["kind"])

    def apply(self, model: nn.Module, adapter: ArchitectureAdapter) -> None:
        fold_into_projection(self.projection(model, adapter), self.tensors["transform"], self.tensors.get("intercept"))


def apply_folds(model: nn.Module, adapter: ArchitectureAdapter, folds: Iterable[Fold]) -> None:
    """Merge the folds into the model's output projections, in place, for good."""
    for fold in folds:
        fold.apply(model, adapter)


@contextmanager
def folded(model: nn.Module, adapter: ArchitectureAdapter, folds: Iterable[Fold]) -> Iterator[nn.Module]:
    """The model with ``folds`` merged into its output projections; their tensors are restored on exit."""
    saved = []
    try:
        for fold in folds:
            tensors = projection_tensors(fold.projection(model, adapter))
            with torch.no_grad():
                saved.append([(t, t.detach().clone()) for t in tensors])
            fold.apply(model, adapter)
        yield model
    finally:
        with torch.no_grad():
            for tensors in reversed(saved):
                for tensor, original in tensors:
                    tensor.copy_(original)


def _sublayer_output_hook(model: nn.Module, adapter: ArchitectureAdapter, unit: Unit, captured: list):
    """Record what ``unit``'s module returns (the term its block adds to the residual stream, ``P(z)``)."""
    block = adapter.blocks_of(model)[unit.block]
    module = getattr(block, adapter.attention if unit.kind == ATTENTION else adapter.ffn)
    return module.register_forward_hook(
        lambda _module, _args, output: captured.append(output[0] if isinstance(output, tuple) else output))


@torch.inference_mode()
def fit_folds(
    model: nn.Module, adapter: ArchitectureAdapter, runs: Sequence[Sequence[Unit]], batches: Sequence[Any], *,
    ridge: float = 0.0, target: str = FOLD_TARGET, skip_first: int = 0,
) -> tuple[list[Fold], list[dict]]:
    """Fit one fold per run (maximal runs of removed sub-layers in model order), in model order, on the pruned
    model's own activations, every earlier fold already merged; the dense ``model`` is left unchanged.

    For the kept sub-layer ``S`` before a run, ``x = P(z)`` is what ``S`` adds to the stream ``h`` and the fit is
    ``P(z) T + c ~ P(z) + y`` (:func:`fit_fold`; an intercept only where the projection has a bias), with ``y``:

    * ``sublayer``: what the run's removed sub-layers (dense weights) add to the pruned stream ``h + P(z)``;
    * ``dense``: the dense model's stream after the run minus ``h + P(z)`` (ReplaceMe's target: the fold also
      corrects the drift the earlier removals left).

    A run at the very start (no ``S``) is left out: nothing is fitted for it, the stream passes it unchanged.

    Returns:
        The folds, and per fold the mean squared norm of its target ``y`` (the error without recovery) and of the
        fit's error on the calibration tokens.
    """
    if target not in TARGETS:
        raise ConfigError(f"unknown recovery target {target!r}; choose one of {TARGETS}")
    problem = adapter.fold_problem(model.config)
    if problem is not None:
        raise ConfigError(f"--recover fold does not apply to {adapter.name} models: {problem}")
    hidden_size = int(model.config.hidden_size)
    removed = {unit for run in runs for unit in run}
    run_after = {previous_sublayer(run[0]): list(run) for run in runs if previous_sublayer(run[0]) is not None}
    states = [batch.first_block_input for batch in batches]
    dense_states = list(states) if target == "dense" else None
    dense_ahead: set[Unit] = set()  # sub-layers the dense stream already went through (a run, with its fold)
    folds, errors = [], []

    def through(unit: Unit, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        return [_run_sublayer(model, adapter, unit, h, batch.block_calls[unit.block])
                for h, batch in zip(hidden, batches)]

    with ExitStack() as merged:  # the folds fitted so far stay merged while the walk goes on, undone at the end
        for unit in [Unit(b, kind) for b in range(adapter.num_blocks(model)) for kind in (ATTENTION, FFN)]:
            if dense_states is not None and unit not in dense_ahead:
                dense_states = through(unit, dense_states)  # before any fold of ``unit`` is merged
            if unit in removed:
                continue  # the pruned stream passes a removed sub-layer unchanged
            run = run_after.get(unit)
            if run is None:
                states = through(unit, states)
                continue
            written: list[torch.Tensor] = []
            handle = _sublayer_output_hook(model, adapter, unit, written)
            try:
                after = through(unit, states)
            finally:
                handle.remove()
            if len(written) != len(batches):
                raise RuntimeError(f"the output of {unit} was not captured")
            if dense_states is None:
                targets = []
                for a, batch in zip(after, batches):
                    out = a
                    for sub in run:
                        out = _run_sublayer(model, adapter, sub, out, batch.block_calls[sub.block])
                    targets.append(out - a)
            else:
                for sub in run:
                    dense_states = through(sub, dense_states)
                dense_ahead.update(run)
                targets = [d - a for d, a in zip(dense_states, after)]
            sums = MomentSums(hidden_size)
            for p, y in zip(written, targets):
                sums.add(p[:, skip_first:], y[:, skip_first:])
            projection = adapter.output_projection(adapter.blocks_of(model)[unit.block], unit.kind)
            intercept = projection_has_bias(projection)
            transform, bias = fit_fold(sums, ridge=ridge, intercept=intercept)
            tensors = {"transform": transform, **({"intercept": bias} if intercept else {})}
            owner = adapter.attention if unit.kind == ATTENTION else adapter.ffn
            name = adapter.attention_output if unit.kind == ATTENTION else adapter.ffn_output
            fold = Fold({"block": unit.block, "kind": unit.kind, "projection": f"{owner}.{name}",
                         "intercept": intercept, "covers": [u.to_dict() for u in run]}, tensors)
            merged.enter_context(folded(model, adapter, [fold]))
            new_states = through(unit, states)
            errors.append({
                "covers": [str(u) for u in run], "into": str(unit),
                "target_mean_square": float(sum((t[:, skip_first:].double() ** 2).sum() for t in targets)
                                            / sums.count),
                "error_mean_square": float(sum(((n - a - t)[:, skip_first:].double() ** 2).sum()
                                               for n, a, t in zip(new_states, after, targets)) / sums.count),
            })
            states = new_states
            folds.append(fold)
    return folds, errors


def check_recovery_options(method: str, *, rank: int | None, ridge: float, group: str | None) -> None:
    """Refuse bad options before any calibration work (``group`` None: the method's default)."""
    if method not in RECOVERY_METHODS:
        raise ConfigError(f"unknown recovery method {method!r}; choose one of {', '.join(RECOVERY_METHODS)}")
    if method == "lowrank" and (rank is None or rank < 1):
        raise ConfigError("recovery method lowrank needs a rank >= 1 (--rank R)")
    if method != "lowrank" and rank is not None:
        raise ConfigError(f"--rank applies only to recovery method lowrank, not {method}")
    if ridge < 0:
        raise ConfigError(f"ridge must be >= 0, got {ridge}")
    if group is not None and group not in GROUPS:
        raise ConfigError(f"unknown recovery group {group!r}; choose one of {GROUPS}")
    if method == FOLD and group not in (None, "run"):
        raise ConfigError("recovery method fold works per run of consecutive removed sub-layers (each folded into "
                          f"the kept sub-layer before it); --recover-group {group} does not apply to it")


def parse_recovery_spec(spec: str) -> dict:
    """A recovery named in one word, as ``finercut compare --recover`` takes it: ``bias``, ``linear`` or
    ``lowrank<R>``, with ``-run`` for one replacement per run of consecutive removed sub-layers, or ``fold``.

    >>> parse_recovery_spec("lowrank64-run")
    {'method': 'lowrank', 'rank': 64, 'group': 'run'}
    """
    name, _, group = spec.partition("-")
    method = name.rstrip("0123456789")
    rank = int(name[len(method):]) if name != method else None
    if spec == FOLD:
        return {"method": FOLD, "rank": None, "group": "run"}
    if group not in ("", "run") or method not in REPLACEMENT_MAPS or (method == "lowrank") != (rank is not None):
        raise ConfigError(f"unknown recovery {spec!r}: give bias, linear or lowrank<R> (e.g. lowrank64), each "
                          "optionally with -run (one replacement per run of consecutive removed sub-layers), or fold")
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
    ridge: float = 0.0, group: str | None = None, target: str | None = None, skip_first: int = 0,
    tokenizer: Any = None, input_ids: torch.Tensor | None = None,
    calibration: str = "wikitext2", data_dir: str | os.PathLike | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0,
    batch_size: int | None = None, num_blocks: int | None = None, log: Any = None,
) -> tuple[nn.Module, RecoveryResult]:
    """Remove ``removed`` from a dense model, in place, with every removed part replaced by a fitted map (or, with
    ``fold``, every run of them recovered by a map merged into the weights before it).

    Args:
        model: the dense ``*ForCausalLM`` (as for :func:`finercut.apply_removal`).
        removed: units in removal order (a record's ``removed``).
        method: ``bias``, ``lowrank`` (needs ``rank``), ``linear`` or ``fold`` (no extra parameters; see
            :func:`fit_folds`).
        ridge: ridge term per token for ``lowrank`` / ``linear`` (on the covariance of the input); for ``fold`` it
            shrinks the folded map towards the identity.
        group: ``sublayer`` (one replacement per removed sub-layer, the default) or ``run`` (one per maximal run
            of consecutive removed sub-layers, placed in the run's first slot); ``fold`` always works per run.
        target: what a replacement predicts: ``sublayer`` (the removed sub-layers' own output on the pruned
            model's stream) or ``dense`` (the dense model's stream after them); see :func:`fit_replacements`.
            Default: ``sublayer``, and :data:`FOLD_TARGET` for ``fold``.
        skip_first: positions at the start of every calibration window left out of the fit.
        tokenizer, calibration, data_dir, num_samples, seq_len, seed: calibration windows as for
            :func:`finercut.prune` (default WikiText-2 validation, kept apart from the test text), unless
            ``input_ids`` ``[samples, seq]`` are given.
        batch_size: samples per forward pass (default: all).
        num_blocks: the block count the units were found on, checked if given.
        log: where the warning lines go (a run left unrecovered by ``fold``); default: :func:`warnings.warn`.

    Returns:
        ``model``, now the pruned class with its replacements (save it with :func:`finercut.save_pruned`), and
        the :class:`RecoveryResult`.
    """
    from finercut.checkpoint import apply_removal, is_pruned

    check_recovery_options(method, rank=rank, ridge=ridge, group=group)
    group = group or default_group(method)
    target = target or default_target(method)
    if target not in TARGETS:
        raise ConfigError(f"unknown recovery target {target!r}; choose one of {TARGETS}")
    if is_pruned(model):
        raise ConfigError("recover needs the dense model (its removed sub-layers compute the targets)")
    adapter = adapter_for(model)  # an unknown architecture fails here, before any calibration work
    if method == FOLD:
        check_foldable(model.config)
    if getattr(model.config, "use_parallel_residual", False):
        raise ConfigError("recovery supports sequential blocks only; this model has a parallel residual")
    units = [unit if isinstance(unit, Unit) else Unit.from_dict(unit) for unit in removed]
    hidden = int(model.config.hidden_size)
    if method == "lowrank" and rank > hidden:
        raise ConfigError(f"rank {rank} exceeds the hidden size {hidden}")
    input_ids, calibration_info = recovery_samples(tokenizer, input_ids=input_ids, calibration=calibration,
                                                   data_dir=data_dir, num_samples=num_samples, seq_len=seq_len,
                                                   seed=seed)
    fitted, errors, seconds = fit_recovery(model, units, input_ids, method=method, rank=rank, ridge=ridge,
                                           group=group, target=target, skip_first=skip_first,
                                           batch_size=batch_size)
    folds, unrecovered = [], []
    if method == FOLD:
        folds = fitted
        unrecovered = fold_plan(units, num_blocks=adapter.num_blocks(model))[1]
        apply_folds(model, adapter, folds)
        apply_removal(model, units, num_blocks=num_blocks)
        fitted = []
    else:
        apply_removal(model, units, num_blocks=num_blocks, replacements=[(r.entry, r.tensors) for r in fitted])
    result = RecoveryResult(
        replacements=fitted, method=method, rank=rank, ridge=ridge, group=group, target=target,
        calibration=calibration_info,
        seconds=seconds, tokens=int(input_ids.numel()), extra_parameters=sum(r.parameters for r in fitted),
        residual_error=errors, folds=folds, unrecovered=unrecovered,
    )
    for note in result.notes():
        if log is None:
            warnings.warn(note, stacklevel=2)
        else:
            log(note)
    return model, result


def fit_recovery(
    model: nn.Module, removed: Sequence[Unit], input_ids: torch.Tensor, *, method: str, rank: int | None = None,
    ridge: float = 0.0, group: str | None = None, target: str | None = None, skip_first: int = 0,
    batch_size: int | None = None,
) -> tuple[list[Replacement] | list[Fold], list[dict], float]:
    """Fit the replacements (``fold``: the folds) of ``removed`` on the calibration ids ``[samples, seq]``; the
    dense ``model`` is left unchanged (use them with :func:`masked_with_replacements`, or let :func:`recover` build
    the pruned model).

    Returns:
        The replacements or folds, their fit errors (as :func:`fit_replacements` / :func:`fit_folds`) and the
        seconds the fit took.
    """
    group = group or default_group(method)
    target = target or default_target(method)
    adapter = adapter_for(model)
    groups = replacement_groups(removed, num_blocks=adapter.num_blocks(model), group=group)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        capture_calibration, _ = _calibration_tools()
        batches = capture_calibration(model, adapter, input_ids, batch_size=batch_size or input_ids.shape[0])
        if method == FOLD:
            replacements, errors = fit_folds(model, adapter, groups, batches, ridge=ridge, target=target,
                                             skip_first=skip_first)
        else:
            replacements, errors = fit_replacements(model, adapter, groups, batches, method=method, rank=rank,
                                                    ridge=ridge, target=target, skip_first=skip_first)
    finally:
        model.train(was_training)
    return replacements, errors, time.perf_counter() - started


@contextmanager
def masked_with_replacements(model: nn.Module, adapter: ArchitectureAdapter, removed: Iterable[Unit],
                             replacements: Sequence[Replacement]) -> Iterator[nn.Module]:
    """Like :func:`finercut.masking.masked`, with the replacements in their slots (and any :class:`Fold` merged
    into its projection): the recovered model, unpruned.

    The plain reference a recovered (physically pruned) model must equal.
    """
    names = adapter.module_names()
    blocks = adapter.blocks_of(model)
    like = next(model.parameters())
    folds = [r for r in replacements if isinstance(r, Fold)]
    with masked(model, adapter, list(removed)), folded(model, adapter, folds):
        stubs = []
        for replacement in replacements:
            if isinstance(replacement, Fold):
                continue
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
    group: str | None = None, target: str | None = None, count: int | None = None, model_name: str | None = None,
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
        seed=seed, num_blocks=record["model"]["num_blocks"], log=log,
    )
    log(result.summary(len(units), dense_stats.total_parameters))
    report = save_pruned(model, output, tokenizer=tokenizer, dense_stats=dense_stats, overwrite=overwrite,
                         provenance={**(provenance or {}), "source_model": record["model"], "count": len(units),
                                     "recovery": result.to_dict()})
    log(report.format())
    return result
