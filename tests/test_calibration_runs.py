"""Calibration without a corpus and a task objective, through runs: self-generated samples are cached in the run
folder and read back (never regenerated) by a resumed or extended run; a task objective scores the greedy search
and Shapley by the answer likelihood of examples no evaluation reads; their options are refused where they do not
apply."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from finercut import cli
from finercut.errors import ConfigError
from finercut.record import RunConfig, read_record


def args(model_dir, output, *extra: str) -> list[str]:
    return ["prune", "--model", str(model_dir), "--samples", "2", "--seq-len", "12", "--threads", "1",
            "--no-progress", "--no-save-model", "--output", str(output), *extra]


def test_self_generated_calibration_is_cached_in_the_run_and_read_back_when_extended(tmp_path, tiny_model_dir,
                                                                                    capsys, one_thread):
    run = tmp_path / "self"
    self_calibration = ("--calibration", "self", "--gen-prompt", "w1", "--gen-batch-size", "2")
    assert cli.main(args(tiny_model_dir, tmp_path / "bad", "--calibration", "self", "--count", "2")) == 2
    assert "tokenizes to special or unknown tokens" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert cli.main(args(tiny_model_dir, run, *self_calibration, "--count", "2")) == 0
    assert "generating 2 calibration samples of 12 tokens" in capsys.readouterr().err
    cached = run / "calibration_ids.safetensors"
    ids = load_file(cached)["input_ids"]
    assert tuple(ids.shape) == (2, 12)
    record = read_record(run)
    assert record.calibration["source"] == "self" and record.calibration["seed"] == 0
    assert record.calibration["token_ids_sha256"] == json.loads((run / "progress.json").read_text())[
        "calibration_sha256"]
    before = cached.stat().st_mtime_ns

    assert cli.main(args(tiny_model_dir, run, *self_calibration, "--count", "3")) == 0
    assert "generating" not in capsys.readouterr().err
    assert cached.stat().st_mtime_ns == before and len(read_record(run).steps) == 3

    # the same seed generates the same samples in another run; another seed others
    again, other = tmp_path / "again", tmp_path / "other"
    assert cli.main(args(tiny_model_dir, again, *self_calibration, "--count", "2")) == 0
    assert cli.main(args(tiny_model_dir, other, *self_calibration, "--count", "2",
                         "--seed", "1")) == 0
    assert load_file(again / "calibration_ids.safetensors")["input_ids"].equal(ids)
    assert not load_file(other / "calibration_ids.safetensors")["input_ids"].equal(ids)

    # a cache that was changed is refused, not silently searched on
    altered = load_file(cached)
    altered["input_ids"][0, 5] += 1
    from safetensors.torch import save_file

    save_file(altered, cached, metadata=json.loads(json.dumps({"format": "x"})))
    assert cli.main(args(tiny_model_dir, run, *self_calibration, "--count", "4")) == 2
    capsys.readouterr()


def test_generation_options_apply_to_self_generated_calibration_only():
    with pytest.raises(ConfigError, match="--gen-temperature apply to --calibration self"):
        RunConfig(ratio=0.25, gen_temperature=0.7)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        RunConfig(ratio=0.25, calibration="self", gen_temperature=0.0)
    assert RunConfig(ratio=0.25, calibration="self", gen_filter=0.2).gen_filter == 0.2


def test_a_task_objective_scores_the_greedy_search_and_shapley(tmp_path, tiny_model_dir, word_text, data_dir,
                                                              one_thread, capsys):
    base = ["--calibration", str(word_text), "--data-dir", str(data_dir), "--objective", "task:arc_easy",
            "--objective-examples", "3", "--count", "2"]
    run = tmp_path / "greedy"
    assert cli.main(args(tiny_model_dir, run, *base)) == 0
    record = read_record(run)
    assert record.metric == "task:arc_easy" and record.extras["scoring"]["objective"] == "task:arc_easy"
    objective = record.extras["objective"]
    assert objective["task"] == "arc_easy" and objective["num_examples"] == 3
    assert objective["indices"] == [objective["num_items"] - 3 + i for i in range(3)]  # the last items only
    assert all(step.distance is not None and step.distance > 0 for step in record.steps)  # answer NLLs
    said = capsys.readouterr()
    assert f"removed {record.steps[0].unit} (answer NLL {record.steps[0].distance:.6g}" in said.out + said.err

    shapley = tmp_path / "shapley"
    assert cli.main(args(tiny_model_dir, shapley, *base, "--method", "shapley", "--permutations", "2")) == 0
    assert read_record(shapley).extras["importance"]["empty_cost"] > 0  # the dense model's answer NLL, not 0


def test_a_task_objective_is_refused_where_it_does_not_apply(data_dir):
    # the message lists the methods that declare a task objective (the searches over sets among them)
    with pytest.raises(ConfigError, match=r"task objective works with method finercut, shapley, .*not blockpruner"):
        RunConfig(ratio=0.25, method="blockpruner", objective="task:arc_easy")
    with pytest.raises(ConfigError, match="unknown objective 'task:nope'"):
        RunConfig(ratio=0.25, objective="task:nope")
    with pytest.raises(ConfigError, match="need a task objective"):
        RunConfig(ratio=0.25, objective_examples=5)


@pytest.fixture
def no_wikitext(monkeypatch):
    """Neither a data folder nor the hub: the hub's loader fails as it does offline (and records its calls)."""
    from finercut import calibration, synthetic

    calls = []

    def unreachable(split):
        calls.append(split)
        raise calibration.DataError("could not load wikitext/wikitext-2-raw-v1 (train split) from the Hugging Face "
                                    "hub (ConnectionError: no network). Offline, pass --data-dir")

    monkeypatch.delenv(calibration.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(calibration, "hub_wikitext2_rows", unreachable)
    monkeypatch.setattr(synthetic, "DEFAULT_PROMPT", "w1")  # the tiny models' vocabulary has no "The"
    return calls


def test_the_default_source_is_wikitext2_where_there_is_one_else_self_generated(no_wikitext, data_dir, monkeypatch):
    from finercut import calibration

    assert calibration.choose_default_calibration(data_dir) == ("wikitext2", None)
    assert no_wikitext == []  # a data folder is enough: the hub is not asked
    source, why = calibration.choose_default_calibration(None)
    assert source == "self" and why.startswith("could not load wikitext") and "Offline" not in why
    monkeypatch.setattr(calibration, "hub_wikitext2_rows", lambda split: ("some text",))
    assert calibration.choose_default_calibration(None) == ("wikitext2", None)


def test_without_a_corpus_a_run_calibrates_on_generated_samples_and_says_so(tmp_path, tiny_model_dir, word_text,
                                                                            no_wikitext, capsys, one_thread,
                                                                            monkeypatch):
    from finercut import calibration

    # asked for by name, WikiText-2 that cannot be had is an error before anything is written
    assert cli.main(args(tiny_model_dir, tmp_path / "named", "--calibration", "wikitext2", "--count", "2")) == 2
    assert "Offline, pass --data-dir" in capsys.readouterr().err and not (tmp_path / "named").exists()

    run = tmp_path / "default"
    assert cli.main(args(tiny_model_dir, run, "--count", "2")) == 0
    said = capsys.readouterr()
    assert "calibrating on 2 samples the model generates itself (--calibration self)" in said.out + said.err
    assert read_record(run).calibration["source"] == "self"
    assert json.loads((run / "run.json").read_text())["config"]["calibration"] == "self"  # reproducible as run
    assert tuple(load_file(run / "calibration_ids.safetensors")["input_ids"].shape) == (2, 12)

    # extended once the hub is back, the run keeps the source it started with, silently
    monkeypatch.setattr(calibration, "hub_wikitext2_rows", lambda split: pytest.fail("the hub was asked"))
    assert cli.main(args(tiny_model_dir, run, "--count", "3")) == 0
    said = capsys.readouterr()
    assert "generates itself" not in said.out + said.err and "generating" not in said.err
    assert read_record(run).calibration["source"] == "self" and len(read_record(run).steps) == 3


def test_the_library_default_warns_when_it_falls_back_to_generated_samples(tiny_model_dir, no_wikitext, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finercut import prune

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.warns(UserWarning, match="calibrating on samples the model generates itself"):
        result = prune(model, tokenizer, count=1, num_samples=2, seq_len=12, progress=False)
    assert result.record.calibration["source"] == "self" and result.record.config.calibration == "self"
