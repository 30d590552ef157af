"""Bad input, as a hostile user gives it: a seeded generator of a few hundred bad option values, combinations and
corrupted files, each fed to the command line. Every one must end with exit code 2 and one line on stderr (no
traceback), and write or delete nothing. Plus the output-folder rules: nothing finercut did not write is ever
deleted, and a run is finished only if its outputs are the record's."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from finercut import cli

LONG = "x" * 300


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, modification time)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() or p.is_dir()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir, word_text):
    """A tiny model, calibration text, a finished run, a pruned folder and broken files, all under one root."""
    root = tmp_path_factory.mktemp("hostile")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    text = root / "text.txt"
    shutil.copy(word_text, text)
    run = root / "run"
    base = ["--model", str(model), "--calibration", str(text), "--samples", "2", "--seq-len", "12", "--threads", "1",
            "--no-progress"]
    assert cli.main(["prune", *base, "--count", "2", "--output", str(run)]) == 0
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02\xff" * 64)
    (root / "a-file").write_text("not a folder")
    (root / "existing-dir").mkdir()
    corrupt = {"truncated": '{"format": "finercut-run/1", "con', "empty": "", "list": "[1, 2]", "string": '"run"',
               "no-config": '{"format": "finercut-run/1"}', "typed": None, "unknown": None}
    for name, content in corrupt.items():
        folder = root / f"bad-run-{name}"
        shutil.copytree(run, folder)
        config = json.loads((run / "run.json").read_text())
        if name == "typed":
            config["config"]["ratio"] = "a quarter"
            content = json.dumps(config)
        elif name == "unknown":
            config["config"]["colour"] = "red"
            content = json.dumps(config)
        (folder / "run.json").write_text(content)
    for name, content in {"truncated": '{"format": "finercut-record/2", "ste', "empty-object": "{}",
                          "no-steps": None, "array": "[]"}.items():
        folder = root / f"bad-record-{name}"
        shutil.copytree(run, folder)
        if content is None:
            record = json.loads((run / "record.json").read_text())
            del record["steps"]
            content = json.dumps(record)
        (folder / "record.json").write_text(content)
    half = root / "half-written"
    half.mkdir()
    (half / "run.json").write_text((run / "run.json").read_text())
    pruned = root / "pruned"
    assert cli.main(["apply", str(run), "--output", str(pruned)]) == 0
    for name, damage in (("bad-config", "config"), ("truncated", "weights")):
        broken = root / f"broken-pruned-{name}"
        shutil.copytree(pruned, broken)
        truncate(broken, damage)
    dense = root / "broken-dense-truncated"
    shutil.copytree(model, dense)
    truncate(dense, "weights")
    return {"root": root, "model": model, "text": text, "run": run, "base": base}


def truncate(folder: Path, what: str) -> None:
    """Damage a model folder as a killed copy would: its config.json or its weight file cut in half."""
    file = folder / "config.json" if what == "config" else next(folder.glob("*.safetensors"))
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


BAD_PRUNE_OPTIONS = {
    "--ratio": ["-1", "0", "1", "1.5", "nan", "inf", "abc", ""],
    "--count": ["0", "-3", "9999", "2.5", "x"],
    "--samples": ["0", "-1", "a"],
    "--seq-len": ["0", "1", "100000"],
    "--seed": ["-1", "99999999999999999999999", "abc"],
    "--threads": ["0", "-2"],
    "--batch-size": ["0"],
    "--window-until": ["-0.1", "2", "nan"],
    "--window-fraction": ["-1", "1.5"],
    "--first-candidate-block": ["99", "-1"],
    "--replay-memory": ["-1", "nan"],
    "--metric": ["foo", "ppl2"],
    "--method": ["foo"],
    "--granularity": ["foo", "layer"],
    "--scorer": ["foo"],
    "--dtype": ["float8", "int4"],
    "--device": ["gpu7", "cuda:7", "tpu"],
    "--permutations": ["3"],
    "--target-params": ["0", "1", "2", "nan"],
    "--context": ["64"],
    "--rank": ["3"],
    "--ridge": ["0.5"],
}
BAD_RECOVERY = [
    ["--recover", "bias", "--rank", "3"], ["--recover", "lowrank"], ["--recover", "lowrank", "--rank", "0"],
    ["--recover", "lowrank", "--rank", "100000"], ["--recover", "linear", "--ridge", "nan"],
    ["--recover", "linear", "--ridge", "-1"], ["--recover", "linear", "--recover-samples", "0"],
    ["--recover", "linear", "--recover-seq-len", "0"], ["--recover", "linear", "--recover-seq-len", "100000"],
    ["--recover", "magic"], ["--recover", "linear", "--no-save-model"], ["--recover", "fold", "--rank", "3"],
    ["--recover", "fold", "--recover-group", "sublayer"],
]


def bad_invocations(ws: dict, count: int, seed: int = 0) -> list[list[str]]:
    """``count`` invocations, each wrong in one or two ways, drawn with ``seed`` from the lists above."""
    root, rng = ws["root"], random.Random(seed)
    fresh = lambda: str(root / f"out-{rng.randrange(10**9)}")  # noqa: E731 (never created by a refused run)
    sources = {
        "--model": [str(root / "nothere"), "a/b/c/d", str(root / "missing.gguf"), str(root / "a-file"), LONG],
        "--calibration": [str(root / "missing.txt"), str(root / "empty.txt"), str(root / "binary.txt"),
                          str(root / LONG / "t.txt")],
        "--data-dir": [str(root / "nothere")],
        "--output": [str(root / LONG / "run"), str(root / "a-file" / "run"), str(root / "a-file")],
    }
    calls: list[list[str]] = []
    while len(calls) < count:
        kind = rng.random()
        if kind < 0.55:  # one or two bad options on prune
            options = dict(rng.sample(sorted(BAD_PRUNE_OPTIONS.items()), rng.choice((1, 2))))
            extra = [item for flag, values in options.items() for item in (flag, rng.choice(values))]
            calls.append(["prune", *ws["base"], "--output", fresh(), *extra])
        elif kind < 0.65:
            calls.append(["prune", *ws["base"], "--count", "2", "--output", fresh(), *rng.choice(BAD_RECOVERY)])
        elif kind < 0.75:
            flag = rng.choice(sorted(sources))
            args = {"--model": ws["base"][1], "--calibration": ws["base"][3], "--output": fresh()}
            args[flag] = rng.choice(sources[flag])
            calls.append(["prune", *[x for pair in args.items() for x in pair], "--samples", "2", "--seq-len", "12",
                          "--threads", "1", "--no-progress", "--count", "2"])
        elif kind < 0.85:  # corrupted run folders: a broken run.json for a resume, a broken record.json for the rest
            folder = rng.choice(sorted(p.name for p in root.iterdir() if p.name.startswith(("bad-", "half"))))
            commands = ([["prune", "--resume", "--no-progress", "--output"]] if folder.startswith("bad-run")
                        else [["show"], ["apply"], ["report"]])
            command = rng.choice(commands)
            target = [str(root / folder)]
            if command[0] == "apply":
                target += ["--output", fresh()]
            if command[0] == "report":
                target += ["--html", str(root / f"page-{rng.randrange(10**9)}.html")]
            calls.append([*command, *target])
        elif kind < 0.93:  # evaluation options
            choice = rng.choice([["--ppl-window", "0"], ["--tasks", "foo"], ["--tasks", "arc_easy,nope"],
                                 ["--batch-size", "0"], ["--run", str(ws["run"]), "--count", "-1"],
                                 ["--run", str(ws["run"]), "--count", "0"], ["--run", str(ws["run"]), "--count", "99"],
                                 ["--output", str(root / "existing-dir")], ["--output", str(root / "nope" / "r.json")],
                                 ["--limit", "-3"], ["--count", "2"]])
            calls.append(["eval", ws["base"][1], *choice])
        elif kind < 0.97:  # damaged model folders
            folder = str(root / rng.choice(["broken-pruned-bad-config", "broken-pruned-truncated",
                                            "broken-dense-truncated"]))
            calls.append(rng.choice([
                ["eval", folder, "--tasks", "", "--ppl-max-windows", "0", "--wikitext-docs", "0"],
                ["export", folder, "--format", "gguf", "--output", fresh() + ".gguf"],
                ["export", folder, "--format", "decilm", "--output", fresh()],
                ["prune", "--model", folder, *ws["base"][2:], "--output", fresh()],
            ]))
        else:  # compare
            choice = rng.choice([["--ratios", "0,abc"], ["--shard", "abc"], ["--shard", "3/2"],
                                 ["--model", str(root / "nothere")], ["--methods", "foo"], ["--ratios", "0,1.5"],
                                 ["--methods", "shapley", "--permutations", "0"], ["--batch-size", "0"],
                                 ["--tasks", "nope"], ["--recover", "magic"]])
            calls.append(["compare", "--output", fresh(), "--data-dir", str(root), *choice])
    return calls


def run_refused(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(args)
    except SystemExit as stop:  # argparse
        code = stop.code
    return code, capsys.readouterr().err


def test_hundreds_of_bad_invocations_exit_2_with_one_line_and_touch_nothing(workspace, capsys, one_thread):
    root = workspace["root"]
    before = snapshot(root)
    failures = []
    for args in bad_invocations(workspace, 300):
        code, err = run_refused(args, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        after = snapshot(root)
        if code != 2 or len(lines) != 1 or "Traceback" in err or after != before:
            changed = sorted(set(after.items()) ^ set(before.items()))[:3]
            shown = args[:1] + args[-4:] if len(args) > 5 else args
            failures.append(f"{shown} -> exit {code}, {len(lines)} lines {err[-200:]!r}, changed {changed}")
            before = after
    assert not failures, f"{len(failures)} of 300 bad invocations misbehaved:\n" + "\n".join(failures[:20])


def test_a_safetensors_file_cut_short_is_found_from_its_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    from finercut.pruned_modeling import CheckpointMismatchError
    from finercut.weights import check_safetensors_complete

    file = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(3)}, file)
    check_safetensors_complete(file)  # whole: 8 + header + (64 + 12) bytes of data
    whole = file.read_bytes()
    for cut, reason in ((len(whole) - 1, "where its header describes"), (5, "header is cut short"),
                        (20, "header is cut short")):
        file.write_bytes(whole[:cut])
        with pytest.raises(CheckpointMismatchError, match=reason):
            check_safetensors_complete(file)
    file.write_bytes(whole + b"\0")
    with pytest.raises(CheckpointMismatchError, match="where its header describes"):
        check_safetensors_complete(file)


# ---------------------------------------------------------------------------------------------------------------------
# The output folder


def test_overwrite_deletes_only_what_finercut_wrote(workspace, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    base = [*workspace["base"], "--count", "2", "--no-save-model", "--output", str(run)]
    assert cli.main(["prune", *base]) == 0
    (run / ".git").mkdir()
    (run / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (run / ".env").write_text("SECRET=1\n")
    assert cli.main(["prune", *base, "--overwrite"]) == 0
    assert (run / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert (run / ".env").read_text() == "SECRET=1\n"
    (run / "thesis.tex").write_text("\\begin{document}")
    assert cli.main(["prune", *base, "--overwrite"]) == 2
    assert "holds files finercut did not write (thesis.tex)" in capsys.readouterr().err
    assert (run / "thesis.tex").read_text() == "\\begin{document}"


def test_apply_overwrite_never_deletes_a_foreign_file(workspace, tmp_path, capsys, one_thread):
    target = tmp_path / "pruned"
    assert cli.main(["apply", str(workspace["run"]), "--output", str(target)]) == 0
    assert cli.main(["apply", str(workspace["run"]), "--count", "1", "--output", str(target), "--overwrite"]) == 0
    (target / "thesis.tex").write_text("mine")
    assert cli.main(["apply", str(workspace["run"]), "--output", str(target), "--overwrite"]) == 2
    assert "thesis.tex" in capsys.readouterr().err and (target / "thesis.tex").read_text() == "mine"


def test_an_extension_killed_before_its_outputs_are_rewritten_is_not_finished(workspace, tmp_path, capsys,
                                                                             one_thread):
    """Extending 2 -> 3 and killed after the third step: record.json and model/ still hold the shorter run. The next
    run writes the outputs again instead of calling the folder finished; so does a folder of an older finercut
    (no manifest) whose record already names three removals while its model holds two."""
    from finercut.folder import MANIFEST_FILE
    from finercut.record import read_record

    def removed_by_model(run: Path) -> int:
        return len(json.loads((run / "model" / "config.json").read_text())["finercut"]["removed"])

    run = tmp_path / "run"
    base = [*workspace["base"], "--output", str(run)]
    assert cli.main(["prune", *base, "--count", "3"]) == 0
    three = json.loads((run / "progress.json").read_text())
    shorter = tmp_path / "shorter"
    assert cli.main(["prune", *workspace["base"], "--output", str(shorter), "--count", "2"]) == 0
    # the kill's state: the longer run's progress, everything else the shorter run's
    (shorter / "progress.json").write_text(json.dumps(three))
    capsys.readouterr()
    assert cli.main(["prune", *workspace["base"], "--output", str(shorter), "--count", "3"]) == 0
    assert "nothing to do" not in capsys.readouterr().err
    assert removed_by_model(shorter) == len(read_record(shorter).removed) == 3

    # an older finercut's folder: record.json of three removals, model/ of two, no manifest
    legacy = tmp_path / "legacy"
    shutil.copytree(run, legacy)
    (legacy / MANIFEST_FILE).unlink()
    shutil.rmtree(legacy / "model")
    assert cli.main(["apply", str(run), "--count", "2", "--output", str(legacy / "model")]) == 0
    capsys.readouterr()
    assert cli.main(["prune", *workspace["base"], "--output", str(legacy), "--count", "3"]) == 0
    assert "nothing to do" not in capsys.readouterr().err and removed_by_model(legacy) == 3
    assert cli.main(["prune", *workspace["base"], "--output", str(legacy), "--count", "3"]) == 0
    assert "nothing to do" in capsys.readouterr().err


def test_a_second_run_on_a_folder_in_use_is_refused(workspace, tmp_path, capsys):
    from finercut.folder import FolderLock

    run = tmp_path / "run"
    with FolderLock(run):
        assert cli.main(["prune", *workspace["base"], "--count", "2", "--output", str(run)]) == 2
    assert "in use by another finercut run" in capsys.readouterr().err
    assert not (run / "run.json").exists()


def test_run_files_honour_the_umask(workspace, tmp_path, one_thread):
    import os

    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert cli.main(["prune", *workspace["base"], "--count", "2", "--no-save-model", "--output", str(run)]) == 0
    finally:
        os.umask(old)
    for name in ("run.json", "progress.json", "record.json"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name


def test_the_interrupt_hint_quotes_a_path_with_spaces(workspace, tmp_path, capsys, monkeypatch):
    from finercut import run as run_module

    output = tmp_path / "my runs" / "a b"

    def interrupted(*args, **kwargs):
        output.mkdir(parents=True)
        (output / "run.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run_in_folder", interrupted)
    assert cli.main(["prune", *workspace["base"], "--count", "2", "--output", str(output)]) == 130
    assert f"finercut prune --resume --output '{output}'" in capsys.readouterr().err
