"""Perplexity on the WikiText-2 test split, by methods that give different numbers; each result names its own.

* :func:`windowed_perplexity` -- the pruning literature's number (SparseGPT, SliceGPT, ShortGPT, ...): the test
  rows joined with ``"\\n\\n"``, tokenized once, cut into consecutive non-overlapping windows of fixed length;
  perplexity = exp(mean next-token NLL over all predicted tokens). Depends on the tokenizer and window length.
* :func:`lm_eval_wikitext_perplexity` -- lm-evaluation-harness's ``wikitext`` task: each Wikipedia article scored
  by rolling loglikelihood over the model's full context, reported per word, per byte and as bits per byte.
  Word perplexity is comparable across tokenizers.
* :func:`llama_cpp_perplexity` -- llama.cpp's ``llama-perplexity`` protocol, for comparing a model with its GGUF
  export run in llama.cpp: chunks of the text, each scored on its second half only.

Data: the local ``<data_dir>/wikitext2/test.json`` (the hub's ``wikitext``/``wikitext-2-raw-v1`` test split as a
file) when a data dir is given or ``$FINERCUT_DATA_DIR`` is set, else the hub via ``datasets``; never one silently
in place of the other.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from finercut.calibration import DATA_DIR_ENV, DataError, hub_wikitext2_rows, resolve_data_dir
from finercut.errors import ConfigError, MissingFileError
WIKITEXT2_TEST_FILE = Path("wikitext2") / "test.json"
HUB_WIKITEXT2 = ("wikitext", "wikitext-2-raw-v1")
DEFAULT_WINDOW_LENGTH = 2048

# Float32 logits per log-softmax chunk: 256 MiB, e.g. 256 positions of a 262k vocabulary, 1365 of a 49k one.
_LOGIT_CHUNK_BYTES = 256 * 2**20


def wikitext2_test_rows(data_dir: str | Path | None = None) -> list[str]:
    """Rows of the WikiText-2 (raw, v1) test split: 4,358 strings, 1,467 of them empty.

    Args:
        data_dir: folder holding ``wikitext2/test.json``; defaults to ``$FINERCUT_DATA_DIR``. With neither, the
            hub's ``wikitext``/``wikitext-2-raw-v1`` test split is downloaded through ``datasets``.

    Raises:
        FileNotFoundError: the data dir has no ``wikitext2/test.json``.
        DataError: no data dir, and the hub dataset could not be loaded.
    """
    root = resolve_data_dir(data_dir)
    if root is None:
        return list(hub_wikitext2_rows("test"))
    path = root / WIKITEXT2_TEST_FILE
    if not path.is_file():
        raise MissingFileError(
            f"{path} not found; pass data_dir=<folder containing {WIKITEXT2_TEST_FILE}> (or set {DATA_DIR_ENV})"
        )
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)["text"]


def wikitext2_source(data_dir: str | Path | None = None) -> str:
    """Where :func:`wikitext2_test_rows` reads from, in words."""
    root = resolve_data_dir(data_dir)
    return f"local file {root / WIKITEXT2_TEST_FILE}" if root else f"hub dataset {'/'.join(HUB_WIKITEXT2)}, test split"


# --------------------------------------------------------------------------------------------------- windowed


@dataclass(frozen=True)
class WindowedPerplexity:
    """Result of :func:`windowed_perplexity`.

    Attributes:
        method: the method's name.
        ppl: ``exp(mean_nll)``.
        mean_nll: mean next-token negative log-likelihood, nats per predicted token.
        num_tokens: predicted tokens, ``num_windows * (window_length - 1)``.
        num_windows: windows scored.
        window_length: tokens fed to the model per window, BOS included.
        bos: what was done about a BOS token, in words.
        source: the text and how it was cut, in words.
    """

    method: str
    ppl: float
    mean_nll: float
    num_tokens: int
    num_windows: int
    window_length: int
    bos: str
    source: str


WINDOWED_METHOD = "windowed: non-overlapping fixed-length windows of the joined test text, exp(mean token NLL)"


def windowed_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    data_dir: str | Path | None = None,
    window_length: int = DEFAULT_WINDOW_LENGTH,
    max_windows: int | None = None,
    batch_size: int = 1,
) -> WindowedPerplexity:
    """Perplexity of ``model`` on WikiText-2 test cut into non-overlapping windows (the pruning papers' method).

    The rows are joined with ``"\\n\\n"`` and tokenized once without special tokens. If the tokenizer starts
    encoded text with a BOS token, every window is that BOS plus the next ``window_length - 1`` text tokens;
    otherwise a window is ``window_length`` text tokens and its first token is context only. Either way each
    window predicts ``window_length - 1`` tokens. The text after the last full window is not scored.

    Args:
        model: causal LM returning ``.logits`` of shape ``[batch, seq, vocab]``; put in eval mode.
        tokenizer: its tokenizer.
        data_dir: see :func:`wikitext2_test_rows`.
        window_length: tokens per window, capped at ``config.max_position_embeddings`` where the model has one.
        max_windows: score only the first this many windows (None: all).
        batch_size: windows per forward pass.
    """
    if window_length < 2:
        raise ConfigError(f"window_length must be >= 2 to predict anything, got {window_length}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be >= 1 or None, got {max_windows}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    context = getattr(model.config, "max_position_embeddings", None)
    length = min(window_length, context) if context else window_length
    rows = wikitext2_test_rows(data_dir)
    text_ids = tokenizer("\n\n".join(rows), add_special_tokens=False, verbose=False)["input_ids"]
    bos_id = bos_token_to_prepend(tokenizer)
    windows = token_windows(torch.tensor(text_ids), window_length=length, bos_token_id=bos_id)
    available = windows.shape[0]
    if available == 0:
        raise DataError(f"the text has {len(text_ids)} tokens, fewer than one window of {length}")
    windows = windows[:max_windows]

    mean_nll = mean_next_token_nll(model, windows, batch_size=batch_size)
    capped = f" (capped from {window_length} by max_position_embeddings)" if length < window_length else ""
    bos = (
        f"BOS (id {bos_id}) prepended to every window, as the tokenizer adds it to encoded text"
        if bos_id is not None
        else "no BOS: the tokenizer adds none to encoded text"
    )
    return WindowedPerplexity(
        method=WINDOWED_METHOD,
        ppl=math.exp(mean_nll),
        mean_nll=mean_nll,
        num_tokens=windows.shape[0] * (length - 1),
        num_windows=windows.shape[0],
        window_length=length,
        bos=bos,
        source=(
            f"WikiText-2 raw test ({wikitext2_source(data_dir)}, {len(rows)} rows) joined with '\\n\\n': "
            f"{len(text_ids)} tokens; first {windows.shape[0]} of {available} windows of {length} tokens{capped}"
        ),
    )


def bos_token_to_prepend(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer starts encoded text with it (Llama, Gemma), else None (GPT-2, SmolLM2, Qwen)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return None
    encoded = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos_id if encoded and encoded[0] == bos_id else None


def token_windows(token_ids: torch.Tensor, *, window_length: int, bos_token_id: int | None) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``token_ids``, each led by ``bos_token_id`` if given.

    Args:
        token_ids: ``[num_tokens]`` the tokenized text.
        window_length: tokens per window including the BOS.

    Returns:
        ``[num_windows, window_length]``; ``num_windows = num_tokens // text_per_window`` with
        ``text_per_window = window_length - 1`` if a BOS leads, else ``window_length``.
    """
    text_per_window = window_length - (bos_token_id is not None)
    num_windows = token_ids.numel() // text_per_window
    windows = token_ids[: num_windows * text_per_window].view(num_windows, text_per_window)
    if bos_token_id is None:
        return windows
    return torch.cat([torch.full((num_windows, 1), bos_token_id, dtype=windows.dtype), windows], dim=1)


@torch.inference_mode()
def mean_next_token_nll(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 1) -> float:
    """Mean NLL (nats) of every token of ``windows`` after the first, given the tokens before it in its window.

    Args:
        windows: ``[num_windows, window_length]`` token ids, scored ``batch_size`` windows per forward pass.
    """
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        total += summed_nll(logits[:, :-1], batch[:, 1:])
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum over positions of ``-log softmax(logits)[target]``, in float32, a chunk of positions at a time.

    Only one chunk of float32 log-probabilities exists at once, never ``[batch, seq, vocab]`` float32 for the
    batch (5.4 GB for 10 x 512 tokens of a 262k vocabulary); the model's own logits stay in its dtype, so a
    bfloat16 model's batch costs half that, once.

    Args:
        logits: ``[batch, seq, vocab]`` in the model's dtype.
        targets: ``[batch, seq]`` token ids.
    """
    chunk = max(1, _LOGIT_CHUNK_BYTES // (4 * logits.shape[-1]))
    total = 0.0
    for row_logits, row_targets in zip(logits, targets):
        for start in range(0, row_logits.shape[0], chunk):
            total += F.cross_entropy(
                row_logits[start : start + chunk].float(), row_targets[start : start + chunk], reduction="sum"
            ).item()
    return total


# --------------------------------------------------------------------------------------------------- llama.cpp

LLAMA_CPP_METHOD = "llama.cpp: llama-perplexity's chunks of the test text, each scored on its second half"


def llama_cpp_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    data_dir: str | Path | None = None,
    context: int = 512,
    chunks: int | None = None,
    batch_size: int = 1,
) -> WindowedPerplexity:
    """Perplexity under the protocol of llama.cpp's ``llama-perplexity -f FILE -c CONTEXT --chunks CHUNKS``.

    The file is the WikiText-2 test rows joined with ``"\\n\\n"`` (less one trailing newline, which
    ``llama-perplexity`` drops when it reads a file), tokenized once with the tokenizer's special tokens, and cut
    into consecutive chunks of ``context`` tokens; a chunk's first token is replaced by BOS where the tokenizer adds
    one. Only the second half of each chunk is scored: the logits at positions ``context // 2`` to ``context - 2``
    predict the tokens after them, ``context - context // 2 - 1`` tokens per chunk. perplexity =
    exp(mean NLL). Pass llama.cpp's ``-c`` as ``context`` and its ``--chunks`` as ``chunks`` (None: all chunks).

    Raises:
        ConfigError: ``context < 4``, ``chunks < 1`` or ``batch_size < 1``.
        DataError: the text is shorter than two chunks (``llama-perplexity`` refuses it too).
    """
    if context < 4:
        raise ConfigError(f"context must be >= 4 to score anything, got {context}")
    if chunks is not None and chunks < 1:
        raise ConfigError(f"chunks must be >= 1 or None, got {chunks}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    rows = wikitext2_test_rows(data_dir)
    text = "\n\n".join(rows)
    text = text[:-1] if text.endswith("\n") else text
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    if len(ids) < 2 * context:
        raise DataError(f"the text has {len(ids)} tokens; llama-perplexity needs at least {2 * context}")
    available = len(ids) // context
    count = available if chunks is None else min(chunks, available)
    windows = torch.tensor(ids[: count * context]).view(count, context)
    bos_id = bos_token_to_prepend(tokenizer)
    if bos_id is not None:
        windows[:, 0] = bos_id
    first = context // 2

    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            total += summed_nll(logits[:, first:-1], batch[:, first + 1 :])
    num_tokens = count * (context - first - 1)
    mean_nll = total / num_tokens
    return WindowedPerplexity(
        method=LLAMA_CPP_METHOD,
        ppl=math.exp(mean_nll),
        mean_nll=mean_nll,
        num_tokens=num_tokens,
        num_windows=count,
        window_length=context,
        bos=(f"BOS (id {bos_id}) in place of every chunk's first token" if bos_id is not None
             else "no BOS: the tokenizer adds none to encoded text"),
        source=(f"WikiText-2 raw test ({wikitext2_source(data_dir)}, {len(rows)} rows) joined with '\\n\\n': "
                f"{len(ids)} tokens; first {count} of {available} chunks of {context} tokens, positions "
                f"{first + 1}-{context - 1} of each scored"),
    )


# --------------------------------------------------------------------------------------------------- lm-eval


@dataclass(frozen=True)
class LmEvalWikitextPerplexity:
    """Result of :func:`lm_eval_wikitext_perplexity`, lm-eval's ``wikitext`` metrics.

    Attributes:
        method: the method's name.
        word_perplexity: ``exp(-sum loglikelihood / words)``, words counted in the raw documents.
        byte_perplexity: ``exp(-sum loglikelihood / utf-8 bytes)``.
        bits_per_byte: ``-sum loglikelihood / bytes / ln 2``.
        num_documents: documents (articles) scored.
        definitions: ``"offline"`` (built-in task on the rebuilt documents) or ``"built-in"`` (hub data).
        source: where the documents came from, in words.
        task_version: lm-eval's version of the ``wikitext`` task.
        lm_eval_version: version of the lm-eval package that ran.
        max_length: tokens per rolling window lm-eval used.
    """

    method: str
    word_perplexity: float
    byte_perplexity: float
    bits_per_byte: float
    num_documents: int
    definitions: str
    source: str
    task_version: str
    lm_eval_version: str
    max_length: int


LM_EVAL_WIKITEXT_METHOD = "lm-eval wikitext: rolling loglikelihood per article, per word / per byte"


def lm_eval_wikitext_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
) -> LmEvalWikitextPerplexity:
    """lm-eval's ``wikitext`` task (word/byte perplexity, bits per byte) on the in-memory ``model``.

    Offline (a data dir given or ``$FINERCUT_DATA_DIR`` set) the task's hub dataset,
    ``EleutherAI/wikitext_document_level``, is replaced by documents rebuilt from the local test rows by its own
    rule (:func:`finercut.evaluation.tasks.wikitext_documents`: 62 articles); detokenizer and counting are lm-eval's.
    Otherwise the built-in task runs on the hub data.

    Args:
        limit: score only the first ``limit`` documents (None: all 62).
        batch_size: lm-eval's batch size.
        max_length: rolling window in tokens; None: the model config's context length.
    """
    from finercut.evaluation.lm_eval_bridge import hf_lm, load_builtin, lm_eval_version, run_lm_eval
    from finercut.evaluation.tasks import WIKITEXT_DOCUMENTS_SOURCE, wikitext_task
    from lm_eval.tasks import TaskManager

    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of documents or None, got {limit}")
    root = resolve_data_dir(data_dir)
    lm = hf_lm(model, tokenizer, batch_size=batch_size, max_length=max_length)
    if root is None:
        task_manager = TaskManager()
        (task,) = load_builtin(task_manager, ["wikitext"])
        definitions, source = "built-in", "hub dataset EleutherAI/wikitext_document_level"
    else:
        task_manager = TaskManager(include_defaults=False)
        task = wikitext_task(wikitext2_test_rows(root))
        definitions, source = "offline", f"{WIKITEXT_DOCUMENTS_SOURCE} ({wikitext2_source(root)})"
    raw = run_lm_eval(
        lm, [task], task_manager=task_manager, leaf_tasks={"wikitext": task}, first_n={"wikitext": limit}
    )
    metrics = raw["results"]["wikitext"]
    return LmEvalWikitextPerplexity(
        method=LM_EVAL_WIKITEXT_METHOD,
        word_perplexity=float(metrics["word_perplexity,none"]),
        byte_perplexity=float(metrics["byte_perplexity,none"]),
        bits_per_byte=float(metrics["bits_per_byte,none"]),
        num_documents=int(raw["n-samples"]["wikitext"]["effective"]),
        definitions=definitions,
        source=source,
        task_version=str(raw["versions"]["wikitext"]),
        lm_eval_version=lm_eval_version(),
        max_length=lm.max_length,
    )
