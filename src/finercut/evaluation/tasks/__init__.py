"""Offline lm-evaluation-harness task definitions: lm-eval 0.4.13's built-in tasks on local data files.

Importing this package imports ``lm_eval`` (the ``eval`` extra).
"""

from finercut.evaluation.tasks.commonsense import COMMONSENSE_TASKS, commonsense_task
from finercut.evaluation.tasks.mmlu import MMLU_NUM_FEWSHOT, mmlu_group
from finercut.evaluation.tasks.wikitext import WIKITEXT_DOCUMENTS_SOURCE, wikitext_documents, wikitext_task

__all__ = [
    "COMMONSENSE_TASKS",
    "MMLU_NUM_FEWSHOT",
    "WIKITEXT_DOCUMENTS_SOURCE",
    "commonsense_task",
    "mmlu_group",
    "wikitext_documents",
    "wikitext_task",
]
