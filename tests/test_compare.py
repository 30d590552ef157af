"""`finercut compare` end to end on a tiny model with tiny limits: runs, cached results, report, figures."""

import dataclasses
import json

import pytest

from finercut.compare import CompareConfig, run_compare


@pytest.fixture
def config(tiny_model_dir, word_text, data_dir) -> CompareConfig:
    return CompareConfig(
        model=str(tiny_model_dir), methods=("finercut", "finercut_block", "shortgpt", "deeper_layers"),
        ratios=(0.0, 0.25, 0.5), data_dir=str(data_dir), calibration=str(word_text), num_samples=3, seq_len=12,
        threads=1, tasks=("arc_easy", "winogrande"), limit=2, mmlu_limit_per_subject=None, ppl_window=32,
        ppl_max_windows=2, lm_eval_wikitext_docs=1, eval_batch_size=2, stats_context=16, prompts=("w1 w2 w3",),
    )


def test_compare_writes_table_figures_and_reuses_results(tmp_path, config):
    report = run_compare(config, tmp_path / "compare", report=tmp_path / "docs" / "results.md", log=lambda m: None,
                         progress=False)
    text = report.read_text()
    # dense + 4 methods x 2 ratios; block methods remove round(r*L) blocks: 1 and 2 of 4
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    rows = lines[header + 2 : lines.index("", header)]
    assert len(rows) == 1 + 4 * 2
    assert "| Dense | 0% | 0.0% |" in text and "| ShortGPT | 25% | 25.0% |" in text
    assert "| DeeperLayers | 50% | 50.0% |" in text and "| FinerCut | 25% | 25.0% |" in text
    assert "±" in text and "ARC-e" in text and "WinoGrande" in text
    for figure in ("compare_accuracy.png", "compare_perplexity.png", "layer_map_finercut_r0.25.png"):
        assert (tmp_path / "docs" / "figures" / figure).stat().st_size > 0
    assert "## Model statistics" in text and "## Text samples" in text

    results = sorted((tmp_path / "compare" / "results").glob("*.json"))
    before = {path.name: path.stat().st_mtime_ns for path in results}
    run_compare(config, tmp_path / "compare", report=tmp_path / "docs" / "results.md", log=lambda m: None,
                progress=False)
    assert {path.name: path.stat().st_mtime_ns for path in results} == before, "results on disk must be reused"
    stages = json.loads(next(p for p in results if not p.name.startswith("stats")).read_text())["stages"]
    assert set(stages) == {"windowed_perplexity", "lm_eval_wikitext", "tasks"}

    # A smaller largest ratio reuses the longer runs as prefixes (and their evaluations) instead of refusing.
    runs = sorted(path.name for path in (tmp_path / "compare" / "runs").iterdir())
    smaller = dataclasses.replace(config, ratios=(0.0, 0.25))
    text = run_compare(smaller, tmp_path / "compare", report=tmp_path / "small.md", log=lambda m: None,
                       progress=False).read_text()
    assert "| FinerCut | 25% | 25.0% |" in text and "50%" not in text.split("## Figures")[0]
    assert sorted(path.name for path in (tmp_path / "compare" / "runs").iterdir()) == runs
