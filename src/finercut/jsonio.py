"""JSON files finercut writes and reads: written whole or not at all, read with one-line errors.

* :func:`write_json_atomic` writes a temporary file next to the target, flushes it to disk and renames it over the
  target, so a crash leaves the old file or the new one, never half of one. The file gets the permissions any
  file created by this process gets (``0666`` less the umask), like ``open(path, "w")``.
* :func:`read_json` turns everything that can be wrong with a file on disk (missing, a folder, unreadable, a name
  too long, not UTF-8, empty, cut short, not JSON, the wrong kind of value) into a :class:`JsonFileError` or
  :class:`~finercut.errors.MissingFileError` naming the file and what to do, which the command line prints as one
  line.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from pathlib import Path
from typing import Any

from finercut.errors import MissingFileError, UserError

_JSON_KINDS = {dict: "a JSON object ({...})", list: "a JSON array ([...])", str: "a JSON string",
               bool: "true or false", int: "a number", float: "a number", type(None): "null"}
_REPLACE = "replace it with an intact copy, or delete it if finercut wrote it and run again"


class JsonFileError(UserError, ValueError):
    """A JSON file finercut needs cannot be read or does not hold what it must."""


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path``: completely or, on any failure, not at all.

    The text is encoded before any file is created (data that is not JSON-serialisable raises ``TypeError`` and
    leaves nothing behind). The temporary file is created with mode ``0666`` so that the kernel applies the umask
    (and any default ACL) exactly as for an ordinary new file; file and folder are fsynced before and after the
    rename, so the new content survives a power cut once this returns.
    """
    path = Path(path)
    text = json.dumps(data, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_json(path: str | os.PathLike, *, what: str | None = None, expect: type | None = None) -> Any:
    """The JSON value in ``path``, or a one-line error naming the file, the problem and what to do.

    Args:
        what: what the file is, for the messages (``"the run record"``); default ``"JSON file"``.
        expect: the type the top-level value must have (``dict`` or ``list``); None accepts any JSON value.

    Raises:
        MissingFileError: ``path`` does not exist.
        JsonFileError: it is a folder, cannot be read, or does not hold valid JSON of the expected type.
    """
    path = Path(path)
    label = f"{what} {path}" if what else f"JSON file {path}"
    raw = _read_bytes(path, label)
    if not raw.strip():
        raise JsonFileError(f"{label} is empty; {_REPLACE}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise JsonFileError(
            f"{label} is not UTF-8 text, so not JSON (byte {error.start} is {raw[error.start]:#04x}); {_REPLACE}"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if _cut_short(text, error):
            raise JsonFileError(
                f"{label} is cut short (its JSON ends unfinished at line {error.lineno}): the file was not written "
                f"completely; {_REPLACE}"
            ) from None
        raise JsonFileError(
            f"{label} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); {_REPLACE}"
        ) from None
    if expect is not None and not isinstance(value, expect):
        raise JsonFileError(
            f"{label} holds {_JSON_KINDS.get(type(value), type(value).__name__)} where "
            f"{_JSON_KINDS.get(expect, expect.__name__)} belongs; {_REPLACE}"
        )
    return value



def _read_bytes(path: Path, label: str) -> bytes:
    """The file's bytes; every way the file system can refuse becomes one clear error."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"{label} does not exist") from None
    except IsADirectoryError:
        raise JsonFileError(f"{label} is a folder, not a file; name the JSON file inside it") from None
    except PermissionError:
        raise JsonFileError(f"{label} cannot be read (permission denied); make it readable to this user") from None
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            longest = max(len(part) for part in path.parts)
            raise JsonFileError(
                f"{label}: the path is too long for the file system (its longest part has {longest} characters; "
                "most file systems allow 255); use a shorter name"
            ) from None
        if error.errno == errno.ENOTDIR:
            raise JsonFileError(f"{label}: a part of the path is a file, not a folder; check the path") from None
        raise JsonFileError(f"{label} cannot be read ({error.strerror or error}); check the file and its folder") \
            from None


def _cut_short(text: str, error: json.JSONDecodeError) -> bool:
    """Whether the decoder failed because the text ended (a truncated write), not on a wrong character.

    A truncated document fails at its very end (or inside a string that runs to the end); the same prefix with
    more text appended could then still be valid JSON.
    """
    rest = text[error.pos:].strip()
    return not rest or error.msg.startswith("Unterminated string")
