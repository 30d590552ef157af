"""Weight files on disk: whether a safetensors file is whole, read from its header alone (no tensor is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

from finercut.pruned_modeling import CheckpointMismatchError


def check_safetensors_complete(file: Path) -> None:
    """Refuse a safetensors file that is not whole (cut short by a killed copy or save), from its header alone.

    The format is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON naming every tensor's byte
    range in the data that follows, then the data: the file must be exactly as long as the last range's end.
    """
    size = file.stat().st_size
    problem = None
    with open(file, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or length > size - 8:
            problem = "its header is cut short"
        else:
            try:
                header = json.loads(handle.read(length))
                end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                          default=0)
            except (ValueError, KeyError, TypeError, IndexError):
                problem = "its header is not valid"
            else:
                if size != 8 + length + end:
                    problem = f"it holds {size:,} bytes where its header describes {8 + length + end:,}"
    if problem:
        raise CheckpointMismatchError(f"{file} is not a complete safetensors file ({problem}): it was cut short or "
                                      "damaged; save or copy the model again")
