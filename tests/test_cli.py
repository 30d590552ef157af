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


def test_eval_a_pruned_folder_and_a_run_applied_to_its_model(capsys, tmp_path, pruned_run, data_dir):
    common = ["--data-dir", str(data_dir), "--tasks", "arc_easy", "--limit", "2", "--ppl-max-windows", "1",
              "--wikitext-docs", "0", "--ppl-window", "16"]
    assert main(["eval", str(pruned_run / "model"), *common, "--output", str(tmp_path / "a.json")]) == 0
    assert main(["eval", "--run", str(pruned_run), *common, "--output", str(tmp_path / "b.json")]) == 0
    folder, applied = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert folder["model"].startswith("pruned folder") and "with 2 units" in applied["model"]
    # The saved pruned model and the dense model with the same removals are the same model.
    assert folder["windowed_perplexity"]["ppl"] == pytest.approx(applied["windowed_perplexity"]["ppl"], rel=1e-6)
    assert folder["tasks"]["scores"]["arc_easy"]["num_samples"] == 2
    assert "±" in capsys.readouterr().out


def test_eval_refuses_an_output_in_a_missing_folder_before_loading(capsys, tmp_path):
    assert main(["eval", "--output", str(tmp_path / "no" / "such" / "file.json")]) == 2
    assert "its folder does not exist" in capsys.readouterr().err
