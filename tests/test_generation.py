"""Specification of generation with a physically pruned model and its own KV cache.

Greedy ``generate()`` on the pruned model, with the cache, must give the same tokens and the same per-step logits
(to 1e-5) as the dense model with the same sub-layers masked, run without a cache: for every architecture, with
block 0's attention removed, a whole block removed, all but one attention removed, and more; on a left-padded
batch of prompts of different lengths. Ten new tokens after a prompt of six run past the sliding windows of the
tiny Mistral (5) and Gemma 2/3 (4) models.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from finercut.adapters import adapter_for
from finercut.candidates import BLOCK, Unit
from finercut.checkpoint import apply_removal, save_pruned
from finercut.masking import masked
from finercut.pruned_modeling import ATTENTION, FFN
from tiny_models import ARCHITECTURES, cache_of, cached_tiny_model, tiny_input_ids

NEW_TOKENS = 10
PROMPT_LENGTHS = (6, 4, 2)
LOGIT_TOLERANCE = 1e-5

REMOVALS = {
    "block 0 attention": [Unit(0, ATTENTION)],
    "whole block": [Unit(1, BLOCK)],
    "all but one attention": [Unit(0, ATTENTION), Unit(1, ATTENTION), Unit(3, ATTENTION)],
    "mixed": [Unit(3, ATTENTION), Unit(0, BLOCK), Unit(2, FFN), Unit(1, ATTENTION)],
    "ffn only": [Unit(1, FFN), Unit(3, FFN)],
    "every attention": [Unit(b, ATTENTION) for b in range(4)],
}


pytestmark = pytest.mark.usefixtures("one_thread")


dense_model = cached_tiny_model  # built once per architecture; tests mask it or prune a copy


def left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """``[3, 6]`` input ids and attention mask: prompts of 6, 4 and 2 tokens, padded on the left with id 0."""
    ids = tiny_input_ids(samples=len(PROMPT_LENGTHS), seq=max(PROMPT_LENGTHS))
    mask = torch.zeros_like(ids)
    for row, length in enumerate(PROMPT_LENGTHS):
        mask[row, ids.shape[1] - length:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, **options):
    return model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        pad_token_id=0, output_logits=True, return_dict_in_generate=True, **options,
    )


def masked_uncached(arch: str, units, ids, mask):
    dense = dense_model(arch)
    with masked(dense, adapter_for(dense), units):
        return greedy(dense, ids, mask, use_cache=False)


def assert_same_generation(actual, expected) -> None:
    assert torch.equal(actual.sequences, expected.sequences)
    assert len(actual.logits) == len(expected.logits) == NEW_TOKENS
    for step, (a, e) in enumerate(zip(actual.logits, expected.logits)):
        torch.testing.assert_close(a, e, atol=LOGIT_TOLERANCE, rtol=0, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("removal", REMOVALS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_generation_equals_masked_generation_without_cache(arch, removal):
    units = REMOVALS[removal]
    ids, mask = left_padded_prompts()
    expected = masked_uncached(arch, units, ids, mask)

    pruned = apply_removal(copy.deepcopy(dense_model(arch)), units)
    actual = greedy(pruned, ids, mask)

    assert_same_generation(actual, expected)
    attention_layers = sum(not any(u.block == b and u.kind in (ATTENTION, BLOCK) for u in units) for b in range(4))
    if attention_layers:  # the cache really was used, one layer per remaining attention
        assert len(cache_of(actual).layers) == attention_layers


@pytest.mark.parametrize("removal", ["block 0 attention", "all but one attention"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_generation_of_a_single_prompt(arch, removal):
    units = REMOVALS[removal]
    ids, mask = tiny_input_ids(samples=1, seq=6), torch.ones(1, 6, dtype=torch.long)
    expected = masked_uncached(arch, units, ids, mask)
    actual = greedy(apply_removal(copy.deepcopy(dense_model(arch)), units), ids, mask)
    assert_same_generation(actual, expected)


@pytest.mark.parametrize("arch", ["gemma2", "gpt2"])
def test_a_reloaded_model_generates_like_the_in_memory_one(arch, tmp_path):
    units = REMOVALS["mixed"]
    ids, mask = left_padded_prompts()
    pruned = apply_removal(copy.deepcopy(dense_model(arch)), units)
    save_pruned(pruned, tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", trust_remote_code=True, attn_implementation=pruned.config._attn_implementation
    ).eval()
    assert_same_generation(greedy(reloaded, ids, mask), greedy(pruned, ids, mask))


def test_a_forward_pass_with_use_cache_builds_the_pruned_cache():
    pruned = apply_removal(copy.deepcopy(dense_model("gemma3")), REMOVALS["block 0 attention"])
    outputs = pruned(tiny_input_ids(), use_cache=True)
    assert cache_of(outputs).is_sliding == [False, True, False]  # dense blocks 1, 2, 3


def test_a_static_cache_is_refused_with_a_clear_message():
    pruned = apply_removal(copy.deepcopy(dense_model("llama")), REMOVALS["block 0 attention"])
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="cache_implementation='static' is not supported"):
        greedy(pruned, ids, mask, cache_implementation="static")


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_a_reloaded_folder_builds_the_pruned_cache_and_generates_like_the_masked_model(arch, tmp_path):
    # The saved folder runs its own copy of the modeling code (modeling_finercut.py), on whichever release of
    # transformers is installed: its plain forward with use_cache=True must build the pruned cache too.
    units = REMOVALS["block 0 attention"]
    save_pruned(apply_removal(copy.deepcopy(dense_model(arch)), units), tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True).eval()
    assert type(reloaded).__module__.endswith("modeling_finercut")  # the folder's code, not finercut's

    cache = cache_of(reloaded(tiny_input_ids(), use_cache=True))
    assert len(cache.layers) == 3  # dense blocks 1, 2, 3, each of its own type, each written to
    assert cache.is_sliding == ([False, True, False] if arch == "gemma3" else [False] * 3)
    assert all(layer.keys is not None for layer in cache.layers)

    ids, mask = left_padded_prompts()
    assert_same_generation(greedy(reloaded, ids, mask), masked_uncached(arch, units, ids, mask))


def test_generation_and_a_cached_forward_raise_no_deprecation_warning():
    pruned = apply_removal(copy.deepcopy(dense_model("llama")), REMOVALS["mixed"])
    ids, mask = left_padded_prompts()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. transformers 5.24's FutureWarning for `past_key_values`
        greedy(pruned, ids, mask)
        pruned(tiny_input_ids(), use_cache=True)
