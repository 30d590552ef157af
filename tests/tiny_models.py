"""Tiny random models of every supported architecture, built from configs, each with what makes it different."""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 96
HIDDEN = 32
LAYERS = 4
SEQ = 12  # longer than the sliding windows below

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
    max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False, pad_token_id=0,
    bos_token_id=1, eos_token_id=2,
)
_SLIDING = ["sliding_attention", "full_attention"] * (LAYERS // 2)


def tiny_configs() -> dict:
    """Architecture name -> config of a tiny random model."""
    return {
        "llama": LlamaConfig(**_COMMON, num_key_value_heads=2),
        "mistral": MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=5),
        # MoE: top-2 of 4 experts; the whole sparse block is one FFN candidate.
        "mixtral": MixtralConfig(**_COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        "qwen2": Qwen2Config(**_COMMON, num_key_value_heads=2),
        "qwen3": Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=8),
        "gemma": GemmaConfig(**_COMMON, num_key_value_heads=1, head_dim=8),
        # Sandwich norms, attention and final-logit soft-capping, a sliding window shorter than the sequence.
        "gemma2": Gemma2Config(
            **_COMMON, num_key_value_heads=2, head_dim=8, sliding_window=4, layer_types=_SLIDING,
            final_logit_softcapping=5.0, attn_logit_softcapping=20.0, query_pre_attn_scalar=8,
        ),
        "gemma3": Gemma3TextConfig(
            **_COMMON, num_key_value_heads=2, head_dim=8, sliding_window=4, layer_types=_SLIDING,
            final_logit_softcapping=5.0, query_pre_attn_scalar=8,
        ),
        # Fused qkv and gate_up projections.
        "phi3": Phi3Config(**_COMMON, num_key_value_heads=2),
        # Conv1D projections and learned absolute positions.
        "gpt2": GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64, initializer_range=0.2,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        # Parallel residual: h + Attn(LN1 h) + FFN(LN2 h).
        "gpt_neox": GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
            num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2, use_parallel_residual=True,
            rotary_pct=0.5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
    }


ARCHITECTURES = tuple(tiny_configs())


def tiny_model(name: str, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of architecture ``name`` in eval mode, with norm weights perturbed off their init."""
    config = tiny_configs()[name]
    if name.startswith("gemma"):
        config._attn_implementation = "eager"
    if name == "mixtral":
        config._experts_implementation = "eager"  # the grouped-mm kernel has no float64
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name or "ln_" in param_name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


@lru_cache(maxsize=None)
def cached_tiny_model(name: str) -> torch.nn.Module:
    """The float32 tiny model of ``name``, built once per session; mask it or prune a copy, never modify it."""
    return tiny_model(name)


def tiny_input_ids(*, samples: int = 3, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (samples, seq), generator=generator)


def cache_of(outputs) -> object:
    """The KV cache of a forward or ``generate`` output, whichever name the installed transformers gives it."""
    for name in ("cache", "past_key_values"):
        if name in outputs:
            return outputs[name]
    raise AssertionError(f"no KV cache in the output (fields: {list(outputs.keys())})")
