"""What a run records about its candidates: aborted ones as bounds with their samples, in the record, in
``finercut show --steps``, in the per-step score plot; --exhaustive; older records and run.json still read."""

import json

import pytest

from finercut.candidates import Unit
from finercut.cli import format_step, main
from finercut.plots import plot_step_scores
from finercut.record import RunConfig
from finercut.search import CandidateScore, Step

STEP = {
    "step": 0, "removed": {"block": 3, "kind": "ffn"}, "distance": 0.01, "window_first_block": 2,
    "block_executions": 5, "seconds": 0.1, "samples_evaluated": 5, "aborted": 2,
    "candidates": [
        {"block": 2, "kind": "attention", "distance": None, "lower_bound": 0.25, "samples": 1},
        {"block": 2, "kind": "ffn", "distance": 0.02, "samples": 3, "batch_sums": [0.01, 0.02, 0.03]},
        {"block": 3, "kind": "attention", "distance": None, "lower_bound": 0.04, "samples": 1},
        {"block": 3, "kind": "ffn", "distance": 0.01, "samples": 3, "batch_sums": [0.01, 0.0, 0.02]},
    ],
}


def test_step_round_trips_with_bounds_samples_and_batch_sums():
    step = Step.from_dict(STEP)
    assert step.candidates[0] == CandidateScore(Unit(2, "attention"), None, lower_bound=0.25, samples=1)
    assert step.candidates[0].aborted and not step.candidates[1].aborted
    assert step.samples_evaluated == 8
    assert Step.from_dict(step.to_dict()) == step
    unit, distance = step.candidates[1]  # unpacks as (unit, distance)
    assert (unit, distance) == (Unit(2, "ffn"), 0.02)


def test_records_written_before_bounds_existed_still_read():
    old = {key: value for key, value in STEP.items() if key not in ("samples_evaluated", "aborted")}
    old["candidates"] = [{"block": 2, "kind": "ffn", "distance": 0.02}, {"block": 3, "kind": "ffn", "distance": 0.01}]
    step = Step.from_dict(old)
    assert step.candidates[1] == CandidateScore(Unit(3, "ffn"), 0.01)
    assert step.samples_evaluated is None and step.to_dict()["aborted"] == 0
    # run.json of an older run has no "exhaustive": it takes the default, so the run resumes unchanged.
    config = RunConfig(ratio=0.25).to_dict()
    del config["exhaustive"]
    assert RunConfig.from_dict(config).exhaustive is False


def test_show_steps_marks_aborted_candidates_as_bounds():
    text = format_step(STEP, num_samples=3)
    assert "2 scored completely, 2 aborted" in text
    assert "2.attn >=0.25 [1/3]" in text and "3.attn >=0.04 [1/3]" in text and "2.ffn 0.02" in text
    assert text.index("3.ffn 0.01") < text.index("2.ffn 0.02") < text.index("3.attn >=0.04")  # by value


def test_step_score_plot_draws_distances_and_bounds(tmp_path):
    path = plot_step_scores([STEP, {**STEP, "step": 1}], tmp_path / "scores.png", title="t")
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("exhaustive", [False, True])
def test_a_run_records_samples_and_bounds_and_exhaustive_scores_everything(tmp_path, tiny_model_dir, word_text,
                                                                            capsys, exhaustive):
    output = tmp_path / "run"
    args = ["prune", "--model", str(tiny_model_dir), "--calibration", str(word_text), "--samples", "4",
            "--seq-len", "12", "--count", "2", "--no-progress", "--no-save-model", "--output", str(output)]
    assert main(args + (["--exhaustive"] if exhaustive else [])) == 0
    record = json.loads((output / "record.json").read_text())
    assert record["config"]["exhaustive"] is exhaustive and record["config"]["batch_size"] == 1
    assert record["scoring"]["early_abort"] is not exhaustive and record["scoring"]["distance_path"] == "full_head"
    assert (output / "step_scores.png").is_file()
    for step in record["steps"]:
        for candidate in step["candidates"]:
            assert 0 <= candidate["samples"] <= 4
            if candidate["distance"] is None:
                assert not exhaustive and candidate["lower_bound"] >= step["distance"]
            else:
                assert candidate["samples"] == 4
        assert step["samples_evaluated"] == sum(c["samples"] for c in step["candidates"])
    if exhaustive:
        assert all(s["aborted"] == 0 for s in record["steps"])
    capsys.readouterr()
    assert main(["show", str(output), "--steps"]) == 0
    assert "scored completely" in capsys.readouterr().out
