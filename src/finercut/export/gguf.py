"""A GGUF file of a pruned Llama-family model, in the layout llama.cpp runs.

Which llama.cpp architecture (read in llama.cpp's source, ggml-org/llama.cpp):

* every remaining block whole (block-level pruning): ``llama``, the ordinary Llama file;
* some block lost only its attention or only its FFN: ``deci`` (``src/models/deci.cpp``, ``LLM_ARCH_DECI`` in
  ``src/llama-model.cpp``), whose head counts and FFN widths are per-layer arrays. A layer with
  ``head_count[i] = 0`` skips its attention (and llama.cpp loads no attention tensors for it), which is exactly a
  removed attention. A layer with ``feed_forward_length[i] = 0`` is *skipped whole*: deci.cpp ``continue``s before
  adding the layer's attention output to the residual stream, so an attention kept above a removed FFN would be
  lost. Such blocks are written with a zero FFN instead: width :data:`ZERO_FFN_WIDTH`, all-zero gate, up and down
  projections, so the FFN adds exactly 0 and the attention survives; it costs ``3 * 32 * hidden`` stored values.

llama.cpp reads the head size from layer 0's head count (``n_embd / n_head(0)``), so the first block must keep its
attention (checked in :func:`finercut.export.source.check_llama_family`). Q and K are stored permuted for
llama.cpp's rotary layout, as its ``convert_hf_to_gguf.py`` does (``LlamaModel.permute``).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finercut.export.source import ExportError, PrunedSource, check_llama_family, check_plain_weights

ZERO_FFN_WIDTH = 32
"""FFN width of the zero FFN written above a kept attention whose FFN was removed: one quantization block."""
OUTTYPES = ("f32", "f16")


def permute_for_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's q/k projection rows (``[n_head * head_dim, ...]``, rotate-half pairs) in llama.cpp's order (adjacent
    pairs): llama.cpp's ``LlamaModel.permute``. Works on weights ``[out, in]`` and biases ``[out]``."""
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_from_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_for_rope`."""
    shape = weight.shape
    return weight.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_architecture(source: PrunedSource) -> str:
    """``llama`` when every remaining block is whole (and the model has no attention biases), else ``deci``."""
    whole = all(b.attention and b.ffn for b in source.blocks)
    return "llama" if whole and source.base_model_type in ("llama", "mistral") and not _has_qkv_bias(source) else "deci"


def _has_qkv_bias(source: PrunedSource) -> bool:
    return any(name.endswith("q_proj.bias") for name in source.model.state_dict())


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> torch.Tensor:
    """``rope_freqs``: llama.cpp's per-frequency divisors for Llama 3 rope scaling (as its converter computes them)."""
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _rope(config: Any) -> dict[str, Any]:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def gguf_tensors(source: PrunedSource, arch: str) -> tuple[dict[str, torch.Tensor], list[int], list[int], list[int]]:
    """GGUF tensors (llama.cpp names, HF ``[out, in]`` shapes) and the per-layer FFN widths, head and KV-head counts."""
    config = source.model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    state = source.model.state_dict()
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"]}
    if not getattr(config, "tie_word_embeddings", False):
        tensors["output.weight"] = state["lm_head.weight"]
    ffn_widths, head_counts, kv_counts = [], [], []
    for block in source.blocks:
        hf, blk = f"model.layers.{block.index}.", f"blk.{block.index}."
        if block.attention:
            tensors[blk + "attn_norm.weight"] = state[hf + "input_layernorm.weight"]
            for part in ("weight", "bias"):
                for proj, name, n_head in (("q_proj", "attn_q", heads), ("k_proj", "attn_k", kv_heads),
                                           ("v_proj", "attn_v", None), ("o_proj", "attn_output", None)):
                    key = hf + f"self_attn.{proj}.{part}"
                    if key in state:
                        tensors[blk + f"{name}.{part}"] = (permute_for_rope(state[key], n_head) if n_head
                                                           else state[key])
        head_counts.append(heads if block.attention else 0)
        kv_counts.append(kv_heads if block.attention else 0)
        if block.ffn:
            tensors[blk + "ffn_norm.weight"] = state[hf + "post_attention_layernorm.weight"]
            for proj, name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                for part in ("weight", "bias"):
                    if hf + f"mlp.{proj}.{part}" in state:
                        tensors[blk + f"{name}.{part}"] = state[hf + f"mlp.{proj}.{part}"]
            ffn_widths.append(config.intermediate_size)
        else:  # see the module docstring: a zero FFN keeps llama.cpp from skipping the layer's attention
            hidden, dtype = config.hidden_size, state["model.norm.weight"].dtype
            tensors[blk + "ffn_norm.weight"] = torch.ones(hidden, dtype=dtype)
            tensors[blk + "ffn_gate.weight"] = torch.zeros(ZERO_FFN_WIDTH, hidden, dtype=dtype)
            tensors[blk + "ffn_up.weight"] = torch.zeros(ZERO_FFN_WIDTH, hidden, dtype=dtype)
            tensors[blk + "ffn_down.weight"] = torch.zeros(hidden, ZERO_FFN_WIDTH, dtype=dtype)
            ffn_widths.append(ZERO_FFN_WIDTH)
    rope = _rope(config)
    if rope["rope_type"] == "llama3":
        tensors["rope_freqs.weight"] = llama3_rope_factors(rope, config.hidden_size // heads)
    if arch == "llama" and len(set(ffn_widths)) > 1:
        raise AssertionError("whole blocks have one FFN width")
    return tensors, ffn_widths, head_counts, kv_counts


def check_gguf_settings(config: Any, outtype: str) -> None:
    """Refuse a tensor type or a rope scaling this writer does not produce."""
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r}: choose from {', '.join(OUTTYPES)} (quantize further with "
                          "llama.cpp's llama-quantize)")
    rope_type = _rope(config)["rope_type"]
    if rope_type not in ("default", "llama3", "linear"):
        raise ExportError(f"--format gguf: rope type {rope_type!r} is not written by this exporter "
                          "(default, linear and llama3 are)")


def write_gguf(source: PrunedSource, output: str | Path, *, outtype: str = "f32",
               overwrite: bool = False) -> tuple[Path, list[str]]:
    """Write ``source`` as one GGUF file (``output``; a folder gets ``model.gguf`` inside it).

    Returns:
        The file written and notes on the layout chosen.
    """
    import gguf

    check_llama_family(source.model.config, source.blocks, "gguf")
    check_gguf_settings(source.model.config, outtype)
    check_plain_weights(source, "gguf")
    rope = _rope(source.model.config)
    output = Path(output).expanduser()
    path = output / "model.gguf" if output.is_dir() or output.suffix != ".gguf" else output
    if path.exists() and not overwrite:
        raise ExportError(f"{path} exists; pass --overwrite to replace it")
    arch = gguf_architecture(source)
    tensors, ffn_widths, head_counts, kv_counts = gguf_tensors(source, arch)
    config = source.model.config
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    notes = [f"GGUF architecture {arch!r}" + ("" if arch == "llama" else
             " (per-layer head counts and FFN widths; llama.cpp runs it, transformers' GGUF reader does not)")]
    try:
        writer = gguf.GGUFWriter(str(staging), arch=arch)
        name = Path(str(source.source_model.get("id") or source.base_model_type)).name.removesuffix(".gguf")
        writer.add_name(f"{name} pruned by finercut")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(len(source.blocks))
        uniform = arch == "llama"
        writer.add_feed_forward_length(ffn_widths[0] if uniform else ffn_widths)
        writer.add_head_count(head_counts[0] if uniform else head_counts)
        writer.add_head_count_kv(kv_counts[0] if uniform else kv_counts)
        head_dim = config.hidden_size // config.num_attention_heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        if rope["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_string("finercut.removed", json.dumps(source.layout["removed"]))
        if source.recovery_summary() is not None:  # e.g. a fold: the weights already hold it
            writer.add_string("finercut.recovery", json.dumps(source.recovery_summary()))
        notes.append(_add_tokenizer(writer, source))
        for name, tensor in tensors.items():
            writer.add_tensor(name, _array(tensor, outtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, path)
    finally:
        if staging.exists():
            staging.unlink()
    zero_ffn = [b.index for b in source.blocks if b.attention and not b.ffn]
    if zero_ffn and arch == "deci":
        notes.append(f"blocks {zero_ffn} kept their attention but lost their FFN: written with a zero FFN of width "
                     f"{ZERO_FFN_WIDTH} (llama.cpp skips a whole layer whose FFN width is 0)")
    return path, notes


def _array(tensor: torch.Tensor, outtype: str) -> np.ndarray:
    """Norms, biases and rope factors stay float32 (llama.cpp's convention for 1-D tensors)."""
    dtype = torch.float16 if outtype == "f16" and tensor.ndim == 2 else torch.float32
    return tensor.detach().to(dtype).contiguous().numpy()


def _add_tokenizer(writer: Any, source: PrunedSource) -> str:
    """Embed the tokenizer: copied from the run's source GGUF if there is one, else built from a BPE tokenizer."""
    gguf_path = source.source_gguf()
    if gguf_path is not None:
        copied = copy_tokenizer_fields(writer, gguf_path)
        return f"tokenizer: {copied} fields copied from the source GGUF {gguf_path.name}"
    if source.tokenizer is not None and _add_bpe_tokenizer(writer, source.tokenizer, source.model.config.vocab_size):
        return "tokenizer: written from the folder's BPE tokenizer (gpt2 model, 'default' pre-tokenizer)"
    return ("tokenizer: none embedded (no source GGUF and no BPE tokenizer); llama.cpp needs one to run the file, "
            "transformers' reader does not")


def copy_tokenizer_fields(writer: Any, gguf_path: Path) -> int:
    """Copy every ``tokenizer.*`` key of another GGUF file, with its value types. Returns how many were copied."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    count = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        main = field.types[0]
        sub = field.types[1] if main == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), main, sub_type=sub)
        count += 1
    return count


def _add_bpe_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> bool:
    """Write a byte-level BPE tokenizer as llama.cpp's ``gpt2`` model, padded to the embedding's rows (as its
    converter pads, with unused ``[PAD{i}]`` tokens). Returns False for other tokenizer types."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        return False
    vocab = tokenizer.get_vocab()
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens: list[str | None] = [None] * size
    for token, index in vocab.items():
        tokens[index] = token
    special = set(tokenizer.all_special_ids)
    # llama.cpp token types: 1 normal, 3 control (special tokens), 5 unused (padding)
    types = [5 if token is None else 3 if i in special else 1 for i, token in enumerate(tokens)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"[PAD{i}]" if token is None else token for i, token in enumerate(tokens)])
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for attribute, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                           ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, attribute, None) is not None:
            add(getattr(tokenizer, attribute))
    return True
