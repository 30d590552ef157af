"""The DeciLM / Nemotron-NAS layout (``DeciLMForCausalLM``) for pruned Llama-family models.

A DeciLM checkpoint is a Llama checkpoint whose config lists, per block, what the block holds
(``block_configs[i].attention`` / ``.ffn``), so blocks may lack their attention or their FFN. The schema here is
the one the loaders read (the source was read, not guessed):

* vLLM, ``vllm/model_executor/models/nemotron_nas.py`` (``DeciLMDecoderLayer``): ``attention.no_op``,
  ``attention.n_heads_in_group`` (KV heads = ``num_attention_heads // n_heads_in_group``), ``ffn.no_op``,
  ``ffn.ffn_mult`` (FFN width = ``_ffn_mult_to_intermediate_size(ffn_mult, hidden_size)``, else
  ``ffn.intermediate_size``); q/k/v biases from ``config.qkv_bias`` if present, else ``config.attention_bias``,
  which alone sets the o_proj bias. Weight names are Llama's (``model.layers.{i}.self_attn.q_proj.weight``, ...).
  It reads ``block_configs`` as objects, so the config class ships with the folder (``configuration_decilm.py``,
  written here: a config class only, no modeling code) and vLLM needs ``trust_remote_code`` for it.
* llama.cpp, ``convert_hf_to_gguf.py`` (``DeciModel``): reads ``block_configs[i]["attention"]["n_heads_in_group"]``,
  ``["attention"]["replace_with_linear"]`` and ``["ffn"]["ffn_mult"]`` from config.json as plain keys (all must
  be present); ``n_heads_in_group`` None with ``replace_with_linear`` false is an attention-free layer, ``ffn_mult``
  None an FFN-free one; the head size is ``hidden_size // num_attention_heads``.
* ``nvidia/Llama-3_1-Nemotron-51B-Instruct``, ``block_config.py``: ``AttentionConfig(no_op, replace_with_linear,
  n_heads_in_group, window_length, ...)`` and ``FFNConfig(no_op, replace_with_linear, ffn_mult)``, ``ffn_mult``
  rounded to 6 decimals; unknown keys are dropped with a warning.

Every loader computes the FFN width from ``ffn_mult`` as ``round_up(int(2 * ffn_mult * hidden / 3), 256)``, so
only widths that are multiples of 256 can be written; others are refused rather than padded or truncated.
:func:`load_decilm` is a loader written from this schema, used to check exported folders.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finercut.jsonio import read_json
from finercut.export.source import ExportError, KeptBlock, PrunedSource, check_llama_family, check_plain_weights

ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
CONFIG_CODE_FILE = "configuration_decilm.py"
FFN_MULTIPLE = 256
EXPORT_INFO_FILE = "finercut_export.json"

# Dense-config keys that the per-block configs replace, or that DeciLM does not have.
_REPLACED_KEYS = ("intermediate_size", "num_key_value_heads", "sliding_window", "use_sliding_window",
                  "max_window_layers", "layer_types", "finercut", "auto_map", "architectures", "model_type",
                  "_name_or_path")


# ---------------------------------------------------------------------------------------------------------------------
# The FFN width formula


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The FFN width every DeciLM loader builds from ``ffn_mult``: ``int(2 * ffn_mult * hidden / 3)`` rounded up
    to a multiple of 256 (``_ffn_mult_to_intermediate_size`` in vLLM and llama.cpp)."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % FFN_MULTIPLE == 0 else size + FFN_MULTIPLE - size % FFN_MULTIPLE


def ffn_mult_for(intermediate_size: int, hidden_size: int) -> float:
    """The ``ffn_mult`` (6 decimals, as the config class keeps it) that loaders turn back into ``intermediate_size``.

    Raises:
        ExportError: no ``ffn_mult`` gives that width (it is not a multiple of 256).
    """
    if intermediate_size % FFN_MULTIPLE:
        raise ExportError(
            f"--format decilm: the FFN width {intermediate_size} is not a multiple of {FFN_MULTIPLE}. DeciLM configs "
            f"give the width as ffn_mult and every loader computes round_up(int(2 * ffn_mult * {hidden_size} / 3), "
            f"{FFN_MULTIPLE}), so no ffn_mult reproduces {intermediate_size}; use --format gguf, which stores "
            "widths directly"
        )
    exact = 3 * intermediate_size / (2 * hidden_size)
    for mult in (round(exact, 6), math.floor(exact * 1e6) / 1e6):
        if ffn_mult_to_intermediate_size(mult, hidden_size) == intermediate_size:
            return mult
    raise ExportError(f"--format decilm: no 6-decimal ffn_mult gives FFN width {intermediate_size} for hidden size "
                      f"{hidden_size}")


# ---------------------------------------------------------------------------------------------------------------------
# Config


def block_config(block: KeptBlock, *, n_heads_in_group: int, ffn_mult: float) -> dict[str, Any]:
    """One ``block_configs`` entry, with every key the loaders read written out (llama.cpp's converter needs all)."""
    attention = {"no_op": not block.attention, "replace_with_linear": False,
                 "n_heads_in_group": n_heads_in_group if block.attention else None, "window_length": None}
    ffn = {"no_op": not block.ffn, "replace_with_linear": False, "ffn_mult": float(ffn_mult) if block.ffn else None}
    return {"attention": attention, "ffn": ffn}


def decilm_config(source: PrunedSource) -> dict[str, Any]:
    """The exported config.json: the dense model's settings, one block config per remaining block."""
    from finercut.checkpoint import dense_config

    check_llama_family(source.model.config, source.blocks, "decilm")
    dense = dense_config(source.model.config)
    heads, kv_heads = dense.num_attention_heads, dense.num_key_value_heads or dense.num_attention_heads
    if heads % kv_heads:
        raise ExportError(f"--format decilm: {heads} attention heads do not split into groups of {kv_heads} KV heads")
    mult = ffn_mult_for(dense.intermediate_size, dense.hidden_size)
    config = {key: value for key, value in dense.to_dict().items() if key not in _REPLACED_KEYS}
    config.update(
        architectures=[ARCHITECTURE], model_type=MODEL_TYPE,
        auto_map={"AutoConfig": f"{Path(CONFIG_CODE_FILE).stem}.DeciLMConfig"},
        num_hidden_layers=len(source.blocks), head_dim=dense.hidden_size // heads,
        block_configs=[block_config(b, n_heads_in_group=heads // kv_heads, ffn_mult=mult) for b in source.blocks],
    )
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:  # older readers look for it at the top level
        config["rope_theta"] = rope["rope_theta"]
    if "dtype" in config:  # and for the dtype under its older name
        config.setdefault("torch_dtype", config["dtype"])
    if source.base_model_type == "qwen2":  # q/k/v biases, none on o_proj: vLLM's qkv_bias rule
        config.update(attention_bias=False, qkv_bias=True)
    return config


CONFIG_CODE = '''"""DeciLM (Nemotron-NAS) config of a model exported by finercut: a config class, no modeling code.

vLLM reads ``config.block_configs[i].attention.no_op`` and friends as attributes, so the JSON block configs are
turned into small frozen dataclasses here. Fields follow nvidia/Llama-3_1-Nemotron-51B-Instruct's block_config.py.
"""

import dataclasses
from dataclasses import dataclass
from typing import Optional

from transformers import LlamaConfig


@dataclass(frozen=True)
class AttentionConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: Optional[int] = None
    window_length: Optional[int] = None


@dataclass(frozen=True)
class FFNConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    ffn_mult: Optional[float] = None


@dataclass(frozen=True)
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    @classmethod
    def from_dict(cls, data):
        return cls(attention=AttentionConfig(**data.get("attention", {})), ffn=FFNConfig(**data.get("ffn", {})))


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig.from_dict(b)
                              for b in (block_configs or [])]
        super().__init__(**kwargs)

    def to_dict(self):
        output = super().to_dict()
        output["block_configs"] = [dataclasses.asdict(b) for b in self.block_configs]
        return output
'''


# ---------------------------------------------------------------------------------------------------------------------
# Weights


def decilm_state_dict(source: PrunedSource) -> dict[str, torch.Tensor]:
    """The pruned model's weights under DeciLM names.

    A pruned Llama-family model already names its remaining blocks ``model.layers.0..n-1`` with Llama's sub-module
    names, which is DeciLM's naming; :func:`check_plain_weights` makes sure no weight of a removed sub-layer, and
    no unknown weight, is written.
    """
    state = {name: tensor.detach().contiguous() for name, tensor in source.model.state_dict().items()}
    if getattr(source.model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    check_plain_weights(source, "decilm")
    return state


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def write_decilm(source: PrunedSource, output: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``source`` as a DeciLM folder: config.json, configuration_decilm.py, model.safetensors, tokenizer.

    Written to a hidden folder next to ``output`` and renamed into place when complete.

    Returns:
        The folder written.
    """
    from safetensors.torch import save_file

    from finercut.checkpoint import check_save_target

    output = Path(output).expanduser().resolve()
    check_save_target(output, overwrite=overwrite)
    config = decilm_config(source)
    state = decilm_state_dict(source)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / CONFIG_CODE_FILE).write_text(CONFIG_CODE)
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(staging)
        generation = getattr(source.model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(staging)
        (staging / EXPORT_INFO_FILE).write_text(json.dumps(export_info(source, "decilm"), indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def export_info(source: PrunedSource, format_name: str) -> dict[str, Any]:
    """What was exported from what: the pruned folder, the dense model, and each block's remaining sub-layers."""
    info = {
        "format": format_name,
        "pruned_model": str(source.folder),
        "source_model": source.source_model,
        "removed": source.layout["removed"],
        "blocks": [{"block": b.index, "dense_block": b.dense_index, "attention": b.attention, "ffn": b.ffn}
                   for b in source.blocks],
    }
    if source.recovery_summary() is not None:
        info["recovery"] = source.recovery_summary()
    return info


# ---------------------------------------------------------------------------------------------------------------------
# A loader written from the schema, to check exports


class DeciLMBlock(nn.Module):
    """One DeciLM block as vLLM's ``DeciLMDecoderLayer`` builds it: ``h += Attn(norm h)`` unless ``attention.no_op``,
    then ``h += MLP(norm h)`` unless ``ffn.no_op``, with Llama's sub-modules."""

    def __init__(self, config: Any, entry: dict[str, Any], layer_idx: int) -> None:
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm

        super().__init__()
        attention, ffn = entry["attention"], entry["ffn"]
        if attention.get("replace_with_linear") or ffn.get("replace_with_linear"):
            raise ValueError(f"block {layer_idx}: replace_with_linear sub-layers are not part of what finercut writes")
        self.self_attn = self.mlp = None
        if not attention["no_op"]:
            block = copy.copy(config)
            block.num_key_value_heads = config.num_attention_heads // attention["n_heads_in_group"]
            qkv_bias = getattr(config, "qkv_bias", config.attention_bias)
            block.attention_bias = qkv_bias
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = LlamaAttention(block, layer_idx)
            if qkv_bias != config.attention_bias:
                out = self.self_attn.o_proj
                self.self_attn.o_proj = nn.Linear(out.in_features, out.out_features, bias=config.attention_bias)
        if not ffn["no_op"]:
            block = copy.copy(config)
            block.intermediate_size = (ffn_mult_to_intermediate_size(ffn["ffn_mult"], config.hidden_size)
                                       if ffn.get("ffn_mult") is not None else ffn["intermediate_size"])
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = LlamaMLP(block)

    def forward(self, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, hidden]`` -> same shape; ``mask`` is the additive causal mask ``[1, 1, seq, seq]``."""
        if self.self_attn is not None:
            attended, _ = self.self_attn(self.input_layernorm(hidden), position_embeddings=position_embeddings,
                                         attention_mask=mask)
            hidden = hidden + attended
        if self.mlp is not None:
            hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden


class DeciLMReference(nn.Module):
    """A DeciLM causal LM built from a config dict and weights, without cache: for checking exported models."""

    def __init__(self, config: dict[str, Any]) -> None:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

        super().__init__()
        values = {k: v for k, v in config.items() if k not in ("block_configs", "auto_map", "model_type",
                                                                "architectures", "qkv_bias")}
        llama = LlamaConfig(**values)
        llama._attn_implementation = "sdpa"  # eager attention rounds its softmax to float32
        if "qkv_bias" in config:
            llama.qkv_bias = config["qkv_bias"]
        self.config = llama
        self.embed_tokens = nn.Embedding(llama.vocab_size, llama.hidden_size)
        self.layers = nn.ModuleList(DeciLMBlock(llama, entry, i) for i, entry in enumerate(config["block_configs"]))
        self.norm = LlamaRMSNorm(llama.hidden_size, eps=llama.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(llama)
        self.lm_head = nn.Linear(llama.hidden_size, llama.vocab_size, bias=False)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load DeciLM-named weights (``model.`` prefix on all but ``lm_head``); every weight must fit."""
        state = dict(state)
        if "lm_head.weight" not in state and self.config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        renamed = {name.removeprefix("model."): tensor for name, tensor in state.items()}
        missing, unexpected = self.load_state_dict(renamed, strict=False)
        missing = [m for m in missing if not m.startswith("rotary_emb.")]
        if missing or unexpected:
            raise ValueError(f"DeciLM weights do not fit the block configs: missing {missing[:6]}, "
                             f"unexpected {unexpected[:6]}")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[batch, seq]`` token ids -> ``[batch, seq, vocab]`` logits."""
        hidden = self.embed_tokens(input_ids)
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(hidden, positions)
        mask = torch.full((seq, seq), torch.finfo(hidden.dtype).min, dtype=hidden.dtype).triu(1)[None, None]
        for layer in self.layers:
            hidden = layer(hidden, position_embeddings, mask)
        return self.lm_head(self.norm(hidden))


def load_decilm(folder: str | Path) -> DeciLMReference:
    """Load an exported DeciLM folder from config.json (plain JSON, no remote code) and safetensors, in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_json(folder / "config.json", expect=dict, what="DeciLM config")
    if config.get("architectures") != [ARCHITECTURE]:
        raise ValueError(f"{folder} is not a {ARCHITECTURE} folder")
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    model = DeciLMReference(config).to(next(iter(state.values())).dtype)  # the weights' dtype, before loading them
    # Rotary frequencies stay float32, as transformers keeps them in a model of any dtype.
    model.rotary_emb.inv_freq = model.rotary_emb.inv_freq.float()
    model.load_weights(state)
    return model.eval()
