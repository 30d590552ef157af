"""The output folder of a run: what it holds, what finercut wrote there, and the lock of the run using it.

Rules, so that nothing a user put there is ever lost:

* finercut lists every entry it writes in the folder's manifest (``.finercut-manifest.json``) *before* writing it,
  and tags each finished output with the removals it was made for (:func:`finercut.record.removal_key`);
* ``--overwrite`` deletes only what the manifest lists (and finercut's own temporary files); a folder of an older
  finercut without a manifest gives up only finercut's own file names. Anything else, dot-files (``.git``,
  ``.env``) included, is never touched;
* a folder with visible files finercut did not write is refused, with or without ``--overwrite``;
* one process at a time: a run holds an exclusive lock on ``.finercut.lock`` until it ends.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finercut.errors import UserError
from finercut.jsonio import read_json, write_json_atomic

MANIFEST_FILE = ".finercut-manifest.json"
LOCK_FILE = ".finercut.lock"
MANIFEST_FORMAT = "finercut-manifest/1"
RUN_FILE = "run.json"
PROGRESS_FILE = "progress.json"
RECORD_FILE = "record.json"
LAYER_MAP_FILE = "layer_map.png"
STEP_SCORES_FILE = "step_scores.png"
MODEL_DIR = "model"
CALIBRATION_IDS_FILE = "calibration_ids.safetensors"
"""Self-generated calibration samples, cached so that a resumed run reads the very samples it searched on."""
OWN_ENTRIES = (RUN_FILE, PROGRESS_FILE, RECORD_FILE, LAYER_MAP_FILE, STEP_SCORES_FILE, MODEL_DIR, CALIBRATION_IDS_FILE)
"""What a run folder of a finercut without a manifest may hold."""
OWN_TEMPORARY = re.compile(r"^\.(.+\.tmp|.+\.partial-[0-9a-f]{8}|.+\.replaced-[0-9a-f]{8})$")
"""finercut's own temporary names: atomic JSON writes (``.record.json.x.tmp``) and model saves (``.model.partial-``)."""


class OutputFolderError(UserError, ValueError):
    """The output folder holds something other than a matching run, or another run is using it."""


@dataclass
class Manifest:
    """The entries finercut wrote in a folder: name -> ``{"for": removal key or None}`` (None: being written, or
    an output not tied to removals, such as ``run.json``)."""

    folder: Path
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    present: bool = False
    """Whether the folder had a manifest (an older finercut wrote none)."""

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        path = folder / MANIFEST_FILE
        if not path.is_file():  # an older finercut's folder: its own names are its entries, made for nothing known
            return cls(folder, {name: {"for": None} for name in OWN_ENTRIES if (folder / name).exists()})
        data = read_json(path, expect=dict, what="finercut's list of files it wrote,")
        entries = data.get("entries")
        if data.get("format") != MANIFEST_FORMAT or not isinstance(entries, dict):
            raise OutputFolderError(f"{path} is not finercut's list of the files it wrote; remove it only if you "
                                    "know what the folder holds")
        return cls(folder, {str(name): dict(entry or {}) for name, entry in entries.items()}, True)

    def written_by_finercut(self, name: str) -> bool:
        if name in (MANIFEST_FILE, LOCK_FILE) or OWN_TEMPORARY.match(name):
            return True
        return name in self.entries if self.present else name in OWN_ENTRIES

    def claim(self, name: str) -> None:
        """Record that ``name`` is about to be written (before it exists, so a crash cannot orphan it)."""
        self.entries[name] = {"for": None}
        self._save()

    def finish(self, name: str, for_key: str | None) -> None:
        """Record that ``name`` is complete, made for the removals ``for_key``."""
        self.entries[name] = {"for": for_key}
        self._save()

    def made_for(self, name: str) -> str | None:
        return self.entries.get(name, {}).get("for")

    def _save(self) -> None:
        self.present = True
        write_json_atomic(self.folder / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "entries": self.entries})


def foreign_entries(folder: Path) -> list[str]:
    """Visible entries of ``folder`` finercut did not write (dot-files are the user's and are never listed)."""
    if not folder.is_dir():
        return []
    manifest = Manifest.read(folder)
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")
                  and not manifest.written_by_finercut(p.name))


def discard_own_entries(folder: Path) -> list[str]:
    """Delete what finercut wrote in ``folder`` (the manifest's entries, its temporary files) and only that.

    Returns:
        The names deleted.
    """
    if not folder.is_dir():
        return []
    manifest = Manifest.read(folder)
    deleted = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if name in (LOCK_FILE,) or not manifest.written_by_finercut(name):
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        deleted.append(name)
    return deleted


class FolderLock:
    """An exclusive lock on a run folder for the life of a run (released when the process ends, even killed)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._handle = None

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.folder / LOCK_FILE, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OutputFolderError(f"{self.folder} is in use by another finercut run ({holder}); wait for it to end "
                                    "or choose another --output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
