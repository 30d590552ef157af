"""Calibration samples: seeded random windows, BOS handling, every source recorded as used, clear errors."""

import json

import pytest
import torch
from conftest import word_tokenizer

from finercut.calibration import (
    TASK_FILES,
    CalibrationError,
    DataError,
    calibration_samples,
    first_calibration_item,
    load_text,
    random_windows,
    resolve_data_dir,
    resolve_source,
    task_calibration_rows,
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


def one_line_refusal(calibration: str, data_dir=None) -> str:
    """The message of resolving ``calibration``, which must fail with one line."""
    with pytest.raises(CalibrationError) as caught:
        resolve_source(calibration, data_dir)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_missing_empty_binary_and_unknown_sources_are_refused_when_resolved(tmp_path):
    assert "does not exist" in one_line_refusal(str(tmp_path / "none.txt"))
    assert "use 'wikitext2', 'self', 'tasks'" in one_line_refusal("c4")
    (tmp_path / "empty.txt").write_text("  \n")
    assert "is empty" in one_line_refusal(str(tmp_path / "empty.txt"))
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": " "}) + "\n")
    assert "is empty" in one_line_refusal(str(tmp_path / "blank.jsonl"))
    (tmp_path / "nul.txt").write_bytes(b"some text\0\x01\x02")
    assert "is binary (a NUL byte at offset 9)" in one_line_refusal(str(tmp_path / "nul.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    assert "is not UTF-8 text (invalid byte at offset 3)" in one_line_refusal(str(tmp_path / "latin1.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "one"}\n{"text": \n')
    assert "bad.jsonl:2 is not valid JSON" in one_line_refusal(str(tmp_path / "bad.jsonl"))


def test_named_sources_are_recorded_as_named_and_files_as_absolute_paths(tmp_path, monkeypatch):
    from finercut.calibration import canonical_calibration

    monkeypatch.chdir(tmp_path)
    for named in ("wikitext2", "self", "tasks", "tasks:boolq,piqa"):
        assert canonical_calibration(named) == named
    assert canonical_calibration("text.txt") == str(tmp_path.resolve() / "text.txt")


def test_self_generated_source_needs_the_model():
    source = resolve_source("self", None)
    assert source.kind == "self" and source.path is None
    with pytest.raises(CalibrationError, match="the samples come from the model"):
        calibration_samples(word_tokenizer(), source, num_samples=1, seq_len=4, seed=0)


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


# ---------------------------------------------------------------------------------------------------------------------
# Calibration from the data folder's task files


def write_task_files(root, *, boolq: int = 6, winogrande: int = 5):
    """A data folder whose task items name their own index, so a text shows which items it came from."""
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    (tasks / "boolq.jsonl").write_text("".join(
        json.dumps({"query": f"Passage: boolq{i} text\nQuestion: q{i}?", "choices": ["no", "yes"], "gold": i % 2})
        + "\n" for i in range(boolq)))
    (tasks / "winogrande.jsonl").write_text("".join(
        json.dumps({"context_options": [f"wino{i} A", f"wino{i} B"], "continuation": f"went {i}.", "gold": i % 2})
        + "\n" for i in range(winogrande)))
    return root


def test_tasks_text_is_the_second_half_of_each_task_file(tmp_path):
    root = write_task_files(tmp_path)
    source = resolve_source("tasks:boolq,winogrande", root)
    assert source.kind == "tasks" and source.tasks == ("boolq", "winogrande")
    assert load_text(source) == "\n\n".join(
        [f"Passage: boolq{i} text\nQuestion: q{i}?" for i in (3, 4, 5)]
        + ["wino3 B went 3.", "wino4 A went 4."])  # winogrande: the right option's sentence
    assert first_calibration_item(6) == 3 and first_calibration_item(5) == 3 and first_calibration_item(1) == 1


def test_tasks_calibration_records_its_items_and_which_evaluations_would_read_them(tmp_path):
    from finercut.calibration import tasks_read_by_evaluation

    root = write_task_files(tmp_path, boolq=40, winogrande=30)
    tokenizer = word_tokenizer()
    _, info = calibration_samples(tokenizer, resolve_source("tasks:boolq,winogrande", root), num_samples=2,
                                  seq_len=8, seed=0)
    assert info["source"] == "tasks" and info["task_items"] == {"boolq": [20, 40], "winogrande": [15, 30]}
    assert tasks_read_by_evaluation(info, 15) == []
    assert tasks_read_by_evaluation(info, 16) == ["winogrande"]
    assert tasks_read_by_evaluation(info, None) == ["boolq", "winogrande"]
    assert tasks_read_by_evaluation({"source": "file"}, None) == []


def test_bad_task_sources_are_refused_when_resolved(tmp_path, monkeypatch):
    monkeypatch.delenv("FINERCUT_DATA_DIR", raising=False)
    assert "pass --data-dir" in one_line_refusal("tasks")
    root = write_task_files(tmp_path)
    assert "give distinct task names from arc_easy" in one_line_refusal("tasks:boolq,mmlu", root)
    assert "give distinct task names" in one_line_refusal("tasks:boolq,boolq", root)
    assert "missing task file(s)" in one_line_refusal("tasks:piqa", root)
    (root / "tasks" / "boolq.jsonl").write_text('{"query": "a"}\n{"choices": []}\n')
    assert "boolq.jsonl:2 is not a task item (KeyError" in one_line_refusal("tasks:boolq", root)
    (root / "tasks" / "boolq.jsonl").write_text('{"query": "the first half"}\n')
    assert "hold no text" in one_line_refusal("tasks:boolq", root)
    (root / "tasks" / "boolq.jsonl").write_bytes(b"\0\0")
    assert "is binary" in one_line_refusal("tasks:boolq", root)


def test_task_files_are_those_of_the_evaluation():
    pytest.importorskip("lm_eval")
    from finercut.calibration import TASK_FILES
    from finercut.evaluation.tasks.commonsense import LOCAL_FIELD_MAPPINGS

    assert TASK_FILES == {name: mapping.file for name, mapping in LOCAL_FIELD_MAPPINGS.items()}


def test_tasks_of_the_shared_data_folder(data_dir):
    source = resolve_source("tasks", data_dir)
    assert source.tasks == ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")
    items = {name: task_calibration_rows(data_dir / "tasks" / file)[0] for name, file in TASK_FILES.items()}
    assert items["openbookqa"] == range(250, 500) and items["arc_challenge"] == range(586, 1172)
    assert items["winogrande"] == range(634, 1267) and items["hellaswag"] == range(5021, 10042)


def test_too_short_a_source_fails_in_one_line_naming_it(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("w1 w2 w3 w4 w5\n")
    with pytest.raises(CalibrationError) as caught:
        calibration_samples(word_tokenizer(), resolve_source(str(text), None), num_samples=2, seq_len=4, seed=0)
    assert str(caught.value) == (f"local file {text.resolve()}: the calibration text has 5 tokens, fewer than samples "
                                 "x length = 2 x 4: use a longer text or fewer/shorter samples")


@pytest.mark.parametrize("content, message", [
    (b"w1 w2 w3\n", "fewer than samples x length = 2 x 12"),
    (b"w1 w2\0", "is binary"),
    (b"\n \n", "is empty"),
])
def test_a_run_refuses_a_bad_source_before_loading_the_model(tmp_path, tiny_model_dir, monkeypatch, content,
                                                               message):
    import finercut.run
    from finercut.record import RunConfig

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(finercut.run, "load_model", never)
    text = tmp_path / "calibration.txt"
    text.write_bytes(content)
    config = RunConfig(model=str(tiny_model_dir), calibration=str(text), num_samples=2, seq_len=12, count=1,
                       threads=1, save_model=False)
    with pytest.raises(CalibrationError, match=message) as caught:
        finercut.run.run_in_folder(config, tmp_path / "out", progress=False, log=lambda message: None)
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()
