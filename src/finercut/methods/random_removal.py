"""Random removal: the first ``n`` units of a seeded shuffle (smaller counts are prefixes), the floor every
method must beat."""

from __future__ import annotations

import random
from typing import Sequence

from finercut.candidates import Unit, all_units
from finercut.methods.base import ONE_SHOT, CompareEntry, OneShotMethod, Ranking, Selecting
from finercut.search import Step


def random_order(units: Sequence[Unit], seed: int) -> list[Unit]:
    """``units`` in the order of a shuffle seeded with ``seed``."""
    order = list(units)
    random.Random(seed).shuffle(order)
    return order


def random_steps(num_blocks: int, *, granularity: str, count: int, seed: int, only: str | None = None) -> list[Step]:
    """Uniformly random units: the first ``count`` of a seeded shuffle, so smaller counts are prefixes."""
    order = random_order(all_units(num_blocks, granularity, only), seed)
    return Ranking(tuple(order), {}, 0.0, 0).steps(count)


class RandomRemoval(OneShotMethod):
    name = "random"
    label = "Random"
    description = "uniformly random units (seeded)"
    objective = None
    selection = ONE_SHOT
    compare_entries = (CompareEntry("random", "Random sub-layers", "sublayer"),)

    def rank(self, request: Selecting) -> Ranking:
        return Ranking(tuple(random_order(request.units, request.config.seed)), {}, 0.0, 0)

    def plan_work(self, request: Selecting) -> float:
        return 0.0
