"""The searches over whole removal sets as methods: ``prune --method beam|swap|evopress``, ``show`` and ``apply``
through the command line; the record of the search (evaluations, the objective after each improvement); a run
killed while searching resumes from its saved state to the uninterrupted record; older records still load."""

from __future__ import annotations

import json

import pytest
from test_run import prune_args, read, run_cli, without_timings

from finercut import cli
from finercut.candidates import Unit
from finercut.errors import ConfigError
from finercut.record import Record, RunConfig, read_record

SEARCHES = {
    "beam": ("--method", "beam", "--beam-width", "2"),
    "beam_greedy": ("--method", "beam", "--beam-width", "1"),
    "swap": ("--method", "swap"),
    "evopress": ("--method", "evopress", "--generations", "4", "--offspring", "4"),
    "evopress_free": ("--method", "evopress", "--generations", "4", "--offspring", "4", "--free-counts"),
}


def in_process(args: list[str]) -> None:
    assert cli.main(args) == 0


@pytest.fixture(scope="module")
def greedy_run(tmp_path_factory, tiny_model_dir, word_text):
    run = tmp_path_factory.mktemp("greedy") / "run"
    in_process(prune_args(tiny_model_dir, word_text, run, "--count", "3", "--threads", "1", "--no-save-model"))
    return read_record(run)


@pytest.mark.parametrize("name", list(SEARCHES))
def test_a_search_method_runs_through_prune_show_and_apply(name, tmp_path, tiny_model_dir, word_text, greedy_run,
                                                           capsys, one_thread):
    from finercut.checkpoint import load_pruned

    run = tmp_path / "run"
    in_process(prune_args(tiny_model_dir, word_text, run, "--count", "3", *SEARCHES[name]))
    record = read_record(run)
    search = record.search
    assert record.method == SEARCHES[name][1] and len(record.removed) == 3 and len(set(record.removed)) == 3
    assert search["kind"] == record.method and search["evaluations"] > 0
    assert search["objective"] == record.steps[-1].distance
    assert search["greedy_objective"] == greedy_run.steps[-1].distance  # the same greedy search, the same distance
    if name != "evopress":  # equal attention/FFN counts need not admit greedy's set
        assert search["objective"] <= search["greedy_objective"]
    points = search["improvements"]
    assert points and [p["evaluations"] for p in points] == sorted(p["evaluations"] for p in points)
    start = 1 if name == "evopress" else 0  # a start with equal counts may be worse than greedy's set
    assert all(a["objective"] > b["objective"] for a, b in zip(points[start:], points[start + 1:]))
    assert points[-1]["objective"] == search["objective"]
    if name == "beam_greedy":
        assert [(s.unit, s.distance) for s in record.steps] == [(s.unit, s.distance) for s in greedy_run.steps]
    capsys.readouterr()

    assert cli.main(["show", str(run)]) == 0
    shown = capsys.readouterr().out
    assert f"search: {record.method}, objective {search['objective']:.6g}" in shown
    assert "improvements (evaluations: objective, seconds)" in shown

    model_dir = tmp_path / "pruned"
    assert cli.main(["apply", str(run), "--output", str(model_dir)]) == 0
    pruned = load_pruned(model_dir)
    assert {Unit.from_dict(u) for u in pruned.config.finercut["removed"]} == set(record.removed)


@pytest.mark.parametrize("name", ["swap", "evopress_free"])
def test_a_search_starts_from_a_given_run(name, tmp_path, tiny_model_dir, word_text, greedy_run, one_thread, capsys):
    start = tmp_path / "start"
    in_process(prune_args(tiny_model_dir, word_text, start, "--count", "3", "--method", "random", "--no-save-model"))
    capsys.readouterr()
    run = tmp_path / "search"
    in_process(prune_args(tiny_model_dir, word_text, run, "--count", "3", *SEARCHES[name], "--start", str(start),
                          "--no-save-model"))
    assert "greedy step" not in capsys.readouterr().out  # the given start replaces the greedy phase
    search = read_record(run).search
    assert search["start"] == str(start) and search["greedy_objective"] is None
    assert search["objective"] <= search["start_objective"]
    assert search["improvements"][0]["objective"] == search["start_objective"]
    capsys.readouterr()
    assert cli.main(["show", str(run)]) == 0
    assert f"(from {start}'s set, {search['start_objective']:.6g}: " in capsys.readouterr().out
    # a start run of another count is refused, naming it
    assert cli.main(prune_args(tiny_model_dir, word_text, tmp_path / "bad", "--count", "2", *SEARCHES[name],
                               "--start", str(start), "--no-save-model")) != 0
    assert "removed 3 units, this run removes 2" in capsys.readouterr().err


def test_search_methods_refuse_the_naive_scorer():
    with pytest.raises(ConfigError, match="fast scorer"):
        RunConfig(method="beam", count=2, scorer="naive")


KILLS = {
    "beam": (SEARCHES["beam"], 1),  # after the first beam step
    "swap_greedy_phase": (SEARCHES["swap"], 2),  # within the greedy phase that starts the swap search
    "swap": (SEARCHES["swap"], 4),  # once greedy is done and saved
    # after the first generation; every block a candidate, so that later generations still meet new sets
    "evopress": (("--method", "evopress", "--generations", "6", "--offspring", "4", "--free-counts",
                  "--first-candidate-block", "0"), 5),
}


@pytest.mark.parametrize("name", list(KILLS))
def test_a_search_killed_while_searching_resumes_to_the_uninterrupted_record(name, tmp_path, tiny_model_dir,
                                                                            word_text, one_thread):
    extra, states = KILLS[name]
    plain = tmp_path / "plain"
    in_process(prune_args(tiny_model_dir, word_text, plain, "--count", "3", *extra, "--no-save-model"))

    killed = tmp_path / "killed"
    args = prune_args(tiny_model_dir, word_text, killed, "--count", "3", *extra, "--no-save-model")
    result = run_cli(args, signal_after_steps=states)
    assert result.returncode == -9, result.stderr
    assert read(killed / "progress.json")["method_state"] and not (killed / "record.json").exists()
    in_process(args)
    resumed, uninterrupted = read(killed / "record.json"), read(plain / "record.json")
    assert without_timings(resumed) == without_timings(uninterrupted)
    assert resumed["search"]["evaluations"] == uninterrupted["search"]["evaluations"]


def test_records_written_before_searches_still_load(tmp_path, greedy_run):
    from pathlib import Path

    data = greedy_run.to_dict()
    assert "search" not in data
    assert Record.from_dict(json.loads(json.dumps(data))).search is None
    for run in ("blockpruner", "shapley"):  # records kept in the repository, written by earlier versions
        old = read_record(Path(__file__).resolve().parents[1] / "docs" / "study" / "cache" / "runs" / run)
        assert old.search is None and "search" not in old.to_dict()


def test_the_report_draws_objective_vs_evaluations_for_a_run_and_a_compare_folder(tmp_path, tiny_model_dir,
                                                                                  word_text, one_thread):
    import dataclasses

    from finercut.study.compare import CompareConfig
    from finercut.study.report import write_report

    folder = tmp_path / "compare"
    config = CompareConfig(model=str(tiny_model_dir), methods=("beam", "swap"), ratios=(0.0, 0.25),
                           tasks=("arc_easy",), limit=2)
    (folder / "runs").mkdir(parents=True)
    (folder / "compare.json").write_text(json.dumps(dataclasses.asdict(config)))
    for method in ("beam", "swap"):
        in_process(prune_args(tiny_model_dir, word_text, folder / "runs" / f"{method}-r0.25", "--ratio", "0.25",
                              "--method", method, "--no-save-model"))
    run_page = write_report(folder / "runs" / "swap-r0.25", tmp_path / "run.html").read_text()
    assert "<h2>Search</h2>" in run_page and 'alt="objective vs evaluations"' in run_page
    compare_page = write_report(folder, tmp_path / "compare.html").read_text()
    assert compare_page.count('alt="searches"') == 1
    assert "<h2>Search</h2>" not in compare_page  # the searches are not primary entries: no run sections


def test_a_missing_or_mismatched_start_run_is_refused_before_the_model_loads(tmp_path, tiny_model_dir, word_text,
                                                                            one_thread):
    """``--start`` is read when the run's settings are checked: a wrong folder costs no model load."""
    with pytest.raises(ConfigError, match="no record.json"):
        RunConfig(method="swap", count=2, options={"start": str(tmp_path / "nothere")})
    start = tmp_path / "start"
    in_process(prune_args(tiny_model_dir, word_text, start, "--count", "2", "--method", "random", "--no-save-model"))
    with pytest.raises(ConfigError, match="removed sublayer units, this one block"):
        RunConfig(method="swap", count=2, granularity="block", options={"start": str(start)})
