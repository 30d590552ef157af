"""Evaluation of (pruned) models: WikiText-2 perplexity and zero/few-shot accuracy through lm-evaluation-harness.

The lm-eval based names are imported on first use, so the windowed perplexity works without the ``eval`` extra.
"""

from finercut.evaluation.perplexity import (
    LmEvalWikitextPerplexity,
    WindowedPerplexity,
    llama_cpp_perplexity,
    lm_eval_wikitext_perplexity,
    windowed_perplexity,
    wikitext2_test_rows,
)

_LM_EVAL_BRIDGE = ("PAPER_TASKS", "TaskResults", "TaskScore", "evaluate_tasks", "format_results_table")

__all__ = [
    "LmEvalWikitextPerplexity",
    "WindowedPerplexity",
    "llama_cpp_perplexity",
    "lm_eval_wikitext_perplexity",
    "windowed_perplexity",
    "wikitext2_test_rows",
    *_LM_EVAL_BRIDGE,
]


def __getattr__(name: str):
    if name in _LM_EVAL_BRIDGE:
        from finercut.evaluation import lm_eval_bridge

        return getattr(lm_eval_bridge, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
