"""Specification of recovery by folding (``--recover fold``): a map per run of removed sub-layers merged into the
output projection of the kept sub-layer before it.

The fold's math is checked against an explicit least-squares solve and a planted case it recovers exactly; the
folded model against the dense model masked with the same folds; its size, checkpoint and exports against the plain
pruned model's; a run at the start of the model and the architectures a fold cannot express by what they say.
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
from finercut.errors import ConfigError
from finercut.materialize import RecoveryOptions
from finercut.pruned_modeling import ATTENTION, FFN
from finercut.recovery import (
    MomentSums,
    fit_fold,
    fit_linear,
    fold_into_projection,
    fold_plan,
    masked_with_replacements,
    parse_recovery_spec,
)
from tiny_models import HIDDEN, cached_tiny_model, tiny_configs, tiny_input_ids, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# 0.ffn -> 1.attn is one run (folded into 0.attn); 2.ffn 3.attn 3.ffn another (folded into 2.attn).
REMOVAL = [Unit(1, ATTENTION), Unit(3, BLOCK), Unit(2, FFN), Unit(0, FFN)]


def dense(arch: str = "llama") -> torch.nn.Module:
    return copy.deepcopy(cached_tiny_model(arch))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits  # the DeciLM reference returns logits


# ------------------------------------------------------------------------------------------------------ the math


def test_fold_plan_pairs_each_run_with_the_kept_sublayer_before_it():
    folds, unrecovered = fold_plan(REMOVAL, num_blocks=4)
    assert folds == [(Unit(0, ATTENTION), [Unit(0, FFN), Unit(1, ATTENTION)]),
                     (Unit(2, ATTENTION), [Unit(2, FFN), Unit(3, ATTENTION), Unit(3, FFN)])]
    assert unrecovered == []
    folds, unrecovered = fold_plan([Unit(0, BLOCK), Unit(2, ATTENTION)], num_blocks=4)
    assert unrecovered == [[Unit(0, ATTENTION), Unit(0, FFN)]]
    assert folds == [(Unit(1, FFN), [Unit(2, ATTENTION)])]


def test_fit_without_intercept_is_least_squares_through_the_origin_and_the_ridge_pulls_towards_identity():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=generator, dtype=torch.float64) + 2
    y = x @ torch.randn(6, 6, generator=generator, dtype=torch.float64) + torch.randn(6, generator=generator,
                                                                                      dtype=torch.float64)
    sums = MomentSums(6)
    sums.add(x, y)
    weight, bias = fit_linear(sums, intercept=False)
    np.testing.assert_allclose(weight.numpy(), np.linalg.lstsq(x.numpy(), y.numpy(), rcond=None)[0], atol=1e-10)
    assert torch.equal(bias, torch.zeros(6, dtype=torch.float64))
    transform, _ = fit_fold(sums)
    np.testing.assert_allclose(transform.numpy(), np.linalg.lstsq(x.numpy(), (x + y).numpy(), rcond=None)[0],
                               atol=1e-10)
    strong, _ = fit_fold(sums, ridge=1e9)
    torch.testing.assert_close(strong, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("layer", ["linear", "linear_bias", "conv1d", "experts"])
def test_folding_into_a_projection_maps_its_output_by_t_plus_c(layer):
    from transformers.pytorch_utils import Conv1D

    generator = torch.Generator().manual_seed(1)
    z = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    transform = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    intercept = torch.randn(4, generator=generator, dtype=torch.float64)
    if layer == "experts":  # two experts' [hidden, width] weights, each applied as z W_e^T
        projection = torch.nn.Parameter(torch.randn(2, 4, 7, generator=generator, dtype=torch.float64))
        before = [z @ w.T for w in projection.detach().clone()]
        fold_into_projection(projection, transform)
        for e, out in enumerate(before):
            torch.testing.assert_close(z @ projection[e].detach().T, out @ transform)
        return
    if layer == "conv1d":
        projection = Conv1D(4, 7).double()
        torch.nn.init.normal_(projection.bias)
    else:
        projection = torch.nn.Linear(7, 4, bias=layer == "linear_bias").double()
    with torch.no_grad():
        before = projection(z)
        fold_into_projection(projection, transform, intercept if projection.bias is not None else None)
        expected = before @ transform + (intercept if projection.bias is not None else 0)
        torch.testing.assert_close(projection(z), expected)
    if projection.bias is None:
        with pytest.raises(ValueError, match="no bias to hold"):
            fold_into_projection(projection, transform, intercept)


def captured(model, ids, *, pre: dict[str, str] = (), post: dict[str, str] = ()) -> dict[str, torch.Tensor]:
    """``name -> [tokens, hidden]``: the inputs (``pre``) or outputs (``post``) of sub-modules on ``ids``."""
    found, handles = {}, []
    for key, path in dict(pre).items():
        handles.append(model.get_submodule(path).register_forward_pre_hook(
            lambda module, args, kwargs, key=key: found.__setitem__(key, (args[0] if args else
                                                                          kwargs["hidden_states"])),
            with_kwargs=True))
    for key, path in dict(post).items():
        handles.append(model.get_submodule(path).register_forward_hook(
            lambda module, args, output, key=key: found.__setitem__(
                key, output[0] if isinstance(output, tuple) else output)))
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {key: value.reshape(-1, value.shape[-1]) for key, value in found.items()}


@pytest.mark.parametrize("target", ["sublayer", "dense"])
def test_the_folded_stream_after_the_run_is_h_plus_p_t_with_t_from_a_least_squares_solve(target):
    # One run, 1.ffn 2.attn, after the kept 1.attn: by hand, h is block 1's input, P(z) what 1.attn adds, and the
    # stream after the run in the dense model is block 2's input plus what 2.attn adds. With nothing removed
    # before, both targets are that stream.
    ids = tiny_input_ids(samples=8)
    model = tiny_model("llama", dtype=torch.float64)
    by_hand = captured(model, ids, pre={"h": "model.layers.1", "h2": "model.layers.2"},
                       post={"p": "model.layers.1.self_attn", "a2": "model.layers.2.self_attn"})
    h, p = by_hand["h"].numpy(), by_hand["p"].numpy()
    after_run = (by_hand["h2"] + by_hand["a2"]).numpy()
    transform = np.linalg.lstsq(p, after_run - h, rcond=None)[0]  # P T ~ P + y, no intercept: o_proj has no bias

    removal = [Unit(1, FFN), Unit(2, ATTENTION)]
    folded, result = recover(copy.deepcopy(model), removal, method="fold", target=target, input_ids=ids)
    np.testing.assert_allclose(result.folds[0].tensors["transform"].numpy(), transform, atol=1e-8)
    # In the pruned model, block 2 lost its attention: its input is the stream after the run.
    stream = captured(folded, ids, pre={"after": "model.layers.2"})["after"].numpy()
    np.testing.assert_allclose(stream, h + p @ transform, atol=1e-10)
    assert result.folds[0].entry == {"block": 1, "kind": ATTENTION, "projection": "self_attn.o_proj",
                                     "intercept": False, "covers": [u.to_dict() for u in removal]}
    error = result.residual_error[0]
    np.testing.assert_allclose(error["error_mean_square"],
                               ((p @ transform - (after_run - h)) ** 2).sum() / len(p), rtol=1e-8)


def planted_model() -> torch.nn.Module:
    """A float64 tiny Llama whose block 0 FFN adds exactly ``x A`` to its input stream ``x``, with ``h A = 0`` for
    the embeddings ``h`` (they live in the first 16 dimensions, ``A`` reads only the last 16): so removing that FFN
    loses ``P(z) A``, a linear function of what block 0's attention writes, and the fold ``T = I + A`` is exact."""
    model = tiny_model("llama", dtype=torch.float64)
    generator = torch.Generator().manual_seed(5)
    planted = torch.zeros(HIDDEN, HIDDEN, dtype=torch.float64)
    planted[HIDDEN // 2:] = torch.randn(HIDDEN // 2, HIDDEN, generator=generator, dtype=torch.float64) * 0.3
    with torch.no_grad():
        model.model.embed_tokens.weight[:, HIDDEN // 2:] = 0
        ffn = torch.nn.Linear(HIDDEN, HIDDEN, bias=False, dtype=torch.float64)
        ffn.weight.copy_(planted.T)
    block = model.model.layers[0]
    block.mlp, block.post_attention_layernorm = ffn, torch.nn.Identity()
    model.planted = planted
    return model


@pytest.mark.parametrize("target", ["sublayer", "dense"])
def test_a_run_whose_loss_is_linear_in_what_the_kept_sublayer_writes_is_recovered_exactly(target):
    ids = tiny_input_ids(samples=8)
    model = planted_model()
    expected = logits(model, ids)
    plain = logits(apply_removal(copy.deepcopy(model), [Unit(0, FFN)]), ids)
    assert (plain - expected).abs().max() > 1e-2  # the removal matters
    folded, result = recover(copy.deepcopy(model), [Unit(0, FFN)], method="fold", target=target, input_ids=ids)
    torch.testing.assert_close(result.folds[0].tensors["transform"],
                               torch.eye(HIDDEN, dtype=torch.float64) + model.planted, atol=1e-9, rtol=0)
    torch.testing.assert_close(logits(folded, ids), expected, atol=1e-6, rtol=0)
    # on other text too: the fold is exact, not fitted to the calibration tokens
    other = tiny_input_ids(samples=2, seed=7)
    torch.testing.assert_close(logits(folded, other), logits(model, other), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- fitting on a model


@pytest.mark.parametrize("target", ["sublayer", "dense"])
@pytest.mark.parametrize("arch", ["llama", "mixtral", "gpt2", "phi3", "qwen2"])
def test_folded_model_equals_the_dense_model_masked_with_its_folds(arch, target):
    ids = tiny_input_ids(samples=8)
    reference = cached_tiny_model(arch)
    before = {name: t.clone() for name, t in reference.state_dict().items()}
    pruned, result = recover(dense(arch), REMOVAL, method="fold", target=target, input_ids=ids)
    with masked_with_replacements(reference, adapter_for(reference), REMOVAL, result.folds):
        expected = logits(reference, ids)
    torch.testing.assert_close(logits(pruned, ids), expected, atol=1e-5, rtol=0)
    assert all(torch.equal(before[name], t) for name, t in reference.state_dict().items())  # restored
    assert [f.entry["kind"] for f in result.folds] == [ATTENTION, ATTENTION]
    assert [f.entry["intercept"] for f in result.folds] == [arch == "gpt2"] * 2  # GPT-2's c_proj has a bias
    assert result.replacements == [] and result.extra_parameters == 0 and result.unrecovered == []
    assert all(e["error_mean_square"] < e["target_mean_square"] for e in result.residual_error)


def test_fold_moves_the_output_closer_to_the_dense_model_than_plain_removal():
    ids = tiny_input_ids(samples=8)
    target = logits(cached_tiny_model("llama"), ids)
    plain = logits(apply_removal(dense(), REMOVAL), ids)
    folded = logits(recover(dense(), REMOVAL, method="fold", input_ids=ids)[0], ids)
    assert (folded - target).pow(2).mean() < 0.7 * (plain - target).pow(2).mean()


def test_a_ffn_run_folds_into_every_expert_of_an_moe_attention_before_it_and_vice_versa():
    # Mixtral: 1.attn is folded into 0.ffn, the sparse MoE block, i.e. into every expert's down projection.
    ids = tiny_input_ids(samples=8)
    pruned, result = recover(dense("mixtral"), [Unit(1, ATTENTION)], method="fold", input_ids=ids)
    assert result.folds[0].entry["projection"] == "mlp.experts.down_proj"
    reference = cached_tiny_model("mixtral")
    with masked_with_replacements(reference, adapter_for(reference), [Unit(1, ATTENTION)], result.folds):
        torch.testing.assert_close(logits(pruned, ids), logits(reference, ids), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- a run at the start


def test_a_run_at_the_start_stays_unrecovered_and_says_so(tmp_path):
    ids = tiny_input_ids(samples=8)
    removal = [Unit(0, ATTENTION), Unit(2, FFN)]
    with pytest.warns(UserWarning, match=r"run 0\.attn starts the model .* stays unrecovered"):
        pruned, result = recover(dense(), removal, method="fold", input_ids=ids)
    assert result.unrecovered == [[Unit(0, ATTENTION)]]
    assert [(f.entry["block"], f.entry["kind"]) for f in result.folds] == [(2, ATTENTION)]
    # Exactly the plain removal of 0.attn with 2.ffn folded: the same as masking with that one fold.
    reference = cached_tiny_model("llama")
    with masked_with_replacements(reference, adapter_for(reference), removal, result.folds):
        torch.testing.assert_close(logits(pruned, ids), logits(reference, ids), atol=1e-5, rtol=0)
    notes = []
    recover(dense(), removal, method="fold", input_ids=ids, log=notes.append)
    assert len(notes) == 1 and "unrecovered" in notes[0]
    save_pruned(pruned, tmp_path / "m", provenance={"recovery": result.to_dict()})
    recorded = json.loads((tmp_path / "m" / "pruning.json").read_text())["provenance"]["recovery"]
    assert recorded["unrecovered"] == [[{"block": 0, "kind": ATTENTION}]]
    assert recorded["folds"][0]["block"] == 2 and recorded["extra_parameters"] == 0


def test_only_a_run_at_the_start_leaves_the_model_as_plainly_pruned():
    ids = tiny_input_ids(samples=4)
    removal = [Unit(0, BLOCK), Unit(1, ATTENTION)]
    with pytest.warns(UserWarning, match=r"0\.attn\.\.1\.attn"):
        pruned, result = recover(dense(), removal, method="fold", input_ids=ids)
    assert result.folds == [] and len(result.unrecovered) == 1
    torch.testing.assert_close(logits(pruned, ids), logits(apply_removal(dense(), removal), ids), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("arch, message", [
    ("gemma2", "fold does not apply to gemma2 models: a norm is applied to every sub-layer's output"),
    ("gemma3", "fold does not apply to gemma3 models: a norm is applied"),
    ("gpt_neox", "fold does not apply to gpt_neox models: its blocks have a parallel residual"),
])
def test_architectures_a_fold_cannot_express_are_refused_before_any_fitting(arch, message):
    # No tokenizer and no ids: a check made after the calibration step would fail on those instead.
    with pytest.raises(ConfigError, match=message) as refused:
        recover(dense(arch), REMOVAL, method="fold")
    assert "\n" not in str(refused.value)
    assert ("use --recover linear or lowrank" in str(refused.value)) == (arch != "gpt_neox")
    with pytest.raises(ConfigError, match=message):  # from the config alone, as prune and apply check it
        RecoveryOptions(method="fold").check_model(tiny_configs()[arch])


def test_bad_fold_options_are_refused():
    with pytest.raises(ConfigError, match="only to recovery method lowrank, not fold"):
        RecoveryOptions(method="fold", rank=4)
    with pytest.raises(ConfigError, match="--recover-group sublayer does not apply"):
        RecoveryOptions(method="fold", group="sublayer")
    options = RecoveryOptions(method="fold")
    assert (options.group, options.target) == ("run", "sublayer")
    assert RecoveryOptions(method="linear").signature == RecoveryOptions(method="linear", group="sublayer",
                                                                         target="sublayer").signature
    assert parse_recovery_spec("fold") == {"method": "fold", "rank": None, "group": "run"}
    with pytest.raises(ConfigError, match="unknown recovery 'fold-run'"):
        parse_recovery_spec("fold-run")


# ------------------------------------------------------------------------------- checkpoint, statistics, exports


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_a_folded_model_is_a_plain_pruned_model_that_reloads_both_ways(arch, tmp_path):
    ids = tiny_input_ids()
    pruned, result = recover(dense(arch), REMOVAL, method="fold", input_ids=tiny_input_ids(samples=8))
    plain = apply_removal(dense(arch), REMOVAL)
    assert set(pruned.state_dict()) == set(plain.state_dict())
    assert parameter_stats(pruned).total_parameters == parameter_stats(plain).total_parameters
    assert "replacements" not in pruned.config.finercut
    expected = logits(pruned, ids)
    save_pruned(pruned, tmp_path / "model")
    kernels = {"attn_implementation": pruned.config._attn_implementation}
    for loaded in (load_pruned(tmp_path / "model", **kernels),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True,
                                                        **kernels).eval()):
        assert set(loaded.state_dict()) == set(pruned.state_dict())
        assert torch.equal(logits(loaded, ids), expected)


@pytest.mark.parametrize("removed, gguf_layout", [
    ([{"block": 2, "kind": "block"}], "llama"),
    ([{"block": 1, "kind": "attention"}, {"block": 2, "kind": "ffn"}, {"block": 3, "kind": "block"}], "deci"),
])
def test_the_exports_accept_a_folded_model_and_reload_to_its_logits(removed, gguf_layout, tmp_path):
    from test_export import deci_reference_from_gguf, gguf_metadata

    from finercut.export import export_model
    from finercut.export.decilm import load_decilm

    config = tiny_configs()["llama"]
    config.intermediate_size = 256  # the DeciLM loaders' FFN widths are multiples of 256
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    _, result = recover(model, removed, method="fold", input_ids=tiny_input_ids(samples=8))
    save_pruned(model, tmp_path / "folded", provenance={"recovery": result.to_dict()})
    ids = tiny_input_ids()
    expected = logits(model, ids)

    deci, _ = export_model(tmp_path / "folded", format="decilm", output=tmp_path / "deci")
    torch.testing.assert_close(logits(load_decilm(deci), ids), expected, rtol=0, atol=1e-5)
    recorded = json.loads((deci / "finercut_export.json").read_text())["recovery"]
    assert recorded["method"] == "fold" and recorded["folds"] == [f.entry for f in result.folds]
    path, _ = export_model(tmp_path / "folded", format="gguf", output=tmp_path / "out" / "m.gguf")
    fields = gguf_metadata(path)[0]
    assert fields["general.architecture"] == gguf_layout
    assert json.loads(fields["finercut.recovery"])["folds"] == recorded["folds"]
    if gguf_layout == "deci":
        reloaded = deci_reference_from_gguf(path)
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=path.name,
                                                        dtype=torch.float32).eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------ CLI


def test_cli_prune_apply_and_export_with_fold(tmp_path, tiny_model_dir, word_text, data_dir, capsys):
    from finercut.cli import main

    run = tmp_path / "run"
    fit = ["--data-dir", str(data_dir), "--recover-samples", "4", "--recover-seq-len", "16"]
    assert main(["prune", "--model", str(tiny_model_dir), "--calibration", str(word_text), "--samples", "2",
                 "--seq-len", "12", "--count", "3", "--no-progress", "--output", str(run), "--recover", "fold",
                 *fit]) == 0
    assert "fold recovery of 3 units" in capsys.readouterr().err
    folded = load_pruned(run / "model")
    assert "replacements" not in folded.config.finercut
    recovery = json.loads((run / "model" / "pruning.json").read_text())["provenance"]["recovery"]
    assert recovery["method"] == "fold" and recovery["extra_parameters"] == 0 and recovery["tokens"] == 64
    assert recovery["folds"] and "folded" in recovery and "unrecovered" in recovery

    assert main(["apply", str(run), "--count", "2", "--output", str(tmp_path / "m"), "--recover", "fold",
                 "--recover-target", "dense", "--ridge", "0.5", *fit]) == 0
    provenance = json.loads((tmp_path / "m" / "pruning.json").read_text())["provenance"]
    assert provenance["recovery"]["target"] == "dense" and provenance["recovery"]["ridge"] == 0.5
    assert main(["export", str(tmp_path / "m"), "--format", "gguf", "--output", str(tmp_path / "m.gguf")]) == 0
    assert (tmp_path / "m.gguf").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--rank", "4"], "only to recovery method lowrank, not fold"),
    (["--recover-group", "sublayer"], "--recover-group sublayer does not apply"),
])
def test_cli_refuses_bad_fold_options_in_one_line_before_any_work(extra, message, capsys, tmp_path, tiny_model_dir,
                                                                  word_text):
    from finercut.cli import main

    assert main(["prune", "--model", str(tiny_model_dir), "--calibration", str(word_text), "--count", "2",
                 "--output", str(tmp_path / "run"), "--recover", "fold", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_refuses_fold_on_gemma2_before_searching(capsys, tmp_path, word_text):
    from conftest import save_tiny_model

    from finercut.cli import main

    folder = save_tiny_model(tmp_path / "gemma2", "gemma2")
    capsys.readouterr()
    assert main(["prune", "--model", str(folder), "--calibration", str(word_text), "--samples", "2", "--seq-len",
                 "12", "--count", "2", "--output", str(tmp_path / "run"), "--recover", "fold"]) == 2
    err = capsys.readouterr().err
    assert "fold does not apply to gemma2 models" in err and "linear or lowrank" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
