"""Cost-aware targets: stop at a budget in what users pay for, and pick removals by distance per unit of cost.

A target such as "at most 70% of the dense model's parameters" is a fraction ``F`` of the dense model's total
``C`` under one measure (parameters, MACs of a ``T``-token forward pass, KV-cache bytes per token, or measured
latency). Removing sub-layer ``u`` saves ``s(u)`` of that total, so after removing the set ``R`` the model costs
``C - sum_{u in R} s(u)``; the savings are counted with the statistics module's own counters
(:mod:`finercut.evaluation.stats`, :func:`finercut.checkpoint.parameter_stats`), so the remaining cost equals what
they report for the physically pruned model. Each step removes the candidate with the least distance per unit of
cost saved, ``argmin d(u) / s(u)`` over candidates with ``s(u) > 0``, and the run stops at the first step after
which ``C - sum s <= F * C``. The paper's ``--ratio`` rule (least distance, a count of sub-layers) is unchanged.

This module holds the pure rules and the cost counts; :func:`cost_aware_greedy` is the plain form of the search
under a budget (any scorer plugs in), the specification a faster integration must equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from finercut.candidates import Unit, removed_sublayers
from finercut.errors import ConfigError
from finercut.pruned_modeling import ATTENTION, FFN

MEASURES = ("params", "macs", "kv_cache", "latency")
Scored = Sequence[tuple[Unit, float]]


# ---------------------------------------------------------------------------------------------------------------------
# The rules


def check_fraction(fraction: float) -> float:
    """A target fraction of the dense model's cost must lie in (0, 1)."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"a cost target is a fraction of the dense model in (0, 1), got {fraction}")
    return fraction


def distance_per_cost(distance: float, saving: float) -> float:
    """The selection score ``d / s``; a unit that saves nothing can never be chosen (infinite score)."""
    return distance / saving if saving > 0 else math.inf


def select_least_per_cost(scored: Scored, saving: Callable[[Unit], float]) -> tuple[Unit, float]:
    """The candidate with the least distance per unit of cost saved.

    Exact ties go to the earliest unit in search order, as in :func:`finercut.candidates.select_least`.

    Raises:
        ValueError: no candidate saves anything under this measure (e.g. only FFNs left for a KV-cache target).
    """
    useful = [(unit, distance) for unit, distance in scored if saving(unit) > 0]
    if not useful:
        raise ConfigError("no candidate saves any cost under this measure")
    return min(useful, key=lambda item: (distance_per_cost(item[1], saving(item[0])), item[0].sort_key))


def target_met(remaining: float, dense_total: float, fraction: float) -> bool:
    """Whether a model costing ``remaining`` is within ``fraction`` of the dense model's ``dense_total``."""
    return remaining <= fraction * dense_total * (1 + 1e-12)


@dataclass(frozen=True)
class CostModel:
    """What each sub-layer saves under one measure, and the dense model's total."""

    measure: str
    dense_total: float
    savings: Mapping[Unit, float]
    """Per sub-layer unit (``attention`` / ``ffn`` of every block): the cost its removal saves."""

    def saving(self, unit: Unit) -> float:
        """What removing ``unit`` saves (a whole block saves both of its sub-layers)."""
        return sum(self.savings[sub] for sub in unit.sublayers())

    def remaining(self, removed: Iterable[Unit]) -> float:
        """The cost of the model once ``removed`` (units, in any order, without repeats) are gone."""
        sublayers = removed_sublayers(removed)
        if len(set(sublayers)) != len(sublayers):
            raise ValueError("a sub-layer is removed more than once")
        return self.dense_total - sum(self.savings[sub] for sub in sublayers)

    def trajectory(self, removed: Sequence[Unit]) -> list[float]:
        """The remaining fraction of the dense cost after each removal, in order."""
        return [self.remaining(removed[: i + 1]) / self.dense_total for i in range(len(removed))]


@dataclass(frozen=True)
class BudgetStep:
    """One step of a budgeted search: the unit removed, its distance, and the cost fraction left afterwards."""

    unit: Unit
    distance: float
    fraction: float


def cost_aware_greedy(units: Sequence[Unit], score: Callable[[list[Unit], list[Unit]], Scored], cost: CostModel,
                      fraction: float) -> list[BudgetStep]:
    """The search under a budget, plainly: remove ``argmin d/s`` until the model costs at most ``fraction``.

    Args:
        units: every candidate, in search order.
        score: ``score(removed, candidates)`` -> ``[(unit, distance), ...]`` given what is already removed.
        cost: the measure's savings and dense total.
        fraction: the target, a fraction of the dense model's cost in (0, 1).

    Returns:
        The steps; the last one is the first that meets the target.

    Raises:
        ValueError: the target cannot be met even by removing every candidate (checked before any scoring).
    """
    check_fraction(fraction)
    floor = cost.remaining(units)
    if not target_met(floor, cost.dense_total, fraction):
        raise ConfigError(f"a {cost.measure} target of {fraction:.1%} cannot be met: removing every candidate leaves "
                         f"{floor / cost.dense_total:.1%} of the dense model")
    removed: list[Unit] = []
    steps: list[BudgetStep] = []
    while not target_met(cost.remaining(removed), cost.dense_total, fraction):
        candidates = [u for u in units if u not in removed and cost.saving(u) > 0]
        unit, distance = select_least_per_cost(score(list(removed), candidates), cost.saving)
        removed.append(unit)
        steps.append(BudgetStep(unit, distance, cost.remaining(removed) / cost.dense_total))
    return steps


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the ``(cost, distance)`` points no other point beats on both (lower-or-equal cost and distance,
    one strictly lower), sorted by cost: the trade-offs worth showing."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


# ---------------------------------------------------------------------------------------------------------------------
# Costs, counted as the statistics module counts them


def _block_parts(model: nn.Module):
    from finercut.adapters import adapter_for_config

    adapter = adapter_for_config(model.config)
    return adapter, adapter.blocks_of(model)


def _parameters(modules: Iterable[nn.Module]) -> int:
    seen: dict[int, int] = {}
    for module in modules:
        for param in module.parameters():
            seen[id(param)] = param.numel()
    return sum(seen.values())


def sublayer_parameters(model: nn.Module) -> dict[Unit, int]:
    """Parameters each sub-layer of a dense model holds: the attention (or FFN) module and the norms that only
    feed it, which is what removing it deletes."""
    adapter, blocks = _block_parts(model)
    costs = {}
    for index, block in enumerate(blocks):
        for kind, main, norms in ((ATTENTION, adapter.attention, adapter.attention_norms),
                                  (FFN, adapter.ffn, adapter.ffn_norms)):
            costs[Unit(index, kind)] = _parameters([getattr(block, name) for name in (main, *norms)])
    return costs


def sublayer_macs(model: nn.Module, *, context_length: int) -> dict[Unit, int]:
    """MACs each sub-layer costs in one forward pass over ``context_length`` tokens, as
    :func:`finercut.evaluation.stats.count_macs` counts them (weights per token, plus attention's context part)."""
    from finercut.evaluation.stats import attention_windows, visible_keys, weight_macs_per_token

    adapter, blocks = _block_parts(model)
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    experts = getattr(config, "num_experts_per_tok", None)
    costs = {}
    for index, (block, window) in enumerate(zip(blocks, attention_windows(config, len(blocks)))):
        attention = getattr(block, adapter.attention)
        costs[Unit(index, ATTENTION)] = (context_length * weight_macs_per_token(attention, experts_per_token=None)
                                         + 2 * heads * head_dim * visible_keys(context_length, window))
        costs[Unit(index, FFN)] = context_length * weight_macs_per_token(getattr(block, adapter.ffn),
                                                                         experts_per_token=experts)
    return costs


def sublayer_kv_cache_bytes(model: nn.Module, *, dtype: torch.dtype | None = None) -> dict[Unit, int]:
    """KV-cache bytes per token each sub-layer holds: ``2 * kv_heads * head_dim * itemsize`` per attention, 0 per
    FFN (:func:`finercut.evaluation.stats.kv_cache_bytes_per_token`)."""
    _, blocks = _block_parts(model)
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_layer = 2 * kv_heads * head_dim * (dtype or model.dtype).itemsize
    return {Unit(i, kind): per_layer if kind == ATTENTION else 0
            for i in range(len(blocks)) for kind in (ATTENTION, FFN)}


def cost_model(model: nn.Module, measure: str, *, context_length: int | None = None) -> CostModel:
    """The savings and dense total of ``measure`` for a dense model (``latency``: see :func:`latency_cost_model`)."""
    from finercut.checkpoint import parameter_stats
    from finercut.evaluation.stats import count_macs, kv_cache_bytes_per_token

    if measure == "params":
        return CostModel(measure, parameter_stats(model).total_parameters, sublayer_parameters(model))
    if measure == "macs":
        if not context_length or context_length < 1:
            raise ConfigError("a MACs target needs the context length it is counted for (--context T)")
        return CostModel(measure, count_macs(model, context_length=context_length)["total"],
                         sublayer_macs(model, context_length=context_length))
    if measure == "kv_cache":
        return CostModel(measure, kv_cache_bytes_per_token(model), sublayer_kv_cache_bytes(model))
    if measure == "latency":
        raise ValueError("latency costs are measured on the device: measure_sublayer_latency, then latency_cost_model")
    raise ConfigError(f"unknown cost measure {measure!r}; choose from {', '.join(MEASURES)}")


def latency_cost_model(sublayer_seconds: Mapping[Unit, float], rest_seconds: float) -> CostModel:
    """Latency costs from per-sub-layer timings measured on the device, plus the time of everything else
    (embeddings, final norm, head), which no removal saves."""
    if rest_seconds < 0 or any(seconds < 0 for seconds in sublayer_seconds.values()):
        raise ValueError("measured latencies cannot be negative")
    return CostModel("latency", rest_seconds + sum(sublayer_seconds.values()), dict(sublayer_seconds))


@torch.inference_mode()
def measure_sublayer_latency(model: nn.Module, input_ids: torch.Tensor, *, repeats: int = 5,
                             warmup: int = 1) -> tuple[dict[Unit, float], float]:
    """Median seconds each attention and FFN sub-layer of a dense model takes in one forward pass, on its device.

    Timed with hooks around the sub-layer modules during ordinary forward passes (no cache) over ``input_ids``
    (``[batch, seq]``); the rest (embeddings, norms, head, framework overhead) is the median full forward time
    minus the sub-layers' sum, floored at 0. Feed both to :func:`latency_cost_model`.
    """
    import statistics
    import time

    adapter, blocks = _block_parts(model)
    synchronize = torch.cuda.synchronize if input_ids.device.type == "cuda" else (lambda: None)
    started: dict[Unit, float] = {}
    times: dict[Unit, list[float]] = {}
    handles = []

    def timers(unit: Unit):
        def before(module, args):
            synchronize()
            started[unit] = time.perf_counter()

        def after(module, args, output):
            synchronize()
            times.setdefault(unit, []).append(time.perf_counter() - started[unit])
        return before, after

    for index, block in enumerate(blocks):
        for kind, name in ((ATTENTION, adapter.attention), (FFN, adapter.ffn)):
            before, after = timers(Unit(index, kind))
            module = getattr(block, name)
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    totals = []
    try:
        for run in range(warmup + repeats):
            synchronize()
            begin = time.perf_counter()
            model(input_ids=input_ids, use_cache=False)
            synchronize()
            if run < warmup:
                times.clear()
            else:
                totals.append(time.perf_counter() - begin)
    finally:
        for handle in handles:
            handle.remove()
    medians = {unit: statistics.median(values) for unit, values in times.items()}
    return medians, max(0.0, statistics.median(totals) - sum(medians.values()))


# ---------------------------------------------------------------------------------------------------------------------
# A run's costs: counted (and latency measured) once before the search, saved with its progress and record


LATENCY_REPEATS = 5


def count_run_costs(model: nn.Module, input_ids: torch.Tensor, *, macs_context: int,
                    repeats: int = LATENCY_REPEATS) -> dict:
    """Every measure's dense total and per-sub-layer savings of a dense model, as JSON (``cost_model``).

    Latency is measured here, on the model's device with the current thread count, over ``input_ids``
    (``[batch, seq]``, e.g. one calibration sample); a resumed run reuses the saved figures instead, so that its
    selections are the ones the interrupted run would have made.
    """
    from finercut.placement import input_device

    seconds, rest = measure_sublayer_latency(model, input_ids.to(input_device(model)), repeats=repeats)
    models = {"params": cost_model(model, "params"), "macs": cost_model(model, "macs", context_length=macs_context),
              "kv_cache": cost_model(model, "kv_cache"), "latency": latency_cost_model(seconds, rest)}
    units = sorted(models["params"].savings, key=lambda unit: unit.sort_key)
    return {
        "macs_context": macs_context,
        "dense": {measure: models[measure].dense_total for measure in MEASURES},
        "savings": [{**unit.to_dict(), **{measure: models[measure].savings[unit] for measure in MEASURES}}
                    for unit in units],
        "latency": {"device": str(input_device(model)),
                    "threads": torch.get_num_threads(), "repeats": repeats,
                    "input_shape": list(input_ids.shape), "rest_seconds": rest},
    }


def cost_models_of(costs: Mapping) -> dict[str, CostModel]:
    """The :class:`CostModel` of every measure from :func:`count_run_costs`'s JSON."""
    return {measure: CostModel(measure, costs["dense"][measure],
                               {Unit.from_dict(entry): entry[measure] for entry in costs["savings"]})
            for measure in MEASURES}


def cost_trajectory(costs: Mapping, removed: Sequence[Unit]) -> list[dict]:
    """Per step, the fraction of the dense model's cost left under every measure (``{"step": 1, "params":
    0.9, "macs": ..., "kv_cache": ..., "latency": ...}``)."""
    models = cost_models_of(costs)
    paths = {measure: models[measure].trajectory(removed) for measure in MEASURES}
    return [{"step": i + 1, **{measure: paths[measure][i] for measure in MEASURES}} for i in range(len(removed))]


def minimal_steps(cost: CostModel, units: Sequence[Unit], fraction: float) -> int:
    """The fewest removals among ``units`` that could meet the target (largest savings first): a lower bound of
    the run's steps, for a progress bar's total."""
    savings = sorted((cost.saving(unit) for unit in units), reverse=True)
    remaining = cost.dense_total
    for count, saving in enumerate(savings):
        if target_met(remaining, cost.dense_total, fraction):
            return count
        remaining -= saving
    return len(savings)


# ---------------------------------------------------------------------------------------------------------------------
# What a run gained: the paper's Table 3 for every run, before and after


GAINS_CONTEXT = 2048
"""The context length a run's MACs are counted for (the model's own if shorter)."""


@torch.inference_mode()
def run_gains(model: nn.Module, removed: Sequence[Unit], input_ids: torch.Tensor, *, context_length: int,
              repeats: int = LATENCY_REPEATS) -> dict:
    """Parameters, MACs of one ``context_length``-token forward pass, KV-cache bytes per token and the measured
    forward latency of the dense model before and after removing ``removed``.

    The counts after are the dense totals less the removed sub-layers' savings, which equal what the statistics
    module counts on the physically pruned model; the latency is the median of ``repeats`` forwards over
    ``input_ids`` (``[1, seq]``, one calibration sample), dense and masked (the stand-ins a pruned model runs)
    measured alternately on the model's device with the current thread count, so machine noise hits both alike.
    """
    import statistics
    import time

    from finercut.adapters import adapter_for
    from finercut.masking import masked
    from finercut.placement import input_device

    figures = {"params": cost_model(model, "params"),
               "macs": cost_model(model, "macs", context_length=context_length),
               "kv_cache": cost_model(model, "kv_cache")}
    gains: dict = {"context_length": context_length}
    for measure, costs in figures.items():
        gains[measure] = {"before": costs.dense_total, "after": costs.remaining(removed)}
    ids = input_ids[:1].to(input_device(model))
    synchronize = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    adapter = adapter_for(model)

    def forward() -> float:
        synchronize()
        started = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        synchronize()
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"before": [], "after": []}
    for run in range(repeats + 1):  # the first round warms both up
        dense = forward()
        with masked(model, adapter, list(removed)):
            pruned = forward()
        if run:
            times["before"].append(dense)
            times["after"].append(pruned)
    gains["latency"] = {"before": statistics.median(times["before"]), "after": statistics.median(times["after"]),
                        "input_shape": list(ids.shape), "repeats": repeats, "device": str(ids.device),
                        "threads": torch.get_num_threads()}
    return gains


def gains_lines(gains: Mapping) -> list[str]:
    """``finercut show``'s account of :func:`run_gains`: each figure before -> after (share of before)."""
    def share(entry: Mapping) -> str:
        return f"{entry['after'] / entry['before']:.1%}" if entry["before"] else "n/a"

    params, macs, kv, latency = gains["params"], gains["macs"], gains["kv_cache"], gains["latency"]
    shape = "x".join(str(n) for n in latency["input_shape"])
    return [
        f"gained: parameters {params['before'] / 1e6:.1f} M -> {params['after'] / 1e6:.1f} M ({share(params)}); "
        f"MACs @ {gains['context_length']} tokens {macs['before'] / 1e9:.2f} G -> {macs['after'] / 1e9:.2f} G "
        f"({share(macs)}); KV cache per token {kv['before']:,} -> {kv['after']:,} bytes ({share(kv)})",
        f"        forward latency {latency['before'] * 1e3:.1f} ms -> {latency['after'] * 1e3:.1f} ms "
        f"({latency['after'] / latency['before']:.2f}x; median of {latency['repeats']} side by side, {shape} "
        f"tokens, {latency['device']}, {latency['threads']} threads)",
    ]
