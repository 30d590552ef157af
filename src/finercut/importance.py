"""Shapley-value importance of blocks or sub-layers, on FinerCut's output-distance objective.

The game: a set of removed units costs ``d(R)``, the distance (js, angular, ...) of the model without ``R`` from
the original model, averaged over all calibration positions; ``d({}) = 0``. A unit's Shapley value is its mean
marginal cost ``d(R + {i}) - d(R)`` over uniformly random orders of removal (equivalently, the Shapley value of
the game ``v(present) = -d(absent)``): how much of the output change it accounts for. Pruning removes the units
of lowest value, all at once.

Estimated by permutation sampling (Castro et al. 2009): each seeded random order is walked from the full model,
removing one unit at a time, and every unit gets the marginal cost of its step. Optional truncation (the
truncated Monte Carlo Shapley of Ghorbani & Zou 2019, which the depth-pruning study uses for its block values):
once the cost of a walk is within ``truncation`` (a fraction of ``d(all) - d({})``) of removing everything, the
remaining units of that walk get marginal 0 and are not evaluated. Reported per unit: the mean and its
standard error over the permutations.

Evaluations share work as the search does: in a walk each step removes one more unit, so the blocks before it
are unchanged and only the blocks from it on run again (:class:`ModelCost.walk`, equal to the plain full forward
per coalition, :meth:`ModelCost.cost`).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from finercut.adapters import ArchitectureAdapter
from finercut.candidates import Unit
from finercut.distances import Metric
from finercut.errors import ConfigError
from finercut.masking import masked

CostFunction = Callable[[frozenset], float]
"""Removed units -> cost of the model without them."""
Walk = Callable[[Sequence[Unit]], Iterator[float]]
"""An order of removal -> the cost after each successive removal (may be abandoned early)."""


# ---------------------------------------------------------------------------------------------------------------------
# Shapley values of a cost game


def exact_shapley(units: Sequence[Unit], cost: CostFunction) -> dict[Unit, float]:
    """The exact Shapley values, by enumerating every coalition (``2^n`` costs: for tests and tiny games).

    ``phi_i = sum over R not holding i of |R|! (n - |R| - 1)! / n! * (d(R + {i}) - d(R))``.
    """
    n = len(units)
    values = {}
    for unit in units:
        others = [u for u in units if u != unit]
        total = 0.0
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for removed in itertools.combinations(others, size):
                total += weight * (cost(frozenset(removed) | {unit}) - cost(frozenset(removed)))
        values[unit] = total
    return values


def plain_walk(cost: CostFunction) -> Walk:
    """A walk that evaluates every coalition from scratch: ``d(order[:1]), d(order[:2]), ...``."""

    def walk(order: Sequence[Unit]) -> Iterator[float]:
        for k in range(1, len(order) + 1):
            yield cost(frozenset(order[:k]))

    return walk


@dataclass(frozen=True)
class ShapleyEstimate:
    """Estimated Shapley values: per unit the mean marginal cost over ``permutations`` orders and its standard
    error (the standard deviation of the marginals over ``sqrt(permutations)``; None for a single order)."""

    values: dict[Unit, float]
    standard_errors: dict[Unit, float | None]
    permutations: int
    evaluations: int
    seed: int
    truncation: float | None
    empty_cost: float
    full_cost: float | None
    """``d({})`` and, with truncation, ``d(all)``."""

    def lowest(self, count: int) -> list[Unit]:
        """The ``count`` units of lowest value, lowest first (ties: the earlier unit in search order)."""
        return sorted(self.values, key=lambda unit: (self.values[unit], unit.sort_key))[:count]

    def interval(self, unit: Unit, z: float = 1.96) -> tuple[float, float] | None:
        """The normal-approximation confidence interval of ``unit``'s value (95% for ``z = 1.96``)."""
        se = self.standard_errors[unit]
        return None if se is None else (self.values[unit] - z * se, self.values[unit] + z * se)

    def separated(self, count: int, z: float = 1.96) -> bool:
        """Whether the intervals rank the ``count`` lowest units apart from all the others: the highest upper
        bound among them lies below the lowest lower bound among the rest."""
        if len(self.values) <= count:
            return True
        bounds = self.separation(count, z)
        return bounds is not None and bounds[0] < bounds[1]

    def separation(self, count: int, z: float = 1.96) -> tuple[float, float] | None:
        """The highest upper interval bound among the ``count`` lowest units and the lowest lower bound among
        the rest (they rank the chosen units apart when the first is below the second); None without errors or
        without a rest."""
        chosen = self.lowest(count)
        rest = [u for u in self.values if u not in chosen]
        if not rest or any(self.standard_errors[u] is None for u in self.values):
            return None
        return max(self.interval(u, z)[1] for u in chosen), min(self.interval(u, z)[0] for u in rest)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapleyEstimate:
        """The estimate :meth:`to_dict` wrote (a record's ``importance``)."""
        units = [Unit.from_dict(entry) for entry in data["units"]]
        return cls({u: e["value"] for u, e in zip(units, data["units"])},
                   {u: e["standard_error"] for u, e in zip(units, data["units"])}, data["permutations"],
                   data["evaluations"], data["seed"], data["truncation"], data["empty_cost"], data["full_cost"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "permutations": self.permutations, "evaluations": self.evaluations, "seed": self.seed,
            "truncation": self.truncation, "empty_cost": self.empty_cost, "full_cost": self.full_cost,
            "units": [{**unit.to_dict(), "value": self.values[unit], "standard_error": self.standard_errors[unit]}
                      for unit in self.values],
        }


def random_orders(units: Sequence[Unit], *, permutations: int, seed: int) -> list[list[Unit]]:
    """``permutations`` seeded random orders of ``units`` (the same seed gives the same orders)."""
    generator = random.Random(seed)
    orders = []
    for _ in range(permutations):
        order = list(units)
        generator.shuffle(order)
        orders.append(order)
    return orders


def permutation_shapley(
    units: Sequence[Unit], walk: Walk, *, permutations: int, seed: int = 0, truncation: float | None = None,
    empty_cost: float = 0.0, full_cost: float | None = None,
) -> ShapleyEstimate:
    """Shapley values estimated from ``permutations`` random orders of removal.

    Args:
        units: the players.
        walk: the costs along an order (:func:`plain_walk` or :meth:`ModelCost.walk`).
        truncation: stop a walk once its cost is within ``truncation * |full_cost - empty_cost|`` of
            ``full_cost`` (the cost of removing every unit, needed then); the rest of the walk gets 0.
        empty_cost: ``d({})``, 0 for a distance to the original model.
    """
    if permutations < 1:
        raise ConfigError(f"permutations must be at least 1, got {permutations}")
    if truncation is not None and (full_cost is None or not 0 <= truncation < 1):
        raise ConfigError("truncation needs a fraction in [0, 1) and the cost of removing every unit (full_cost)")
    marginals: dict[Unit, list[float]] = {unit: [] for unit in units}
    evaluations = 0
    for order in random_orders(units, permutations=permutations, seed=seed):
        previous = empty_cost
        steps = walk(order)
        for position, unit in enumerate(order):
            if truncation is not None and abs(full_cost - previous) <= truncation * abs(full_cost - empty_cost):
                for rest in order[position:]:
                    marginals[rest].append(0.0)
                break
            current = next(steps)
            evaluations += 1
            marginals[unit].append(current - previous)
            previous = current
        if hasattr(steps, "close"):
            steps.close()
    values = {unit: sum(m) / len(m) for unit, m in marginals.items()}
    errors = {unit: _standard_error(m) for unit, m in marginals.items()}
    return ShapleyEstimate(values, errors, permutations, evaluations, seed, truncation, empty_cost, full_cost)


def _standard_error(samples: Sequence[float]) -> float | None:
    n = len(samples)
    if n < 2:
        return None
    mean = sum(samples) / n
    return math.sqrt(sum((x - mean) ** 2 for x in samples) / (n - 1) / n)


# ---------------------------------------------------------------------------------------------------------------------
# The cost on a model


class ModelCost:
    """``d(R)`` of a model on its calibration batches, plainly per coalition or along walks of removal.

    Args:
        batches: as :func:`finercut.scoring.capture_calibration` records them (``reference_output`` is the
            original model's last-block output, ``block_calls`` each block's other arguments).
        chunk_rows: positions per full-vocabulary logits chunk.
    """

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, metric: Metric, batches: Sequence[Any], *,
                 chunk_rows: int = 256) -> None:
        self.model, self.adapter, self.metric, self.batches = model, adapter, metric, list(batches)
        self.chunk_rows = chunk_rows
        self.positions = sum(batch.input_ids.numel() for batch in self.batches)
        self.evaluations = 0

    @torch.inference_mode()
    def _distance(self, outputs: Sequence[torch.Tensor], *, are_logits: bool = False) -> float:
        """Mean distance over all positions from the original's output, given last-block outputs
        ``[batch, seq, hidden]`` (or, ``are_logits``, the logits ``[batch, seq, vocab]``)."""
        total = 0.0
        for batch, output in zip(self.batches, outputs):
            reference = batch.reference_output.reshape(-1, batch.reference_output.shape[-1])
            rows = output.reshape(-1, output.shape[-1])
            for start in range(0, rows.shape[0], self.chunk_rows):
                ref_logits = self.adapter.logits(self.model, reference[start:start + self.chunk_rows])
                chunk = rows[start:start + self.chunk_rows]
                logits = chunk if are_logits else self.adapter.logits(self.model, chunk)
                total += float(self.metric.distance(ref_logits, logits).double().sum())
        self.evaluations += 1
        return total / self.positions

    @torch.inference_mode()
    def cost(self, removed: Iterable[Unit]) -> float:
        """The plain form: the masked model's own forward, for one coalition."""
        with masked(self.model, self.adapter, list(removed)):
            logits = [self.model(input_ids=batch.input_ids.to(self.model.device), use_cache=False).logits
                      for batch in self.batches]
        return self._distance(logits, are_logits=True)

    def walk(self, order: Sequence[Unit]) -> Iterator[float]:
        """The cost after each successive removal along ``order``, replaying only the blocks from the newly
        removed unit on (the inputs of the blocks before it are unchanged)."""
        from finercut.scoring import run_block

        blocks = self.adapter.blocks_of(self.model)
        num_blocks = len(blocks)
        states = [self._dense_states(batch) for batch in self.batches]
        removed: list[Unit] = []
        for unit in order:
            removed.append(unit)
            with torch.inference_mode(), masked(self.model, self.adapter, removed):
                for batch, state in zip(self.batches, states):
                    for index in range(unit.block, num_blocks):
                        state[index + 1] = run_block(blocks[index], state[index], batch.block_calls[index])
            yield self._distance([state[-1] for state in states])

    @torch.inference_mode()
    def _dense_states(self, batch: Any) -> list[torch.Tensor]:
        """Every block's input on ``batch`` in the original model, then the last block's output (``L + 1``)."""
        from finercut.scoring import run_block

        states = [batch.first_block_input]
        for index, block in enumerate(self.adapter.blocks_of(self.model)):
            states.append(run_block(block, states[-1], batch.block_calls[index]))
        return states


def shapley_importance(
    model: nn.Module, adapter: ArchitectureAdapter, metric: Metric, batches: Sequence[Any], units: Sequence[Unit], *,
    permutations: int, seed: int = 0, truncation: float | None = None,
) -> ShapleyEstimate:
    """Shapley values of ``units`` on the output distance of ``model`` over ``batches`` (see the module doc)."""
    cost = ModelCost(model, adapter, metric, batches)
    full_cost = cost.cost(units) if truncation is not None else None
    return permutation_shapley(units, cost.walk, permutations=permutations, seed=seed, truncation=truncation,
                               empty_cost=0.0, full_cost=full_cost)
