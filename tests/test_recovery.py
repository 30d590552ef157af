"""Specification of finercut.recovery: closed-form replacements of removed sub-layers, saved and reloaded.

The math is checked against hand computations (means, a planted linear map, a directly computed SVD); the fitted
model against the dense model masked with the same replacements; the checkpoint by reloading it both ways; cached
generation against the masked model run without a cache.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from finercut import recover
from finercut.adapters import adapter_for
from finercut.candidates import BLOCK, Unit
from finercut.checkpoint import apply_removal, load_pruned, parameter_stats, save_pruned
from finercut.evaluation.stats import count_macs, kv_cache_bytes_per_token
from finercut.pruned_modeling import ATTENTION, FFN, ReplacedAttention, ReplacedFFN
from finercut.recovery import (
    MomentSums,
    fit_linear,
    fit_map,
    map_parameters,
    masked_with_replacements,
    replacement_groups,
    truncate_rank,
)
from test_generation import assert_same_generation, greedy, left_padded_prompts
from tiny_models import HIDDEN, cached_tiny_model, tiny_input_ids

pytestmark = pytest.mark.usefixtures("one_thread")

# 1.attn, then a run 2.ffn 3.attn 3.ffn (block 3 loses both sub-layers), and 0.ffn before them all.
REMOVAL = [Unit(1, ATTENTION), Unit(3, BLOCK), Unit(2, FFN), Unit(0, FFN)]
METHODS = [("bias", None), ("lowrank", 3), ("linear", None)]


def dense(arch: str = "llama") -> torch.nn.Module:
    return copy.deepcopy(cached_tiny_model(arch))


# ------------------------------------------------------------------------------------------------------ the math


def planted(n: int = 500, hidden: int = 6, seed: int = 0, rank: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=generator, dtype=torch.float64) * 2 + 1
    weight = torch.randn(hidden, hidden, generator=generator, dtype=torch.float64)
    if rank is not None:
        weight = weight[:, :rank] @ torch.randn(rank, hidden, generator=generator, dtype=torch.float64)
    bias = torch.randn(hidden, generator=generator, dtype=torch.float64)
    sums = MomentSums(hidden)
    for chunk in range(0, n, 128):  # sums over several batches, as in a real fit
        sums.add(x[chunk:chunk + 128], x[chunk:chunk + 128] @ weight + bias)
    return x, weight, bias, sums


def test_least_squares_recovers_a_planted_linear_map_exactly():
    _, weight, bias, sums = planted()
    fitted_weight, fitted_bias = fit_linear(sums)
    torch.testing.assert_close(fitted_weight, weight, atol=1e-9, rtol=0)
    torch.testing.assert_close(fitted_bias, bias, atol=1e-9, rtol=0)


def test_the_linear_replacement_holds_the_planted_map_in_nn_linear_layout():
    x, weight, bias, sums = planted()
    tensors = fit_map(sums, "linear")
    torch.testing.assert_close(torch.nn.functional.linear(x, tensors["weight"], tensors["bias"]), x @ weight + bias)


def test_lowrank_recovers_a_planted_map_of_that_rank_exactly():
    x, weight, bias, sums = planted(rank=2)
    tensors = fit_map(sums, "lowrank", rank=2)
    assert tensors["down"].shape == (2, 6) and tensors["up"].shape == (6, 2)
    emulated = torch.nn.functional.linear(torch.nn.functional.linear(x, tensors["down"]), tensors["up"],
                                          tensors["bias"])
    torch.testing.assert_close(emulated, x @ weight + bias, atol=1e-8, rtol=0)


def test_ridge_shrinks_the_map_towards_zero_by_the_hand_formula():
    _, _, _, sums = planted()
    cxx, cxy = sums.covariances()
    weight, bias = fit_linear(sums, ridge=2.0)
    expected = np.linalg.solve(cxx.numpy() + 2.0 * np.eye(6), cxy.numpy())
    np.testing.assert_allclose(weight.numpy(), expected, atol=1e-10)
    torch.testing.assert_close(bias, sums.mean_y() - sums.mean_x() @ weight)


def test_rank_truncation_equals_the_svd_computed_directly():
    weight = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    down, up = truncate_rank(weight, 2)
    u, s, vt = np.linalg.svd(weight.numpy())
    np.testing.assert_allclose((down @ up).numpy(), u[:, :2] @ np.diag(s[:2]) @ vt[:2], atol=1e-12)
    # Eckart-Young: the error is exactly the discarded singular values.
    assert float(torch.linalg.matrix_norm(weight - down @ up)) == pytest.approx(float(np.sqrt((s[2:] ** 2).sum())))


def test_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match="rank must be between 1 and 5"):
        truncate_rank(torch.zeros(7, 5), 6)


def test_parameters_of_each_map():
    assert map_parameters("bias", 576, None) == 576
    assert map_parameters("linear", 576, None) == 576 * 577
    assert map_parameters("lowrank", 576, 64) == 2 * 576 * 64 + 576


def test_groups_per_sublayer_and_per_run_of_consecutive_sublayers():
    ordered = [Unit(0, FFN), Unit(1, ATTENTION), Unit(2, FFN), Unit(3, ATTENTION), Unit(3, FFN)]
    assert replacement_groups(REMOVAL, num_blocks=4, group="sublayer") == [[u] for u in ordered]
    # 0.ffn -> 1.attn is consecutive (the FFN of a block is followed by the next block's attention).
    assert replacement_groups(REMOVAL, num_blocks=4, group="run") == [ordered[:2], ordered[2:]]


# ----------------------------------------------------------------------------------------------- fitting on a model


def captured_sublayer_outputs(model, module_name: str, ids, *, replace: dict | None = None) -> torch.Tensor:
    """``[tokens, hidden]`` what sub-module ``module_name`` returns on ``ids``, optionally with other sub-modules'
    outputs overridden (``replace``: name -> constant ``[hidden]``), by forward hooks on the dense model."""
    outputs = []
    handles = [model.get_submodule(module_name).register_forward_hook(
        lambda module, args, output: outputs.append(output[0] if isinstance(output, tuple) else output))]
    for name, constant in (replace or {}).items():
        def override(module, args, output, constant=constant):
            value = constant.expand_as(output[0] if isinstance(output, tuple) else output)
            return (value, None) if isinstance(output, tuple) else value
        handles.append(model.get_submodule(name).register_forward_hook(override))
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return outputs[0].reshape(-1, HIDDEN)


def test_bias_equals_the_mean_output_of_the_removed_sublayer_by_hand():
    ids = tiny_input_ids(samples=4)
    model = dense()
    # Hand computation on the dense model: block 0's FFN output, averaged over all 4 x 12 tokens.
    mean_ffn0 = captured_sublayer_outputs(model, "model.layers.0.mlp", ids).double().mean(0)
    # Block 1's attention then sees block 0 with its FFN replaced by that constant.
    mean_attn1 = captured_sublayer_outputs(model, "model.layers.1.self_attn", ids,
                                           replace={"model.layers.0.mlp": mean_ffn0.float()}).double().mean(0)

    _, result = recover(model, [Unit(0, FFN), Unit(1, ATTENTION)], method="bias", input_ids=ids)

    by_slot = {(r.entry["block"], r.entry["kind"]): r.tensors["bias"].double() for r in result.replacements}
    torch.testing.assert_close(by_slot[(0, FFN)], mean_ffn0, atol=1e-6, rtol=0)
    torch.testing.assert_close(by_slot[(1, ATTENTION)], mean_attn1, atol=1e-5, rtol=0)
    assert isinstance(model.model.layers[0].mlp, ReplacedFFN)
    assert isinstance(model.model.layers[1].self_attn, ReplacedAttention)


def test_a_dense_target_bias_is_the_dense_mean_output_whatever_came_before():
    # The stream before 1.attn is the dense one minus 0.ffn's output plus its mean; the dense stream after 1.attn
    # adds 1.attn's dense output; the mean difference is exactly the mean of 0.ffn and 1.attn's dense outputs
    # minus 0.ffn's mean, i.e. 1.attn's dense mean output.
    ids = tiny_input_ids(samples=4)
    model = dense()
    mean_attn1 = captured_sublayer_outputs(model, "model.layers.1.self_attn", ids).double().mean(0)
    _, result = recover(model, [Unit(0, FFN), Unit(1, ATTENTION)], method="bias", target="dense", input_ids=ids)
    torch.testing.assert_close(result.replacements[1].tensors["bias"].double(), mean_attn1, atol=1e-5, rtol=0)


@pytest.mark.parametrize("target", ["sublayer", "dense"])
@pytest.mark.parametrize("method,rank", METHODS)
@pytest.mark.parametrize("group", ["sublayer", "run"])
def test_recovered_model_equals_the_dense_model_masked_with_its_replacements(method, rank, group, target):
    ids = tiny_input_ids(samples=4)
    reference = cached_tiny_model("llama")
    pruned, result = recover(dense(), REMOVAL, method=method, rank=rank, group=group, target=target, input_ids=ids)
    with torch.no_grad(), masked_with_replacements(reference, adapter_for(reference), REMOVAL, result.replacements):
        expected = reference(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, expected, atol=1e-5, rtol=0)
    assert len(result.replacements) == (5 if group == "sublayer" else 2)
    assert result.extra_parameters == len(result.replacements) * map_parameters(method, HIDDEN, rank)


def test_linear_recovery_moves_the_output_closer_to_the_dense_model_than_plain_removal():
    ids = tiny_input_ids(samples=8)
    with torch.no_grad():
        target = cached_tiny_model("llama")(ids).logits
        plain = apply_removal(dense(), REMOVAL)(ids).logits
        recovered = recover(dense(), REMOVAL, method="linear", group="run", input_ids=ids)[0](ids).logits
    assert (recovered - target).pow(2).mean() < 0.5 * (plain - target).pow(2).mean()


def test_a_run_keeps_its_first_block_and_drops_the_others():
    pruned, _ = recover(dense(), REMOVAL, method="bias", group="run", input_ids=tiny_input_ids())
    layout = pruned.config.finercut
    assert [(e["block"], e["kind"]) for e in layout["replacements"]] == [(0, FFN), (2, FFN)]
    assert len(pruned.model.layers) == 3  # dense block 3 lost both sub-layers and holds no replacement
    sublayer, _ = recover(dense(), REMOVAL, method="bias", group="sublayer", input_ids=tiny_input_ids())
    assert len(sublayer.model.layers) == 4  # block 3 holds the replacements of its attention and FFN


def test_bad_options_are_refused_before_any_work():
    with pytest.raises(ValueError, match="needs a rank"):
        recover(dense(), REMOVAL, method="lowrank", input_ids=tiny_input_ids())
    with pytest.raises(ValueError, match="only to recovery method lowrank"):
        recover(dense(), REMOVAL, method="bias", rank=4, input_ids=tiny_input_ids())
    with pytest.raises(ValueError, match="unknown recovery method"):
        recover(dense(), REMOVAL, method="mlp", input_ids=tiny_input_ids())
    with pytest.raises(ValueError, match="needs the dense model"):
        recover(apply_removal(dense(), REMOVAL), REMOVAL, input_ids=tiny_input_ids())
    with pytest.raises(ValueError, match="parallel residual"):
        recover(dense("gpt_neox"), REMOVAL, input_ids=tiny_input_ids())


def test_recovery_calibrates_on_the_wikitext2_validation_split(tiny_model_dir, data_dir):
    from finercut.modelio import load_tokenizer, resolve_model_source

    tokenizer = load_tokenizer(resolve_model_source(str(tiny_model_dir)))
    _, result = recover(dense(), REMOVAL, method="bias", tokenizer=tokenizer, data_dir=data_dir, num_samples=2,
                        seq_len=8)
    assert result.calibration["path"].endswith("valid.tokens.txt")
    assert result.tokens == 16


# ------------------------------------------------------------------------------- checkpoint, statistics, generation


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("method,rank", METHODS)
def test_saved_replacements_reload_both_ways_with_identical_logits(arch, method, rank, tmp_path):
    ids = tiny_input_ids()
    pruned, _ = recover(dense(arch), REMOVAL, method=method, rank=rank, group="run", input_ids=ids)
    with torch.no_grad():
        expected = pruned(ids).logits
    save_pruned(pruned, tmp_path / "model")
    kernels = {"attn_implementation": pruned.config._attn_implementation}
    by_finercut = load_pruned(tmp_path / "model", **kernels)
    by_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True,
                                                           **kernels).eval()
    for loaded in (by_finercut, by_transformers):
        assert set(loaded.state_dict()) == set(pruned.state_dict())
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected)
    with pytest.raises(OSError, match="no file named model.safetensors"):  # the dense class refuses the folder
        AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=False)


def test_replacements_are_counted_in_parameters_and_macs():
    plain = apply_removal(dense(), REMOVAL)
    recovered, result = recover(dense(), REMOVAL, method="lowrank", rank=3, group="run", input_ids=tiny_input_ids())
    extra = parameter_stats(recovered).total_parameters - parameter_stats(plain).total_parameters
    assert extra == result.extra_parameters == 2 * (2 * HIDDEN * 3 + HIDDEN)
    macs_plain, macs_recovered = count_macs(plain, context_length=10), count_macs(recovered, context_length=10)
    # Each replacement costs its two factors per token; no attention context (a replacement has no cache).
    assert macs_recovered["total"] - macs_plain["total"] == 10 * 2 * (2 * HIDDEN * 3)
    assert macs_recovered["attention_context"] == macs_plain["attention_context"]
    assert kv_cache_bytes_per_token(recovered) == kv_cache_bytes_per_token(plain)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "mistral"])
def test_cached_generation_with_replacements_equals_the_masked_model_without_cache(arch):
    ids, mask = left_padded_prompts()
    reference = cached_tiny_model(arch)
    removal = [Unit(0, ATTENTION), Unit(2, BLOCK), Unit(1, FFN)]
    # A ridge keeps the maps well conditioned (96 tokens, 32 dimensions), so rounding is not amplified.
    pruned, result = recover(dense(arch), removal, method="linear", ridge=0.1, group="sublayer",
                             input_ids=tiny_input_ids(samples=8))
    with masked_with_replacements(reference, adapter_for(reference), removal, result.replacements):
        expected = greedy(reference, ids, mask, use_cache=False)
    actual = greedy(pruned, ids, mask)
    assert_same_generation(actual, expected)
    assert len(actual.past_key_values.layers) == 2  # dense blocks 1 and 3 keep their attention


# ------------------------------------------------------------------------------------------------------------ CLI


def test_cli_prune_and_apply_with_recovery_save_the_replacements(tmp_path, tiny_model_dir, word_text, data_dir):
    from finercut.cli import main

    run = tmp_path / "run"
    fit = ["--data-dir", str(data_dir), "--recover-samples", "2", "--recover-seq-len", "8"]
    assert main(["prune", "--model", str(tiny_model_dir), "--calibration", str(word_text), "--samples", "2",
                 "--seq-len", "12", "--count", "3", "--no-progress", "--output", str(run), "--recover", "bias",
                 *fit]) == 0
    with_bias = load_pruned(run / "model")
    assert [e["map"] for e in with_bias.config.finercut["replacements"]] == ["bias"] * 3
    provenance = json.loads((run / "model" / "pruning.json").read_text())["provenance"]
    assert provenance["recovery"]["method"] == "bias" and provenance["recovery"]["tokens"] == 16

    assert main(["apply", str(run), "--output", str(tmp_path / "lowrank"), "--recover", "lowrank", "--rank", "2",
                 "--recover-group", "run", *fit]) == 0
    lowrank = load_pruned(tmp_path / "lowrank")
    assert {e["rank"] for e in lowrank.config.finercut["replacements"]} == {2}


def test_cli_refuses_a_rank_without_lowrank_before_any_work(capsys, tmp_path, tiny_model_dir, word_text):
    from finercut.cli import main

    assert main(["prune", "--model", str(tiny_model_dir), "--calibration", str(word_text), "--count", "2",
                 "--output", str(tmp_path / "run"), "--recover", "bias", "--rank", "4"]) == 2
    assert "only to recovery method lowrank" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_skip_first_leaves_the_first_positions_of_every_window_out_of_the_fit():
    ids = tiny_input_ids(samples=4)
    model = dense()
    outputs = captured_sublayer_outputs(model, "model.layers.0.mlp", ids).reshape(4, -1, HIDDEN)
    _, result = recover(model, [Unit(0, FFN)], method="bias", input_ids=ids, skip_first=2)
    torch.testing.assert_close(result.replacements[0].tensors["bias"].double(),
                               outputs[:, 2:].double().reshape(-1, HIDDEN).mean(0), atol=1e-6, rtol=0)
