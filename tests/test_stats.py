"""MACs counted from the architecture, against the arithmetic done by hand for the tiny models."""

import copy

from tiny_models import HIDDEN, LAYERS, VOCAB, tiny_model

from finercut.adapters import adapter_for
from finercut.candidates import Unit
from finercut.checkpoint import apply_removal
from finercut.evaluation.stats import count_macs, median_seconds_side_by_side, model_stats, visible_keys
from finercut.masking import masked

N = 10  # context length
HEADS, HEAD_DIM, KV_HEADS, FF = 4, 8, 2, 64


def test_visible_keys_causal_and_sliding():
    assert visible_keys(4, None) == 1 + 2 + 3 + 4
    assert visible_keys(5, 2) == 1 + 2 + 2 + 2 + 2
    assert visible_keys(3, 8) == 6


def test_llama_macs_by_hand():
    macs = count_macs(tiny_model("llama"), context_length=N)
    q_o = 2 * HIDDEN * HEADS * HEAD_DIM
    k_v = 2 * HIDDEN * KV_HEADS * HEAD_DIM
    assert macs["attention_projections"] == LAYERS * N * (q_o + k_v)  # 4 * 10 * 3072
    assert macs["attention_context"] == LAYERS * 2 * HEADS * HEAD_DIM * (N * (N + 1) // 2)
    assert macs["ffn"] == LAYERS * N * 3 * HIDDEN * FF  # gate, up, down
    assert macs["head"] == N * HIDDEN * VOCAB
    assert macs["total"] == sum(macs[k] for k in ("attention_projections", "attention_context", "ffn", "head"))


def test_mixtral_counts_only_the_top2_of_4_experts():
    macs = count_macs(tiny_model("mixtral"), context_length=N)
    router = HIDDEN * 4
    experts = (4 * 2 * FF * HIDDEN + 4 * HIDDEN * FF) * 2 // 4
    assert macs["ffn"] == LAYERS * N * (router + experts)


def test_gemma2_sliding_layers_see_only_their_window():
    macs = count_macs(tiny_model("gemma2"), context_length=N)
    per_pair = 2 * HEADS * HEAD_DIM
    sliding, full = visible_keys(N, 4), visible_keys(N, None)
    assert macs["attention_context"] == per_pair * (LAYERS // 2) * (sliding + full)


def test_removed_sublayers_cost_nothing_masked_or_pruned():
    model = tiny_model("llama")
    dense = count_macs(model, context_length=N)
    units = [Unit(3, "attention"), Unit(1, "ffn"), Unit(2, "block")]
    with masked(model, adapter_for(model), units):
        masked_macs = count_macs(model, context_length=N)
    pruned = apply_removal(copy.deepcopy(model), units)
    assert count_macs(pruned, context_length=N) == masked_macs
    per_block_attention = dense["attention_projections"] // LAYERS
    assert masked_macs["attention_projections"] == dense["attention_projections"] - 2 * per_block_attention
    assert masked_macs["ffn"] == dense["ffn"] // LAYERS * 2


def test_gpt2_conv1d_projections_are_counted():
    macs = count_macs(tiny_model("gpt2"), context_length=N)
    assert macs["attention_projections"] == LAYERS * N * (HIDDEN * 3 * HIDDEN + HIDDEN * HIDDEN)
    assert macs["ffn"] == LAYERS * N * 2 * HIDDEN * 4 * HIDDEN


def test_side_by_side_timing_runs_every_call_round_robin():
    order = []
    medians = median_seconds_side_by_side({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                          warmup=1, repeats=3)
    assert order == ["a", "b"] * 4  # one warm-up each, then three rounds
    assert set(medians) == {"a", "b"}


def test_model_stats_rows_for_dense_and_pruned():
    model = tiny_model("llama")
    pruned = apply_removal(copy.deepcopy(model), [Unit(3, "block")])
    rows = model_stats({"dense": model, "pruned": pruned}, context_length=N, forward_repeats=1, generation_repeats=1)
    assert rows[1].parameters < rows[0].parameters and rows[1].macs["total"] < rows[0].macs["total"]
    assert rows[0].forward_seconds > 0 and rows[1].tokens_per_second > 0
