"""benchmarks/abort_floor.py: the oracle floor of an exact abort and the replay of the fast scorer's order."""

import importlib.util

import pytest
import torch
from test_early_abort import search
from tiny_models import LAYERS, tiny_model

from conftest import REPO

spec = importlib.util.spec_from_file_location("abort_floor", REPO / "benchmarks" / "abort_floor.py")
abort_floor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(abort_floor)


def test_needed_samples_takes_the_largest_first_and_counts_the_fraction_of_the_last():
    assert abort_floor.needed_samples([1.0, 3.0, 2.0], 4.0, ties_lose=False) == (2, 1.5)
    # reaching the threshold suffices only for a candidate that loses ties
    assert abort_floor.needed_samples([2.0, 2.0], 4.0, ties_lose=True) == (2, 2.0)
    assert abort_floor.needed_samples([2.0, 2.0, 1.0], 4.0, ties_lose=False) == (3, 2.0)  # any bit of the third
    assert abort_floor.needed_samples([1.0, 1.0], 5.0, ties_lose=False) == (2, 2.0)  # cannot be left behind


def test_replay_starts_at_the_previous_winner_only_with_a_kept_state_before_it():
    unit = abort_floor.Unit(2, "attention")
    assert abort_floor.replay_blocks(unit, 4, previous_block=3, has_state=True) == 1
    assert abort_floor.replay_blocks(unit, 4, previous_block=3, has_state=False) == 2
    assert abort_floor.replay_blocks(unit, 4, previous_block=1, has_state=True) == 2
    assert abort_floor.replay_blocks(unit, 4, previous_block=None, has_state=True) == 2


@pytest.mark.parametrize("name, metric", [("llama", "angular"), ("gpt_neox", "euclidean")])
def test_the_replayed_order_is_the_fast_scorers_and_the_oracle_spends_no_more(name, metric):
    model = tiny_model(name, dtype=torch.float64, seed=3)
    exhaustive = [step.to_dict() for step in search(model, metric=metric, exhaustive=True, samples=6, target=4)]
    fast = [step.to_dict() for step in search(model, metric=metric, exhaustive=False, samples=6, target=4)]
    previous_block, previous_ran, hint = None, {}, []
    for step, fast_step in zip(exhaustive, fast):
        pairs, units, ran, hint_next = abort_floor.policy_step(step, LAYERS, previous_block, previous_ran, hint)
        # the same samples per candidate as the fast scorer counted
        assert {str(unit): len(batches) for unit, batches in ran.items()} == {
            str(abort_floor.Unit.from_dict(c)): c["samples"] for c in fast_step["candidates"]}
        oracle_pairs, oracle_units, fractional_units = abort_floor.oracle_step(step, LAYERS, previous_block)
        assert oracle_pairs <= pairs and oracle_units <= units and fractional_units <= oracle_units
        previous_block, previous_ran, hint = abort_floor.Unit.from_dict(step["removed"]).block, ran, hint_next
    assert sum(len(s["candidates"]) for s in fast) > sum(1 for s in fast)  # more than one candidate per step
