"""The GGUF conversion cache: staging folders of killed conversions are removed, live ones never are."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

import finercut
from finercut import modelio
from finercut.modelio import (
    ModelLoadError,
    publish_folder_once,
    remove_dead_staging,
    staging_owner,
    staging_prefix,
)

HOST = socket.gethostname()
SRC = str(Path(finercut.__file__).resolve().parents[1])


def python(script: str, *args: str) -> subprocess.Popen:
    """``script`` in a new Python process that imports this finercut."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def write_files(staging: Path) -> None:
    (staging / "model.safetensors").write_bytes(b"weights")
    (staging / "config.json").write_text("{}")


def test_staging_names_carry_their_writer():
    assert staging_prefix() == f".converting-{os.getpid()}@{HOST}-"
    assert staging_owner(f".converting-{os.getpid()}@{HOST}-1a2b3c4d") == (os.getpid(), HOST)
    assert staging_owner(".converting-17@node-03.cluster-x-ab12cd34") == (17, "node-03.cluster-x")
    # Names finercut did not give (an older finercut's random suffix, a pid that is no pid) have no owner.
    for name in (".converting-k2j4_x9q", ".converting-@host-1", ".converting-0@host-1", ".converting-x1@host-1",
                 ".converting-12@-1", ".converting-12@host", "converting-12@host-1", "abcdef"):
        assert staging_owner(name) is None, name


def test_dead_writers_staging_is_removed_and_every_other_kept(tmp_path):
    dead = dead_pid()
    kept = {
        "live (this process)": tmp_path / f"{staging_prefix()}aaaa1111",
        "live (the parent process)": tmp_path / f".converting-{os.getppid()}@{HOST}-bbbb2222",
        "another host's": tmp_path / f".converting-{dead}@{HOST}-other-cccc3333",
        "an older finercut's": tmp_path / ".converting-k2j4_x9q",
        "the cache entry": tmp_path / "0123456789abcdef01234567",
    }
    removed = tmp_path / f".converting-{dead}@{HOST}-dddd4444"
    for folder in [*kept.values(), removed]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    not_a_folder = tmp_path / f".converting-{dead}@{HOST}-eeee5555"
    not_a_folder.write_text("a file is not a staging folder")

    assert remove_dead_staging(tmp_path) == [removed]
    assert not removed.exists()
    for what, folder in kept.items():
        assert (folder / "model.safetensors").is_file(), what
    assert not_a_folder.is_file()


def test_a_killed_conversion_is_cleaned_up_by_the_next_one(tmp_path):
    # A writer killed with SIGKILL (no finally, no atexit) half way through writing its staging folder.
    started = tmp_path / "started"
    writer = python("""
        import sys, time
        from pathlib import Path
        from finercut.modelio import publish_folder_once

        def write(staging):
            (staging / "model.safetensors").write_bytes(b"x" * 1_000_000)
            Path(sys.argv[2]).write_text(staging.name)
            time.sleep(600)

        publish_folder_once(Path(sys.argv[1]), write, complete_file="config.json")
    """, str(tmp_path / "cache" / "first"), str(started))
    try:
        wait_for(started.exists)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    left_over = tmp_path / "cache" / started.read_text()
    assert (left_over / "model.safetensors").stat().st_size == 1_000_000
    assert staging_owner(left_over.name) == (writer.pid, HOST)

    assert publish_folder_once(tmp_path / "cache" / "second", write_files, complete_file="config.json") \
        == tmp_path / "cache" / "second"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["second"]
    assert sorted(p.name for p in (tmp_path / "cache" / "second").iterdir()) == ["config.json", "model.safetensors"]


def test_two_processes_converting_the_same_file_at_once_both_succeed(tmp_path):
    # Each writer, mid-write, waits until the other has started writing too: the later one's sweep ran while
    # the earlier one was writing, and neither may have lost its folder.
    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    script = """
        import os, sys, time
        from pathlib import Path
        from finercut.modelio import publish_folder_once

        folder, barrier = Path(sys.argv[1]), Path(sys.argv[2])

        def write(staging):
            (staging / "model.safetensors").write_bytes(str(os.getpid()).encode())
            (barrier / str(os.getpid())).touch()
            deadline = time.monotonic() + 60
            while len(list(barrier.iterdir())) < 2:
                assert time.monotonic() < deadline, "the other writer never started"
                time.sleep(0.01)
            (staging / "config.json").write_text(str(os.getpid()))

        print(publish_folder_once(folder, write, complete_file="config.json"))
    """
    writers = [python(script, str(cache / "entry"), str(barrier)) for _ in range(2)]
    results = [writer.communicate(timeout=120) for writer in writers]
    for writer, (out, err) in zip(writers, results):
        assert writer.returncode == 0, err
        assert out.strip() == str(cache / "entry")
    winner = (cache / "entry" / "config.json").read_text()
    assert winner in {str(writer.pid) for writer in writers}
    assert (cache / "entry" / "model.safetensors").read_text() == winner  # one writer's files, not a mix
    assert [p.name for p in cache.iterdir()] == ["entry"]


def test_a_damaged_cache_entry_is_reported_and_the_staging_removed(tmp_path):
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "model.safetensors").write_bytes(b"no config.json beside it")
    with pytest.raises(ModelLoadError, match=r"cannot put the converted model in place at .*entry .*it is damaged: "
                                             r"delete it and run again"):
        publish_folder_once(tmp_path / "entry", write_files, complete_file="config.json")
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_a_failed_write_leaves_no_staging_folder(tmp_path):
    def failing(staging: Path) -> None:
        (staging / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_folder_once(tmp_path / "entry", failing, complete_file="config.json")
    assert list(tmp_path.iterdir()) == []


def test_published_files_get_the_umask_mode_not_a_private_one(tmp_path):
    def private_writer(staging: Path) -> None:  # as save_pretrained writes its weights: mode 0600
        write_files(staging)
        (staging / "model.safetensors").chmod(0o600)

    previous = os.umask(0o022)
    try:
        folder = publish_folder_once(tmp_path / "entry", private_writer, complete_file="config.json")
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        "config.json": 0o644, "model.safetensors": 0o644}


class FakePretrained:
    """Stands in for the GGUF-loaded model or tokenizer: records how it was loaded, saves one file."""

    loads: list[dict] = []

    def __init__(self, file: str) -> None:
        self.file = file
        if file == "config.json":  # the model: loaded from GGUF it keeps a quantizer that blocks saving
            self.config = types.SimpleNamespace(quantization_config={"quant_method": "gguf"})
            self.hf_quantizer = object()

    def save_pretrained(self, folder: Path) -> None:
        if self.file == "config.json":
            assert self.hf_quantizer is None and not hasattr(self.config, "quantization_config")
        (Path(folder) / self.file).write_text("{}")


def test_converted_gguf_folder_converts_once_without_remote_code_and_sweeps_dead_staging(tmp_path, monkeypatch):
    import transformers

    def fake_loader(file):
        def from_pretrained(location, **options):
            FakePretrained.loads.append({"location": location, **options})
            return FakePretrained(file)
        return from_pretrained

    FakePretrained.loads = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_loader("config.json"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_loader("tokenizer.json"))
    monkeypatch.setenv(modelio.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    stale = tmp_path / "cache" / "gguf" / f".converting-{dead_pid()}@{HOST}-0000aaaa"
    stale.mkdir(parents=True)

    folder = modelio.converted_gguf_folder(gguf)
    assert folder == tmp_path / "cache" / "gguf" / modelio.file_sha256(gguf)[:24]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "tokenizer.json"]
    assert not stale.exists()
    assert [load["trust_remote_code"] for load in FakePretrained.loads] == [False, False]
    assert modelio.converted_gguf_folder(gguf) == folder
    assert len(FakePretrained.loads) == 2, "a cached conversion is not redone"
