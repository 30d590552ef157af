"""Scoring candidates: how far the model's output moves when one more unit is removed (EvalOutputChange).

Two scorers with the same interface and the same selections:

* :class:`FastScorer` (:mod:`~finercut.scoring.replay`): prefix-cached replay of the blocks after the
  candidate, exact early abort (:mod:`~finercut.scoring.bounds`) and, for angular and Euclidean with a plain
  linear head, distances without the vocabulary (:mod:`~finercut.scoring.gram`); for JS, lower bounds from a
  subset of the vocabulary before the full head (:mod:`~finercut.scoring.subset`).
* :class:`NaiveScorer` (:mod:`~finercut.scoring.naive`): a full forward per candidate and the plain distance
  functions; the reference the fast path is tested against.

Both compare with the **original** model's output, computed once (:mod:`~finercut.scoring.context`).
"""

from __future__ import annotations

from typing import Any, Callable

from finercut.scoring.bounds import BoundedSum, best_first, lower_bound, sample_order
from finercut.scoring.context import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_REFERENCE_BYTES,
    BlockCall,
    CalibrationBatch,
    ReferenceOutput,
    ScoringContext,
    Work,
    capture_calibration,
    check_finite,
    run_block,
)
from finercut.scoring.gram import DISTANCE_PATHS, FULL_HEAD, GRAM, GramReference, gram_applies
from finercut.scoring.naive import NaiveScorer
from finercut.scoring.replay import DEFAULT_REPLAY_STATE_BYTES, FastScorer
from finercut.scoring.subset import DEFAULT_SUBSET_TOKENS, SubsetBound, subset_size

SCORERS: dict[str, Callable[..., Any]] = {"fast": FastScorer, "naive": NaiveScorer}
"""Scorer name -> class; both take ``(context, *, exhaustive=...)``."""


def describe_scoring(
    context: ScoringContext, *, scorer: str, exhaustive: bool, replay_state_bytes: int | None = None,
    objective: str | None = None, subset_tokens: int | None = None,
) -> dict:
    """What the record says about how candidates were scored (``objective``: what replaced the output
    distance, e.g. ``ppl`` for BlockPruner)."""
    fast = scorer == "fast"
    path = GRAM if fast and objective is None and gram_applies(context) else FULL_HEAD
    bounds_subset = fast and not exhaustive and objective is None and path == FULL_HEAD
    subset_tokens = subset_size(context, subset_tokens) if bounds_subset else 0
    if fast and replay_state_bytes is None:
        replay_state_bytes = DEFAULT_REPLAY_STATE_BYTES
    return {
        "replay_state_bytes": replay_state_bytes if fast else 0,
        "scorer": scorer,
        "distance_path": path,
        "distance_path_description": DISTANCE_PATHS[path],
        "early_abort": fast and not exhaustive,
        "subset_bound_tokens": subset_tokens,
        "samples_per_batch": context.batches[0].num_samples,
        "num_samples": context.num_samples,
        **({"objective": objective} if objective else {}),
    }


__all__ = [
    "DEFAULT_BATCH_SIZE", "DEFAULT_CHUNK_BYTES", "DEFAULT_MAX_REFERENCE_BYTES", "DEFAULT_REPLAY_STATE_BYTES",
    "DEFAULT_SUBSET_TOKENS", "SubsetBound", "subset_size",
    "DISTANCE_PATHS", "FULL_HEAD", "GRAM",
    "SCORERS", "BlockCall", "BoundedSum", "CalibrationBatch", "FastScorer", "GramReference", "NaiveScorer",
    "ReferenceOutput", "ScoringContext", "Work", "best_first", "capture_calibration", "check_finite",
    "describe_scoring", "gram_applies", "lower_bound", "run_block", "sample_order",
]
