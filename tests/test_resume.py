"""Every greedy method survives SIGKILL after a step and resumes to the uninterrupted record, and a finished run
extends to a larger count reusing its steps; one-shot methods reuse their saved ranking, and say when they
restart instead. Resume and extension follow from what the method declares, never from its name."""

from __future__ import annotations

import pytest
from test_run import prune_args, read, run_cli, without_timings

from finercut import cli

GREEDY_RUNS = {
    "js": (),
    "angular": ("--metric", "angular"),
    "euclidean": ("--metric", "euclidean"),
    "js_official": ("--metric", "js_official"),
    "blocks": ("--granularity", "block"),
    "attention_only": ("--only", "attention"),
    "blockpruner": ("--method", "blockpruner"),
}


def in_process(args: list[str]) -> None:
    assert cli.main(args) == 0


@pytest.mark.parametrize("name", list(GREEDY_RUNS))
def test_a_greedy_method_killed_after_a_step_resumes_to_the_uninterrupted_record_and_extends(
        name, tmp_path, tiny_model_dir, word_text, one_thread):
    extra = (*GREEDY_RUNS[name], "--no-save-model")
    count = "2" if name in ("blocks", "attention_only") else "3"  # of 4 blocks, 4 attention sub-layers
    plain = tmp_path / "plain"
    in_process(prune_args(tiny_model_dir, word_text, plain, "--count", count, *extra))

    killed = tmp_path / "killed"
    args = prune_args(tiny_model_dir, word_text, killed, "--count", count, *extra)
    result = run_cli(args, signal_after_steps=1)
    assert result.returncode == -9, result.stderr
    assert len(read(killed / "progress.json")["steps"]) == 1 and not (killed / "record.json").exists()
    in_process(args)
    resumed, uninterrupted = read(killed / "record.json"), read(plain / "record.json")
    assert resumed["timings"]["resumed_steps"] == 1
    assert without_timings(resumed) == without_timings(uninterrupted)

    # extended: the finished steps are kept as they are (their timings too), one more step is searched
    longer = str(int(count) + 1)
    in_process(prune_args(tiny_model_dir, word_text, plain, "--count", longer, *extra))
    extended = read(plain / "record.json")
    assert extended["steps"][: int(count)] == uninterrupted["steps"]
    assert len(extended["steps"]) == int(count) + 1 and extended["timings"]["resumed_steps"] == int(count)


def test_a_cost_target_run_killed_after_a_step_resumes_to_the_uninterrupted_record(tmp_path, tiny_model_dir,
                                                                                   word_text, one_thread):
    extra = ("--target-kv-cache", "0.5", "--no-save-model")
    plain = tmp_path / "plain"
    in_process(prune_args(tiny_model_dir, word_text, plain, *extra))
    killed = tmp_path / "killed"
    args = prune_args(tiny_model_dir, word_text, killed, *extra)
    assert run_cli(args, signal_after_steps=1).returncode == -9
    in_process(args)
    resumed, uninterrupted = read(killed / "record.json"), read(plain / "record.json")
    # the latency measured before the search is the killed run's own (saved): only it may differ
    for record in (resumed, uninterrupted):
        record.pop("cost_model")
    assert resumed["timings"]["resumed_steps"] == 1
    assert without_timings(resumed) == without_timings(uninterrupted)


def test_a_one_shot_run_extends_from_its_saved_ranking_and_a_killed_one_restarts(tmp_path, tiny_model_dir,
                                                                              word_text, one_thread, capsys):
    run = tmp_path / "shapley"
    extra = ("--method", "shapley", "--permutations", "2", "--no-save-model")
    in_process(prune_args(tiny_model_dir, word_text, run, "--count", "2", *extra))
    first = read(run / "record.json")
    capsys.readouterr()
    in_process(prune_args(tiny_model_dir, word_text, run, "--count", "4", *extra))
    assert "reusing the saved Shapley ranking" in capsys.readouterr().err
    extended = read(run / "record.json")
    assert extended["steps"][:2] == first["steps"] and len(extended["steps"]) == 4
    assert extended["importance"] == first["importance"]  # no new evaluations

    progress = read(run / "progress.json")  # as a kill during the ranking leaves it: steps, no saved ranking
    progress.pop("method_state")
    (run / "progress.json").write_text(__import__("json").dumps(progress))
    (run / "record.json").unlink()
    in_process(prune_args(tiny_model_dir, word_text, run, "--count", "4", *extra))
    assert "selects its units as a whole; the selection restarts" in capsys.readouterr().err
    assert without_timings(read(run / "record.json")) == without_timings(extended)
