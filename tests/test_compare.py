"""`finercut compare` end to end on a tiny model with tiny limits: runs, cached results, report, figures."""

import dataclasses
import json

import pytest
import torch

from finercut.study.compare import CompareConfig, run_compare
from finercut.errors import ConfigError


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


def test_compare_recoveries_and_equal_budget_rows(tmp_path, config):
    """FinerCut at 37.5% of 4 blocks removes round(3) = 3 sub-layers, the block methods round(1.5) = 2 blocks = 4:
    an equal-budget FinerCut row at 4, and each recovery evaluated on FinerCut's removal equals the physically
    recovered model built by finercut.recover from the same windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finercut import recover
    from finercut.candidates import Unit
    from finercut.evaluation import windowed_perplexity

    config = dataclasses.replace(config, methods=("finercut", "shortgpt"), ratios=(0.0, 0.375),
                                 recoveries=("bias", "linear-run", "fold"), equal_budget=True, recovery_samples=2,
                                 recovery_seq_len=10, tasks=("arc_easy",))
    output = tmp_path / "compare"
    text = run_compare(config, output, report=tmp_path / "results.md", log=lambda m: None,
                       progress=False).read_text()
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    rows = [line.split(" | ") for line in lines[header + 2 : lines.index("", header)]]
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("| Dense", "0%", "0"), ("| FinerCut", "38%", "3"), ("| FinerCut + bias", "38%", "3"),
        ("| FinerCut + linear-run", "38%", "3"), ("| FinerCut + fold", "38%", "3"), ("| FinerCut", "38%", "4"),
        ("| ShortGPT", "38%", "4")]
    record = json.loads((output / "runs" / "finercut" / "record.json").read_text())
    assert len(record["removed"]) == 4, "the FinerCut run is extended to the block methods' count"

    results = [json.loads(p.read_text()) for p in (output / "results").glob("*.json") if "stats" not in p.name]
    recovered = {r["recovery"]["recovery"]: r for r in results if "recovery" in r}
    assert set(recovered) == {"bias", "linear-run", "fold"}
    removed = [Unit.from_dict(u) for u in record["removed"][:3]]
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    for spec, options in (("bias", dict(method="bias")), ("linear-run", dict(method="linear", group="run")),
                          ("fold", dict(method="fold"))):
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).eval()
        dense_parameters = sum(p.numel() for p in model.parameters())
        model, fit = recover(model, removed, tokenizer=tokenizer, calibration=config.calibration,
                             data_dir=config.data_dir, num_samples=2, seq_len=10, seed=config.seed, **options)
        expected = windowed_perplexity(model, tokenizer, data_dir=config.data_dir, window_length=config.ppl_window,
                                       max_windows=config.ppl_max_windows)
        result = recovered[spec]
        assert result["stages"]["windowed_perplexity"]["ppl"] == pytest.approx(expected.ppl, rel=1e-5)
        assert result["fit"]["extra_parameters"] == fit.extra_parameters
        assert (fit.extra_parameters > 0) == (spec != "fold")
        net = result["parameters"]["removed"] - result["fit"]["extra_parameters"]
        assert dense_parameters - sum(p.numel() for p in model.parameters()) == net
    assert "| FinerCut + linear-run | 38% |" in text.split("Recovery without fine-tuning")[1]
    with pytest.raises(ConfigError, match="unknown recovery 'lowrank'"):
        dataclasses.replace(config, recoveries=("lowrank",))


def test_compare_attention_only_at_its_own_ratio(tmp_path, config):
    """``finercut_attention@0.5`` prunes half of the 4 attention sub-layers, whatever the shared ratios are."""
    from finercut.study.compare import prune_variants, split_method
    from finercut.pruned_modeling import ATTENTION

    config = dataclasses.replace(config, methods=("finercut_attention@0.5", "shortgpt"), ratios=(0.0, 0.25))
    variants = prune_variants(config, tmp_path, progress=False, log=lambda m: None)
    assert [(v.label, v.ratio, len(v.sublayers)) for v in variants] == [
        ("Dense", 0.0, 0), ("FinerCut (attention only)", 0.5, 2), ("ShortGPT", 0.25, 2)]
    assert {unit.kind for unit in variants[1].removed} == {ATTENTION}
    run = json.loads((tmp_path / "runs" / "finercut_attention" / "run.json").read_text())["config"]
    assert (run["only"], run["ratio"]) == ("attention", 0.5)
    assert split_method("finercut", (0.25,)) == ("finercut", (0.25,))
    with pytest.raises(ConfigError, match="name@r1/r2"):
        split_method("finercut@x", ())
    with pytest.raises(ConfigError, match=r"ratios must be in \[0, 1\)"):
        dataclasses.replace(config, methods=("finercut@1.5",))
