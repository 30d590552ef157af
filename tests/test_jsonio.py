"""finercut.jsonio: atomic JSON writes that honour the umask, and reads whose every failure is one clear line."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from finercut.errors import MissingFileError, UserError
from finercut.jsonio import JsonFileError, read_json, write_json_atomic

DATA = {"format": 1, "steps": [{"unit": "attn 3", "distance": 0.125}], "name": "ünïcode"}


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def test_write_round_trips_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "record.json"  # the folder is created
    write_json_atomic(path, DATA)
    assert read_json(path) == DATA
    assert path.read_text(encoding="utf-8") == json.dumps(DATA, indent=2) + "\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.json"]


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600), (0o000, 0o666)])
def test_written_file_has_the_mode_the_umask_gives(tmp_path, umask, mask, mode):
    umask(mask)
    write_json_atomic(tmp_path / "a.json", DATA)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode
    # Replacing an existing file gives the new file the umask's mode too.
    (tmp_path / "a.json").chmod(0o600 if mode != 0o600 else 0o644)
    write_json_atomic(tmp_path / "a.json", {"again": True})
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode


def test_write_fsyncs_the_file_and_then_its_folder(tmp_path, monkeypatch):
    synced: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        target = os.readlink(f"/proc/self/fd/{descriptor}")
        synced.append((Path(target).name, "exists" if (tmp_path / "a.json").exists() else "not yet"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_json_atomic(tmp_path / "a.json", DATA)
    # The temporary file is synced before the rename puts it in place; the folder after it.
    assert len(synced) == 2
    assert synced[0][0].startswith(".a.json.") and synced[0][1] == "not yet"
    assert synced[1] == (tmp_path.name, "exists")


def test_unserialisable_data_writes_nothing_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomic(path, DATA)
    with pytest.raises(TypeError):
        write_json_atomic(path, {"tensor": object()})
    assert read_json(path) == DATA
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_write_removes_its_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    write_json_atomic(path, DATA)

    def failing_replace(source, target):
        raise OSError(errno.EXDEV, "simulated rename failure")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        write_json_atomic(path, {"new": 1})
    assert read_json(path) == DATA
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# ---------------------------------------------------------------------------------------------------------------------
# Reading: every malformed file is one line naming the file and what to do


def refusal(path: Path, error_type=JsonFileError, **options) -> str:
    with pytest.raises(error_type) as caught:
        read_json(path, **options)
    message = str(caught.value)
    assert isinstance(caught.value, UserError)
    assert "\n" not in message
    return message


def test_reads_any_json_value_and_checks_the_top_level_type_when_asked(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json(tmp_path / "list.json") == [1, 2]
    assert read_json(tmp_path / "list.json", expect=list) == [1, 2]
    message = refusal(tmp_path / "list.json", expect=dict, what="run record")
    assert message.startswith(f"run record {tmp_path / 'list.json'} holds a JSON array ([...]) where a JSON object")
    (tmp_path / "number.json").write_text("3")
    assert "holds a number where a JSON object ({...}) belongs" in refusal(tmp_path / "number.json", expect=dict)


@pytest.mark.parametrize("text, problem", [
    ('{"steps": [1, 2', "is cut short (its JSON ends unfinished at line 1)"),
    ('{\n  "steps": [\n    1,\n', "is cut short (its JSON ends unfinished at line 4)"),
    ('{"name": "unfinish', "is cut short"),
    ("", "is empty"),
    ("  \n", "is empty"),
    ("steps: 1", "is not valid JSON (Expecting value at line 1, column 1)"),
    ('{"a": 1}}', "is not valid JSON (Extra data at line 1, column 9)"),
    ("{'a': 1}", "is not valid JSON (Expecting property name enclosed in double quotes at line 1, column 2)"),
])
def test_malformed_content(tmp_path, text, problem):
    path = tmp_path / "record.json"
    path.write_text(text)
    message = refusal(path, what="run record")
    assert message.startswith(f"run record {path} {problem}"), message
    assert message.endswith("replace it with an intact copy, or delete it if finercut wrote it and run again")


def test_not_utf8(tmp_path):
    path = tmp_path / "record.json"
    path.write_bytes(b'{"a": "\xff"}')
    assert refusal(path).startswith(f"JSON file {path} is not UTF-8 text, so not JSON (byte 7 is 0xff)")


def test_missing_file_is_a_missing_file_error(tmp_path):
    message = refusal(tmp_path / "nope.json", MissingFileError, what="run record")
    assert message == f"run record {tmp_path / 'nope.json'} does not exist"


def test_a_folder(tmp_path):
    (tmp_path / "record.json").mkdir()
    assert refusal(tmp_path / "record.json") == (
        f"JSON file {tmp_path / 'record.json'} is a folder, not a file; name the JSON file inside it"
    )


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    path.write_text("{}")
    path.chmod(0)
    try:
        readable = os.access(path, os.R_OK)  # root reads anything: simulate the refusal there
        if readable:
            def denied(self):
                raise PermissionError(errno.EACCES, "Permission denied", str(self))

            monkeypatch.setattr(Path, "read_bytes", denied)
        assert refusal(path) == (
            f"JSON file {path} cannot be read (permission denied); make it readable to this user"
        )
    finally:
        path.chmod(0o644)


def test_a_path_component_over_255_characters(tmp_path):
    path = tmp_path / ("r" * 256 + ".json")
    message = refusal(path)
    assert "the path is too long for the file system (its longest part has 261 characters" in message
    assert message.endswith("use a shorter name")


def test_a_file_where_a_folder_belongs(tmp_path):
    (tmp_path / "run").write_text("{}")
    assert "a part of the path is a file, not a folder" in refusal(tmp_path / "run" / "record.json")
