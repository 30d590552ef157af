"""The CLI's evaluation and summary commands on a tiny model (the prune command is covered in test_run.py)."""

import json

import pytest

from finercut.cli import main


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, tiny_model_dir, word_text):
    output = tmp_path_factory.mktemp("cli") / "run"
    assert main(["prune", "--model", str(tiny_model_dir), "--calibration", str(word_text), "--samples", "3",
                 "--seq-len", "12", "--count", "2", "--no-progress", "--output", str(output)]) == 0
    return output


def test_show_summarizes_the_run(capsys, pruned_run):
    assert main(["show", str(pruned_run), "--steps"]) == 0
    out = capsys.readouterr().out
    assert "removed 2 units = 2 sub-layers" in out and "order: " in out and "step   2:" in out
    kv = json.loads((pruned_run / "record.json").read_text())["kv_cache"]
    kept = kv["attention_layers_after"]
    assert f"{kv['bytes_per_token_after']:,} bytes" in out and f"{kept} of {kv['attention_layers_before']}" in out
    assert "Shapley values" not in out


def test_eval_a_pruned_folder_and_a_run_applied_to_its_model(capsys, tmp_path, pruned_run, data_dir, monkeypatch):
    threads = []
    monkeypatch.setattr("torch.set_num_threads", threads.append)
    common = ["--data-dir", str(data_dir), "--tasks", "arc_easy", "--limit", "2", "--ppl-max-windows", "1",
              "--wikitext-docs", "0", "--ppl-window", "16", "--threads", "1"]
    assert main(["eval", str(pruned_run / "model"), *common, "--output", str(tmp_path / "a.json")]) == 0
    assert main(["eval", "--run", str(pruned_run), *common, "--output", str(tmp_path / "b.json")]) == 0
    folder, applied = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert folder["model"].startswith("pruned folder") and "with 2 units" in applied["model"]
    # The saved pruned model and the dense model with the same removals are the same model.
    assert folder["windowed_perplexity"]["ppl"] == pytest.approx(applied["windowed_perplexity"]["ppl"], rel=1e-6)
    assert folder["tasks"]["scores"]["arc_easy"]["num_samples"] == 2
    assert "±" in capsys.readouterr().out
    assert threads == [1, 1]  # each evaluation ran on the threads asked for


def test_eval_refuses_a_thread_count_below_one_before_loading(capsys):
    assert main(["eval", "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


def test_eval_refuses_an_output_in_a_missing_folder_before_loading(capsys, tmp_path):
    assert main(["eval", "--output", str(tmp_path / "no" / "such" / "file.json")]) == 2
    assert "its folder does not exist" in capsys.readouterr().err


def test_a_bug_is_not_reported_as_bad_input(capsys, monkeypatch, pruned_run):
    # A plain ValueError deep inside (here: a summary that breaks) is finercut's fault: exit 1 with the traceback.
    def broken_summary(record, output_dir=None):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr("finercut.cli.summarize_record", broken_summary)
    assert main(["show", str(pruned_run)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError: an internal inconsistency" in err
    assert "this is a bug in finercut, not a problem with your input" in err


def test_bad_input_is_one_line_and_exit_code_2(capsys, tmp_path):
    assert main(["show", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"finercut show: error: no record.json in {tmp_path / 'missing'}"


def test_a_machine_problem_is_one_line_not_a_bug(capsys, monkeypatch, pruned_run):
    def full_disk(record, output_dir=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("finercut.cli.summarize_record", full_disk)
    assert main(["show", str(pruned_run)]) == 2
    assert "No space left on device" in capsys.readouterr().err
