"""Export for serving engines: DeciLM folders and GGUF files reload to the pruned model's logits; refusals say why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_configs, tiny_input_ids

import finercut
from finercut.cli import main
from finercut.export import ExportError, export_model
from finercut.export.decilm import (
    DeciLMReference,
    ffn_mult_for,
    ffn_mult_to_intermediate_size,
    load_decilm,
)
from finercut.export.gguf import ZERO_FFN_WIDTH, permute_for_rope, unpermute_from_rope

# Attention-only, FFN-only and whole-block removals in one model.
MIXED = [{"block": 1, "kind": "attention"}, {"block": 2, "kind": "ffn"}, {"block": 3, "kind": "block"}]


def pruned_folder(tmp_path: Path, removed, *, arch: str = "llama", intermediate: int = 256, dtype=torch.float64,
                  **overrides) -> tuple[Path, torch.nn.Module]:
    """A tiny model of ``arch`` (FFN width ``intermediate``), pruned and saved; returns the folder and the model."""
    from transformers import AutoModelForCausalLM

    config = tiny_configs()[arch]
    config.intermediate_size = intermediate
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    finercut.apply_removal(model, removed)
    finercut.save_pruned(model, tmp_path / "pruned")
    return tmp_path / "pruned", model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


# ---------------------------------------------------------------------------------------------------------------------
# The FFN width formula, against hand-computed values


@pytest.mark.parametrize("hidden, width, mult", [
    (8192, 28672, 5.25),  # Llama-3.1-Nemotron-51B / Llama 3 70B
    (4096, 14336, 5.25),  # Llama 3 8B, Mistral 7B
    (576, 1536, 4.0),     # SmolLM2-135M
    (5120, 13824, 4.05),  # Llama 2 13B
    (32, 256, 12.0),      # the tiny test model
])
def test_ffn_mult_round_trips_through_the_loaders_formula(hidden, width, mult):
    assert ffn_mult_for(width, hidden) == pytest.approx(mult, abs=1e-6)
    assert ffn_mult_to_intermediate_size(ffn_mult_for(width, hidden), hidden) == width


def test_ffn_mult_formula_rounds_up_to_256():
    # int(2 * 5.25 * 4096 / 3) = 14336; int(2 * 1.0 * 100 / 3) = 66 -> 256
    assert ffn_mult_to_intermediate_size(5.25, 4096) == 14336
    assert ffn_mult_to_intermediate_size(1.0, 100) == 256


def test_a_width_that_is_not_a_multiple_of_256_is_refused():
    with pytest.raises(ExportError, match="not a multiple of 256"):
        ffn_mult_for(11000, 4096)


def test_rope_permutation_is_inverted():
    weight = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    permuted = permute_for_rope(weight, 2)
    # head 0 rows 0..3 are [x0, x1 | y0, y1]: llama.cpp's order pairs x0 with y0
    assert permuted[:4, 0].tolist() == [0.0, 6.0, 3.0, 9.0]
    assert torch.equal(unpermute_from_rope(permuted, 2), weight)


# ---------------------------------------------------------------------------------------------------------------------
# DeciLM


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_decilm_export_reloads_to_the_pruned_models_logits(tmp_path, one_thread, arch):
    overrides = {"sliding_window": None} if arch == "mistral" else {}
    folder, pruned = pruned_folder(tmp_path, MIXED, arch=arch, **overrides)
    out, notes = export_model(folder, format="decilm", output=tmp_path / "deci")
    assert "blocks [2]" in notes[1]  # kept attention, lost FFN: llama.cpp's converter would lose the attention
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert config["num_hidden_layers"] == 3 and "finercut" not in config
    attention = [b["attention"] for b in config["block_configs"]]
    ffn = [b["ffn"] for b in config["block_configs"]]
    assert [a["no_op"] for a in attention] == [False, True, False]
    assert [a["n_heads_in_group"] for a in attention] == [2, None, 2]  # 4 heads, 2 KV heads
    assert [f["no_op"] for f in ffn] == [False, False, True]
    assert [f["ffn_mult"] for f in ffn] == [12.0, 12.0, None]
    assert all("replace_with_linear" in a and "replace_with_linear" in f for a, f in zip(attention, ffn))
    reloaded = load_decilm(out)
    ids = tiny_input_ids()
    torch.testing.assert_close(logits(reloaded, ids), logits(pruned, ids), rtol=0, atol=1e-10)


def test_decilm_weights_are_named_as_the_layout_expects(tmp_path):
    from safetensors import safe_open

    folder, _ = pruned_folder(tmp_path, MIXED)
    out, _ = export_model(folder, format="decilm", output=tmp_path / "deci")
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        names = set(handle.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.0.mlp.gate_proj.weight" in names
    assert not any(n.startswith("model.layers.1.self_attn") or n.startswith("model.layers.1.input_layernorm")
                   for n in names)  # block 1 lost its attention
    assert not any(n.startswith("model.layers.2.mlp") or "layers.2.post_attention" in n for n in names)
    assert not any(n.startswith("model.layers.3.") for n in names)  # 3 blocks remain
    assert (out / "configuration_decilm.py").is_file() and (out / "finercut_export.json").is_file()


def test_decilm_config_loads_through_its_config_class_with_attribute_access(tmp_path):
    """vLLM reads ``config.block_configs[i].attention.no_op`` as attributes, through the shipped config class."""
    from transformers import AutoConfig

    folder, _ = pruned_folder(tmp_path, MIXED)
    out, _ = export_model(folder, format="decilm", output=tmp_path / "deci")
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert type(config).__name__ == "DeciLMConfig" and config.num_hidden_layers == 3
    assert [b.attention.no_op for b in config.block_configs] == [False, True, False]
    assert [b.ffn.ffn_mult for b in config.block_configs] == [12.0, 12.0, None]


def test_decilm_reference_refuses_weights_that_do_not_fit(tmp_path):
    folder, _ = pruned_folder(tmp_path, MIXED)
    out, _ = export_model(folder, format="decilm", output=tmp_path / "deci")
    config = json.loads((out / "config.json").read_text())
    config["block_configs"][1]["attention"] = config["block_configs"][0]["attention"]  # claims an attention
    from safetensors.torch import load_file

    with pytest.raises(ValueError, match="missing"):
        DeciLMReference(config).load_weights(load_file(out / "model.safetensors"))


@pytest.mark.parametrize("arch, overrides, removed, message", [
    ("llama", {"intermediate": 64}, MIXED, "not a multiple of 256"),
    ("gpt2", {}, MIXED, "Llama-family"),
    ("mistral", {}, MIXED, "sliding-window"),
    ("llama", {}, [{"block": 0, "kind": "attention"}], "first remaining block"),
])
def test_decilm_refusals_say_why_and_write_nothing(tmp_path, arch, overrides, removed, message):
    folder, _ = pruned_folder(tmp_path, removed, arch=arch, dtype=torch.float32, **overrides)
    for weights in folder.glob("*.safetensors"):  # refused from config.json alone, before reading any weights
        weights.unlink()
    with pytest.raises(ExportError, match=message):
        export_model(folder, format="decilm", output=tmp_path / "deci")
    assert not (tmp_path / "deci").exists()


def test_a_folder_that_is_not_pruned_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(ExportError, match="not a model pruned by finercut"):
        export_model(tiny_model_dir, format="decilm", output=tmp_path / "deci")


# ---------------------------------------------------------------------------------------------------------------------
# GGUF


def gguf_metadata(path: Path) -> tuple[dict, dict]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    return fields, tensors


def deci_reference_from_gguf(path: Path) -> DeciLMReference:
    """Read a ``deci`` GGUF back into the DeciLM schema (per-layer head counts and FFN widths, HF tensor order)."""
    fields, tensors = gguf_metadata(path)
    heads, kv_heads, widths = (fields[f"deci.{key}"] for key in ("attention.head_count", "attention.head_count_kv",
                                                                  "feed_forward_length"))
    blocks = [{"attention": {"no_op": h == 0, "n_heads_in_group": h // kv if h else None},
               "ffn": {"no_op": False, "intermediate_size": w}} for h, kv, w in zip(heads, kv_heads, widths)]
    config = {"vocab_size": fields["deci.vocab_size"], "hidden_size": fields["deci.embedding_length"],
              "num_attention_heads": max(heads), "num_hidden_layers": len(blocks),
              "rms_norm_eps": fields["deci.attention.layer_norm_rms_epsilon"],
              "rope_theta": fields["deci.rope.freq_base"], "tie_word_embeddings": "output.weight" not in tensors,
              "max_position_embeddings": fields["deci.context_length"], "block_configs": blocks,
              "attention_bias": False, "qkv_bias": any(name.endswith("attn_q.bias") for name in tensors)}
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    sub = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
           "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    state = {}
    for name, tensor in tensors.items():
        stem, part = name.rsplit(".", 1)
        if stem.startswith("blk."):
            _, index, kind = stem.split(".")
            if kind == "attn_q":
                tensor = unpermute_from_rope(tensor, heads[int(index)])
            if kind == "attn_k":
                tensor = unpermute_from_rope(tensor, kv_heads[int(index)])
            state[f"model.layers.{index}.{sub[kind]}.{part}"] = tensor
        else:
            state[f"{names[stem]}.{part}"] = tensor
    model = DeciLMReference(config)
    model.load_weights(state)
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_deci_layout_has_per_layer_counts_and_reloads_to_the_same_logits(tmp_path, one_thread, arch):
    folder, pruned = pruned_folder(tmp_path, MIXED, arch=arch, dtype=torch.float32)
    path, notes = export_model(folder, format="gguf", output=tmp_path / "out" / "pruned.gguf")
    fields, tensors = gguf_metadata(path)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.block_count"] == 3
    assert fields["deci.attention.head_count"] == [4, 0, 4]
    assert fields["deci.attention.head_count_kv"] == [2, 0, 2]
    assert fields["deci.feed_forward_length"] == [256, 256, ZERO_FFN_WIDTH]  # block 2 lost its FFN
    assert fields["deci.attention.key_length"] == 8 and fields["deci.rope.dimension_count"] == 8
    assert json.loads(fields["finercut.removed"]) == [{"block": 1, "kind": "attention"}, {"block": 2, "kind": "ffn"},
                                                      {"block": 3, "kind": "attention"}, {"block": 3, "kind": "ffn"}]
    assert not any(name.startswith("blk.1.attn") for name in tensors)  # llama.cpp loads none for n_head = 0
    assert torch.count_nonzero(tensors["blk.2.ffn_down.weight"]) == 0
    assert tuple(tensors["blk.0.ffn_gate.weight"].shape) == (256, 32) and "blk.3.attn_q.weight" not in tensors
    assert any("zero FFN" in note for note in notes)
    assert ("blk.0.attn_q.bias" in tensors) == (arch == "qwen2") and "blk.0.attn_output.bias" not in tensors
    ids = tiny_input_ids()
    torch.testing.assert_close(logits(deci_reference_from_gguf(path), ids), logits(pruned, ids), rtol=0, atol=1e-5)


def test_gguf_of_whole_block_removals_is_a_llama_file_transformers_loads(tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    folder, pruned = pruned_folder(tmp_path, [{"block": 2, "kind": "block"}], intermediate=64, dtype=torch.float32)
    path, notes = export_model(folder, format="gguf", output=tmp_path / "m.gguf")
    assert gguf_metadata(path)[0]["general.architecture"] == "llama" and "'llama'" in notes[0]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 3
    ids = tiny_input_ids()
    torch.testing.assert_close(logits(reloaded, ids), logits(pruned, ids), rtol=0, atol=1e-5)


def test_gguf_f16_halves_the_matrices_and_keeps_norms_float32(tmp_path):
    import gguf

    folder, _ = pruned_folder(tmp_path, MIXED, dtype=torch.float32)
    path, _ = export_model(folder, format="gguf", output=tmp_path / "m.gguf", outtype="f16")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_gguf_refuses_a_first_block_without_attention(tmp_path):
    folder, _ = pruned_folder(tmp_path, [{"block": 0, "kind": "attention"}], dtype=torch.float32)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ExportError, match="head size from layer 0"):
        export_model(folder, format="gguf", output=tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_exports_a_run_folder_and_refuses_in_one_line(tmp_path, capsys):
    folder, _ = pruned_folder(tmp_path, MIXED, dtype=torch.float32)
    run = tmp_path / "run"
    run.mkdir()
    shutil.move(str(folder), run / "model")
    (run / "record.json").write_text("{}")
    assert main(["export", str(run), "--format", "decilm", "--output", str(tmp_path / "deci")]) == 0
    assert "DeciLM" in capsys.readouterr().out and (tmp_path / "deci" / "config.json").is_file()
    assert main(["export", str(run), "--format", "decilm", "--output", str(tmp_path / "deci")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "gguf", "--output", str(tmp_path / "m.gguf")]) == 0
    assert (tmp_path / "m.gguf").is_file()


def test_a_model_with_recovery_replacements_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    from finercut.recovery import recover

    config = tiny_configs()["llama"]
    config.intermediate_size = 256
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    recover(model, [{"block": 2, "kind": "attention"}], method="bias", input_ids=tiny_input_ids())
    finercut.save_pruned(model, tmp_path / "pruned")
    for format in ("decilm", "gguf"):
        with pytest.raises(ExportError, match="fitted maps"):
            export_model(tmp_path / "pruned", format=format, output=tmp_path / f"out-{format}")


def test_settings_are_refused_before_the_model_is_loaded(tmp_path):
    folder, _ = pruned_folder(tmp_path, MIXED, dtype=torch.float32)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ExportError, match="applies to --format gguf"):
        export_model(folder, format="decilm", output=tmp_path / "deci", outtype="f16")
    with pytest.raises(ExportError, match="choose from f32, f16"):
        export_model(folder, format="gguf", output=tmp_path / "m.gguf", outtype="q4_0")


def test_gguf_embeds_a_bpe_tokenizer_when_there_is_no_source_gguf(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder, _ = pruned_folder(tmp_path, MIXED, dtype=torch.float32)
    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    path, notes = export_model(folder, format="gguf", output=tmp_path / "m.gguf")
    fields, _ = gguf_metadata(path)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "default"
    # padded to the model's 96 embedding rows, as llama.cpp's converter pads
    assert fields["tokenizer.ggml.tokens"] == ["<s>", "</s>", "a", "b", "ab"] + [f"[PAD{i}]" for i in range(5, 96)]
    assert fields["tokenizer.ggml.merges"] == ["a b"]
    assert fields["tokenizer.ggml.token_type"] == [3, 3, 1, 1, 1] + [5] * 91  # control, normal, unused
    assert fields["tokenizer.ggml.bos_token_id"] == 0 and fields["tokenizer.ggml.eos_token_id"] == 1
    assert any("BPE tokenizer" in note for note in notes)
