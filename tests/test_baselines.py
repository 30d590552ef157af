"""Baselines pick the blocks they should on a model whose redundant blocks are known."""

import math

import pytest
import torch
from tiny_models import LAYERS, tiny_input_ids, tiny_model

from finercut.adapters import adapter_for
from finercut.methods.deeper_layers import deeper_layers_steps
from finercut.methods.random_removal import random_steps
from finercut.methods.residual import best_contiguous_run, block_influence, last_token_angular_distance
from finercut.methods.shortgpt import shortgpt_steps
from finercut.candidates import BLOCK, Unit
from finercut.distances import metric_named
from finercut.scoring import FastScorer, ScoringContext
from finercut.search import greedy_search

IDENTITY_BLOCKS = (1, 2)


@pytest.fixture(scope="module")
def context():
    """A tiny Llama whose blocks 1 and 2 are exact identities (zeroed attention and FFN output projections)."""
    model = tiny_model("llama", dtype=torch.float64)
    with torch.no_grad():
        for b in IDENTITY_BLOCKS:
            model.model.layers[b].self_attn.o_proj.weight.zero_()
            model.model.layers[b].mlp.down_proj.weight.zero_()
    context = ScoringContext.build(model, adapter_for(model), metric_named("js"), tiny_input_ids(), batch_size=3)
    yield context
    context.close()


def test_block_influence_by_hand():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    assert block_influence(x, x) == pytest.approx(0.0)
    assert block_influence(x, torch.tensor([[[0.0, 1.0], [-2.0, 0.0]]])) == pytest.approx(1.0)  # orthogonal
    assert block_influence(x, torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])) == pytest.approx(1 - (1 + 1 / math.sqrt(2)) / 2)


def test_last_token_angular_distance_by_hand():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # two samples' last-position states
    assert last_token_angular_distance(x, -x) == pytest.approx(1.0)
    assert last_token_angular_distance(x, torch.tensor([[0.0, 3.0], [-1.0, 1.0]])) == pytest.approx(0.5)
    assert last_token_angular_distance(x, torch.tensor([[1.0, 1.0], [1.0, 1.0]])) == pytest.approx(0.125)
    assert last_token_angular_distance(x, 2 * x) == pytest.approx(0.0, abs=1e-7)


def test_best_contiguous_run_prefers_smallest_then_earliest():
    states = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]]),
              torch.tensor([[1.0, 0.0]])]
    start, distances = best_contiguous_run(states, 1)
    assert start == 1 and distances == pytest.approx([0.5, 0.0, 0.5])
    start, distances = best_contiguous_run(states, 2)
    assert distances == pytest.approx([0.5, 0.5]) and start == 0


def test_streamed_block_influences_equal_the_direct_formula(context):
    from finercut.methods.residual import residual_summary
    from finercut.scoring import run_block

    influences, last_tokens = residual_summary(context)
    (batch,) = context.batches
    states = [batch.first_block_input]
    with torch.inference_mode():
        for i, block in enumerate(context.adapter.blocks_of(context.model)):
            states.append(run_block(block, states[-1], batch.block_calls[i]))
    assert influences == pytest.approx([block_influence(states[i], states[i + 1]) for i in range(LAYERS)], abs=1e-12)
    assert torch.allclose(last_tokens[-1], states[-1][:, -1].float())


def test_shortgpt_removes_the_identity_blocks_first(context):
    steps = shortgpt_steps(context, count=3)
    assert [s.unit for s in steps[:2]] == [Unit(1, BLOCK), Unit(2, BLOCK)]
    assert steps[0].distance == pytest.approx(0.0, abs=1e-12) and steps[2].distance > 0.01
    assert len(steps[0].candidates) == LAYERS


def test_deeper_layers_removes_the_identity_run(context):
    steps = deeper_layers_steps(context, count=2)
    assert [s.unit for s in steps] == [Unit(1, BLOCK), Unit(2, BLOCK)]
    assert steps[0].distance == pytest.approx(0.0, abs=1e-7)


def test_finercut_block_level_removes_the_identity_blocks(context):
    steps = greedy_search(FastScorer(context), num_blocks=LAYERS, granularity="block", target=2,
                          window_until_ratio=0.4, window_first_block=0)
    assert [s.unit for s in steps] == [Unit(1, BLOCK), Unit(2, BLOCK)]
    # 0 up to rounding: the fast JS forms Σ Q log Q without a log per entry, so identical outputs leave ~1e-16
    assert [s.distance for s in steps] == [pytest.approx(0.0, abs=1e-14)] * 2


def test_finercut_sublayers_removes_the_identity_sublayers(context):
    steps = greedy_search(FastScorer(context), num_blocks=LAYERS, granularity="sublayer", target=4,
                          window_until_ratio=0.4, window_first_block=0)
    assert sorted(s.unit.sort_key for s in steps) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(s.distance == pytest.approx(0.0, abs=1e-14) for s in steps)


def test_random_removal_is_seeded_and_prefix_consistent():
    first = random_steps(8, granularity="sublayer", count=6, seed=3)
    again = random_steps(8, granularity="sublayer", count=6, seed=3)
    shorter = random_steps(8, granularity="sublayer", count=2, seed=3)
    other = random_steps(8, granularity="sublayer", count=6, seed=4)
    assert [s.unit for s in first] == [s.unit for s in again]
    assert [s.unit for s in shorter] == [s.unit for s in first[:2]]
    assert [s.unit for s in other] != [s.unit for s in first]
    assert len({s.unit for s in first}) == 6 and all(s.distance is None for s in first)
