"""Attention-only and FFN-only pruning (``only``), and the KV-cache bytes per token in records and statistics."""

from __future__ import annotations

import copy

import pytest

from finercut import prune
from finercut.candidates import Unit, all_units, count_units
from finercut.checkpoint import apply_removal
from finercut.evaluation.stats import format_stats_table, kv_cache_bytes_per_token, kv_cache_summary, model_stats
from finercut.pruned_modeling import ATTENTION, FFN
from finercut.record import ConfigError, RunConfig
from tiny_models import LAYERS, cached_tiny_model, tiny_input_ids

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny Llama: 2 KV heads of 32 / 4 = 8 dimensions, keys and values, float32, in each of 4 layers.
KV_BYTES_PER_LAYER = 2 * 2 * 8 * 4


def test_only_keeps_the_sublayers_of_one_kind():
    assert all_units(3, "sublayer", "attention") == [Unit(0, ATTENTION), Unit(1, ATTENTION), Unit(2, ATTENTION)]
    assert all_units(3, "sublayer", "ffn") == [Unit(0, FFN), Unit(1, FFN), Unit(2, FFN)]
    assert count_units(30, "sublayer", "attention") == 30
    with pytest.raises(ValueError, match="granularity sublayer"):
        all_units(3, "block", "attention")


def test_the_ratio_counts_the_sublayers_of_that_kind():
    assert RunConfig(only="attention", ratio=0.33).target(30) == 10  # a third of the attention layers
    assert RunConfig(ratio=0.33).target(30) == 20


@pytest.mark.parametrize("settings", [dict(method="shortgpt"), dict(granularity="block"), dict(only="mlp")])
def test_only_is_refused_where_it_cannot_apply(settings):
    with pytest.raises(ConfigError):
        RunConfig(ratio=0.25, **{"only": "attention", **settings})


@pytest.mark.parametrize("only", ["attention", "ffn"])
def test_search_removes_only_that_kind_and_records_the_kv_cache(only):
    model = cached_tiny_model("llama")
    result = prune(model, input_ids=tiny_input_ids(), only=only, count=2, progress=False)
    assert {unit.kind for unit in result.removed} == {only}
    kv = result.record.extras["kv_cache"]
    assert kv["bytes_per_token_before"] == LAYERS * KV_BYTES_PER_LAYER
    assert kv["bytes_per_token_after"] == (LAYERS - (2 if only == "attention" else 0)) * KV_BYTES_PER_LAYER
    assert result.record.config.only == only


def test_random_baseline_respects_only():
    result = prune(cached_tiny_model("llama"), input_ids=tiny_input_ids(), method="random", only="ffn", count=3,
                   progress=False)
    assert {unit.kind for unit in result.removed} == {FFN}


def test_kv_cache_bytes_of_a_pruned_model_and_in_the_statistics_table():
    dense = cached_tiny_model("llama")
    removal = [Unit(0, ATTENTION), Unit(2, "block")]
    pruned = apply_removal(copy.deepcopy(dense), removal)
    assert kv_cache_bytes_per_token(dense) == LAYERS * KV_BYTES_PER_LAYER
    assert kv_cache_bytes_per_token(pruned) == (LAYERS - 2) * KV_BYTES_PER_LAYER
    assert kv_cache_summary(dense, removal)["bytes_per_token_after"] == kv_cache_bytes_per_token(pruned)
    rows = model_stats({"dense": dense, "pruned": pruned}, context_length=8, measure=False)
    table = format_stats_table(rows)
    assert "KV cache per token" in table and "0.2 KiB (50.0%)" in table


def test_the_cli_passes_only_into_the_run_config(tmp_path):
    from finercut.cli import build_parser, run_config_from_args

    args = build_parser().parse_args(["prune", "--output", str(tmp_path / "run"), "--only", "attention",
                                      "--ratio", "0.33"])
    assert run_config_from_args(args).only == "attention"
