"""Every JSON file finercut writes or reads: written atomically with the umask's permissions, read by one reader
that turns any malformed content into a one-line error naming the file."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from finercut.errors import ConfigError, MissingFileError


class JSONFileError(ConfigError):
    """A JSON file finercut needs is unreadable, truncated or not what it should hold."""


def default_file_mode() -> int:
    """``0o666`` less the process umask: what ``open`` would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over ``path`` (never half-written).

    The file gets the permissions a plain ``open`` would (the umask's), not the temporary file's private 0600, so
    other users of a shared results folder can read it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp_name, default_file_mode())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike, *, what: str | None = None, expect: type | None = None) -> Any:
    """The JSON content of ``path``; a missing, unreadable, truncated or mistyped file is one line naming it.

    Args:
        what: what the file is, for the message (``"record"``, ``"run settings file"``).
        expect: the top-level type it must have (``dict``, ``list``).

    Raises:
        MissingFileError: no such file.
        JSONFileError: anything else wrong with it.
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingFileError(f"{label} does not exist") from None
    except IsADirectoryError:
        raise JSONFileError(f"{label} is a folder, not a JSON file") from None
    except UnicodeDecodeError:
        raise JSONFileError(f"{label} is not text (not UTF-8): not a file finercut wrote") from None
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise JSONFileError(f"{label}: a name in the path is too long (over 255 characters)") from None
        raise JSONFileError(f"cannot read {label}: {error.strerror or error}") from None
    try:
        data = json.loads(text)
    except ValueError as error:
        state = "is empty" if not text.strip() else f"is not valid JSON ({error.msg} at line {error.lineno})"
        raise JSONFileError(f"{label} {state}: it was cut short or edited; restore it or start over") from None
    if expect is not None and not isinstance(data, expect):
        raise JSONFileError(f"{label} holds a JSON {type(data).__name__}, not the {expect.__name__} finercut writes "
                            "there")
    return data
