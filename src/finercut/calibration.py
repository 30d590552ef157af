"""Calibration samples: random token windows of a text (default WikiText-2), or a ready tensor of token ids.

Sources, each recorded exactly as used (never a silent fallback from one to another):

* ``wikitext2`` with a local data folder (``--data-dir`` or ``FINERCUT_DATA_DIR``) laid out like
  ``<dir>/wikitext2/valid.tokens.txt``: the WikiText-2 **validation** split, so calibration never sees test text;
* ``wikitext2`` without a data folder: the Hugging Face ``wikitext``/``wikitext-2-raw-v1`` train split;
* a local ``.txt`` file (its text) or ``.jsonl`` file (the ``"text"`` field of each line);
* through the API, a ``[samples, seq]`` tensor of token ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finercut.errors import UserError

DATA_DIR_ENV = "FINERCUT_DATA_DIR"
WIKITEXT2 = "wikitext2"
LOCAL_WIKITEXT2_VALID = Path("wikitext2") / "valid.tokens.txt"
ROW_SEPARATOR = "\n\n"


class DataError(UserError, ValueError):
    """A data file or dataset is missing or unreachable; the message says what to pass instead."""


class CalibrationError(DataError):
    """The calibration source is missing, empty, unreadable or too short."""


@dataclass(frozen=True)
class CalibrationSource:
    """Where calibration text comes from: ``kind`` is ``data_dir``, ``hub`` or ``file``."""

    kind: str
    path: str | None
    description: str


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The offline data folder: ``data_dir`` if given, else ``$FINERCUT_DATA_DIR`` if set, else None (the hub).

    Raises:
        CalibrationError: the folder named by either does not exist.
    """
    chosen, origin = (data_dir, "--data-dir") if data_dir is not None else (os.environ.get(DATA_DIR_ENV), DATA_DIR_ENV)
    if not chosen:
        return None
    root = Path(chosen).expanduser().resolve()
    if not root.is_dir():
        raise CalibrationError(f"{origin}={chosen!s} is not a folder; pass the folder holding wikitext2/ and tasks/")
    return root


def resolve_source(calibration: str, data_dir: str | os.PathLike | None) -> CalibrationSource:
    """Decide, without reading it, which source ``calibration`` names; fail early if it cannot exist.

    Args:
        calibration: ``"wikitext2"`` or the path of a ``.txt``/``.jsonl`` file.
        data_dir: local data folder (``None``: ``FINERCUT_DATA_DIR`` or the hub).
    """
    if calibration == WIKITEXT2:
        folder = resolve_data_dir(data_dir)
        if folder is None:
            return CalibrationSource("hub", None, "Hugging Face dataset wikitext/wikitext-2-raw-v1, train split")
        path = folder / LOCAL_WIKITEXT2_VALID
        if not path.is_file():
            raise CalibrationError(
                f"no WikiText-2 validation file at {path}: the data folder must hold {LOCAL_WIKITEXT2_VALID} "
                f"(pass --data-dir or set {DATA_DIR_ENV} to such a folder)"
            )
        return CalibrationSource("data_dir", str(path), f"WikiText-2 validation split, local file {path}")
    path = Path(calibration).expanduser().resolve()
    if path.suffix not in (".txt", ".jsonl"):
        raise CalibrationError(
            f"unknown calibration source {calibration!r}: use 'wikitext2' or a .txt / .jsonl file"
        )
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    return CalibrationSource("file", str(path), f"local file {path}")


def load_text(source: CalibrationSource) -> str:
    """The whole calibration text of ``source`` (rows joined with a blank line, as WikiText-2 is usually used)."""
    if source.kind == "hub":
        return ROW_SEPARATOR.join(hub_wikitext2_rows("train"))
    path = Path(source.path)
    try:
        if path.suffix == ".jsonl":
            rows = [_jsonl_text(line, path, number) for number, line in enumerate(path.open(encoding="utf-8"), 1)
                    if line.strip()]
            text = ROW_SEPARATOR.join(rows)
        else:
            text = ROW_SEPARATOR.join(path.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError) as error:
        raise CalibrationError(f"cannot read calibration file {path}: {error}") from error
    if not text.strip():
        raise CalibrationError(f"calibration file {path} is empty")
    return text


def _jsonl_text(line: str, path: Path, number: int) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise CalibrationError(f"{path}:{number} is not valid JSON: {error}") from error
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    raise CalibrationError(f"{path}:{number}: each line must be a JSON string or an object with a 'text' field")


def hub_wikitext2_rows(split: str) -> list[str]:
    """Rows of the Hugging Face ``wikitext``/``wikitext-2-raw-v1`` dataset split; a clear error when unreachable."""
    try:
        import datasets
    except ImportError as error:
        raise DataError(
            "loading WikiText-2 from the Hugging Face hub needs the 'datasets' package (pip install datasets); "
            f"or pass --data-dir (data_dir=) / set {DATA_DIR_ENV} to a local data folder"
        ) from error
    try:
        return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
    except Exception as error:  # the hub client raises many error types when offline
        raise DataError(
            f"could not load wikitext/wikitext-2-raw-v1 ({split} split) from the Hugging Face hub "
            f"({type(error).__name__}: {error}). Offline, pass --data-dir (data_dir=) or set {DATA_DIR_ENV} to a "
            "local data folder (wikitext2/valid.tokens.txt, wikitext2/test.json)"
        ) from error


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts its encodings with a BOS token (Llama 2/3 do; SmolLM2, GPT-2 do not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def random_windows(
    token_ids: torch.Tensor, *, num_samples: int, seq_len: int, seed: int, bos_id: int | None
) -> torch.Tensor:
    """``num_samples`` random windows of a token stream, each ``seq_len`` long with ``bos_id`` first if given.

    Args:
        token_ids: ``[num_tokens]`` the tokenized text.

    Returns:
        ``[num_samples, seq_len]`` token ids.
    """
    window = seq_len - (1 if bos_id is not None else 0)
    if token_ids.numel() < num_samples * window:
        raise CalibrationError(
            f"the calibration text has {token_ids.numel()} tokens, fewer than samples x length = "
            f"{num_samples} x {window}: use a longer text or fewer/shorter samples"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - window + 1, (num_samples,), generator=generator)
    samples = torch.stack([token_ids[start : start + window] for start in starts.tolist()])
    if bos_id is not None:
        samples = torch.cat([torch.full((num_samples, 1), bos_id, dtype=samples.dtype), samples], dim=1)
    return samples


def calibration_samples(
    tokenizer: Any, source: CalibrationSource, *, num_samples: int, seq_len: int, seed: int
) -> tuple[torch.Tensor, dict]:
    """Tokenize ``source`` and draw the calibration samples.

    Returns:
        ``[num_samples, seq_len]`` token ids, and what to record about them.
    """
    text = load_text(source)
    token_ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    samples = random_windows(token_ids, num_samples=num_samples, seq_len=seq_len, seed=seed, bos_id=bos_id)
    info = {
        "source": source.kind,
        "description": source.description,
        "path": source.path,
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "text_tokens": int(token_ids.numel()),
        "bos_prepended": bos_id is not None,
        **samples_info(samples, seed=seed),
    }
    return samples, info


def samples_info(samples: torch.Tensor, *, seed: int | None) -> dict:
    """What to record about a ``[samples, seq]`` tensor of token ids, whatever its origin."""
    return {
        "num_samples": int(samples.shape[0]),
        "seq_len": int(samples.shape[1]),
        "seed": seed,
        "token_ids_sha256": hashlib.sha256(samples.to(torch.int64).numpy().tobytes()).hexdigest(),
    }
