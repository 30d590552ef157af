"""Calibration samples: seeded random windows, BOS handling, every source recorded as used, clear errors."""

import json

import pytest
import torch
from conftest import word_tokenizer

from finercut.calibration import (
    CalibrationError,
    DataError,
    calibration_samples,
    load_text,
    random_windows,
    resolve_data_dir,
    resolve_source,
    tokenizer_adds_bos,
)

STREAM = torch.arange(100, 200)


def test_windows_are_seeded_contiguous_slices_of_the_stream():
    samples = random_windows(STREAM, num_samples=4, seq_len=8, seed=0, bos_id=None)
    assert samples.shape == (4, 8)
    for row in samples:
        assert torch.equal(row, torch.arange(row[0], row[0] + 8))  # a contiguous window of the stream
    assert torch.equal(samples, random_windows(STREAM, num_samples=4, seq_len=8, seed=0, bos_id=None))
    assert not torch.equal(samples, random_windows(STREAM, num_samples=4, seq_len=8, seed=1, bos_id=None))


def test_bos_is_prepended_and_counts_toward_the_length():
    samples = random_windows(STREAM, num_samples=3, seq_len=8, seed=0, bos_id=1)
    assert samples.shape == (3, 8) and (samples[:, 0] == 1).all()
    assert torch.equal(samples[:, 2:], samples[:, 1:-1] + 1)


def test_too_short_a_stream_is_refused_with_the_numbers():
    with pytest.raises(CalibrationError, match="has 100 tokens, fewer than samples x length = 20 x 8"):
        random_windows(STREAM, num_samples=20, seq_len=8, seed=0, bos_id=None)


def test_local_wikitext_is_the_validation_split_and_recorded(data_dir):
    source = resolve_source("wikitext2", data_dir)
    assert source.kind == "data_dir" and source.path.endswith("wikitext2/valid.tokens.txt")
    assert "validation" in source.description


def test_data_dir_comes_from_the_environment_when_not_given(monkeypatch, tmp_path):
    monkeypatch.setenv("FINERCUT_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path.resolve()
    monkeypatch.delenv("FINERCUT_DATA_DIR")
    assert resolve_data_dir(None) is None
    with pytest.raises(CalibrationError, match="is not a folder"):
        resolve_data_dir(tmp_path / "missing")


def test_without_a_data_dir_the_hub_is_used_and_its_failure_says_how_to_run_offline(monkeypatch):
    monkeypatch.delenv("FINERCUT_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    source = resolve_source("wikitext2", None)
    assert source.kind == "hub"
    with pytest.raises(DataError, match=r"pass --data-dir \(data_dir=\) or set FINERCUT_DATA_DIR"):
        load_text(source)


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    assert load_text(resolve_source(str(tmp_path / "a.txt"), None)) == "first line\n\nsecond line"
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps("two") + "\n")
    assert load_text(resolve_source(str(tmp_path / "b.jsonl"), None)) == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CalibrationError, match=r"c.jsonl:1: .*'text' field"):
        load_text(resolve_source(str(tmp_path / "c.jsonl"), None))


def test_missing_empty_and_unknown_sources(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        resolve_source(str(tmp_path / "none.txt"), None)
    with pytest.raises(CalibrationError, match="use 'wikitext2' or a .txt / .jsonl file"):
        resolve_source("c4", None)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(CalibrationError, match="is empty"):
        load_text(resolve_source(str(tmp_path / "empty.txt"), None))


def test_calibration_samples_record_what_was_used(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 80}" for i in range(300)))
    tokenizer = word_tokenizer()
    samples, info = calibration_samples(tokenizer, resolve_source(str(text), None), num_samples=4, seq_len=10,
                                        seed=7)
    assert samples.shape == (4, 10)
    assert info["source"] == "file" and info["path"] == str(text.resolve()) and info["seed"] == 7
    assert info["text_tokens"] == 300 and info["bos_prepended"] is False
    again, info_again = calibration_samples(tokenizer, resolve_source(str(text), None), num_samples=4,
                                            seq_len=10, seed=7)
    assert torch.equal(samples, again) and info["token_ids_sha256"] == info_again["token_ids_sha256"]


def test_bos_detection():
    from tokenizers import processors

    assert tokenizer_adds_bos(word_tokenizer()) is False
    llama_like = word_tokenizer()
    llama_like.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    assert tokenizer_adds_bos(llama_like) is True
