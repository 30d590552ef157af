"""Skipping a sub-layer through the adapters equals the residual computation written out by hand.

The expected values call the architectures' own modules directly (norms, attention, MLP/MoE), never adapter or
masking code, so a wrong module path or a wrong norm assignment in the registry fails here.
"""

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_input_ids, tiny_model
from transformers import OPTConfig

from finercut.adapters import UnsupportedArchitectureError, adapter_for, adapter_for_config
from finercut.candidates import Unit
from finercut.masking import masked
from finercut.pruned_modeling import RemovedAttention, RemovedFFN

BLOCK = 2
PRE_NORM = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "phi3"}


def capture_block_call(model, block):
    """The input hidden states, positional and keyword arguments the model's forward gives ``block``."""
    seen = {}

    def hook(module, args, kwargs):
        seen["hidden"], seen["args"], seen["kwargs"] = args[0], args[1:], kwargs

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(tiny_input_ids(), use_cache=False)
    handle.remove()
    return seen["hidden"], seen["args"], seen["kwargs"]


def hand_residual(name, block, h, args, kwargs, removed):
    """Block output with sub-layer ``removed`` left out, written per architecture from its modeling code."""
    if name in PRE_NORM:  # h' = h + Attn(norm1 h); out = h' + FFN(norm2 h')
        if removed == "attention":
            return h + block.mlp(block.post_attention_layernorm(h))
        return h + block.self_attn(hidden_states=block.input_layernorm(h), **kwargs)[0]
    if name in ("gemma2", "gemma3"):  # sandwich norms around each sub-layer
        if removed == "attention":
            return h + block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(h)))
        attention = block.self_attn(hidden_states=block.input_layernorm(h), **kwargs)[0]
        return h + block.post_attention_layernorm(attention)
    if name == "gpt2":  # Conv1D projections; positional (past_key_values, attention_mask, ...)
        if removed == "attention":
            return h + block.mlp(block.ln_2(h))
        return h + block.attn(block.ln_1(h), past_key_values=None, attention_mask=args[1])[0]
    if name == "gpt_neox":  # parallel residual: out = h + Attn(LN1 h) + FFN(LN2 h); the removed term drops out
        assert block.use_parallel_residual
        if removed == "attention":
            return h + block.mlp(block.post_attention_layernorm(h))
        return h + block.attention(block.input_layernorm(h), **kwargs)[0]
    raise AssertionError(f"no hand formula for {name}")


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("removed", ["attention", "ffn"])
def test_skipping_a_sublayer_equals_hand_written_residual(name, removed):
    model = tiny_model(name, dtype=torch.float64)
    adapter = adapter_for(model)
    block = adapter.blocks_of(model)[BLOCK]
    h, args, kwargs = capture_block_call(model, block)
    with torch.no_grad():
        expected = hand_residual(name, block, h, args, kwargs, removed)
        dense = block(h, *args, **kwargs)
        with masked(model, adapter, [Unit(BLOCK, removed)]):
            stub = getattr(block, adapter.attention if removed == "attention" else adapter.ffn)
            assert isinstance(stub, RemovedAttention if removed == "attention" else RemovedFFN)
            skipped = block(h, *args, **kwargs)
        restored = block(h, *args, **kwargs)
    torch.testing.assert_close(skipped, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(skipped, dense), "the removed sub-layer must have contributed something"
    torch.testing.assert_close(restored, dense, rtol=0, atol=0)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_removing_both_sublayers_passes_the_residual_stream_unchanged(name):
    model = tiny_model(name, dtype=torch.float64)
    adapter = adapter_for(model)
    block = adapter.blocks_of(model)[BLOCK]
    h, args, kwargs = capture_block_call(model, block)
    with torch.no_grad(), masked(model, adapter, [Unit(BLOCK, "block")]):
        assert torch.equal(block(h, *args, **kwargs), h)


def test_masking_leaves_no_parameters_in_removed_sublayers():
    model = tiny_model("gemma2")
    adapter = adapter_for(model)
    block = adapter.blocks_of(model)[1]
    dense_params = sum(p.numel() for p in block.parameters())
    with masked(model, adapter, [Unit(1, "attention")]):
        attention_params = dense_params - sum(p.numel() for p in block.parameters())
    expected = sum(p.numel() for m in (model.model.layers[1].self_attn, model.model.layers[1].input_layernorm,
                                       model.model.layers[1].post_attention_layernorm) for p in m.parameters())
    assert attention_params == expected


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match=r"unsupported architecture 'opt'.*gpt_neox.*llama"):
        adapter_for_config(OPTConfig())


def test_every_listed_architecture_has_an_adapter():
    expected = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2",
                "gpt_neox"}
    from finercut.adapters import supported_model_types

    assert expected <= set(supported_model_types())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_adapter_logits_equal_the_models_own_output(name):
    model = tiny_model(name, dtype=torch.float64)
    adapter = adapter_for(model)
    seen = {}
    handle = adapter.blocks_of(model)[-1].register_forward_hook(lambda m, a, out: seen.update(out=out))
    with torch.no_grad():
        expected = model(tiny_input_ids(), use_cache=False).logits
        handle.remove()
        torch.testing.assert_close(adapter.logits(model, seen["out"]), expected, rtol=1e-12, atol=1e-12)
