"""lm-evaluation-harness's own task definitions, read from the installed package, and the one way to swap their data.

The offline tasks are lm-eval 0.4.13's built-in task configs with two things replaced: where the documents come
from (local files instead of the Hugging Face hub) and, where the local export renamed the fields, the field
mapping. Everything else -- metrics, few-shot setup, description, delimiters, version, scoring functions -- is
lm-eval's own, loaded from its YAML files, so it cannot drift from the built-in task by a copy error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import datasets
import lm_eval.tasks
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

BUILTIN_TASKS_DIR = Path(lm_eval.tasks.__file__).parent

# Built-in YAML of each task this package defines offline, relative to lm_eval/tasks.
BUILTIN_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "wikitext": "wikitext/wikitext.yaml",
}
MMLU_SUBJECT_YAML = "mmlu/default/mmlu_{subject}.yaml"


def builtin_task_config(name: str) -> dict[str, Any]:
    """lm-eval's config dict of built-in task ``name`` (``includes`` merged, ``!function`` entries imported).

    ``name`` is a key of :data:`BUILTIN_YAML` or ``mmlu_<subject>``.
    """
    if name.startswith("mmlu_"):
        relative = MMLU_SUBJECT_YAML.format(subject=name.removeprefix("mmlu_"))
    else:
        relative = BUILTIN_YAML[name]
    config = load_yaml(BUILTIN_TASKS_DIR / relative, resolve_func=True)
    config.pop("tag", None)  # tags register a task in lm-eval's index; a Task object built here has no index
    return config


def task_on_local_docs(
    builtin_config: dict[str, Any],
    *,
    splits: dict[str, list[dict]],
    eval_split: str,
    fewshot_split: str | None = None,
    **overrides: Any,
) -> ConfigurableTask:
    """The built-in task with its documents replaced by ``splits`` and its config updated by ``overrides``.

    Args:
        builtin_config: from :func:`builtin_task_config`.
        splits: split name -> documents (dicts). Nothing is downloaded; the documents are used as given.
        eval_split: the split that is scored; put where the built-in task put its scored split (``test_split``
            if it had one, else ``validation_split``) so the task sees the same split role.
        fewshot_split: split of few-shot examples, or None for zero-shot tasks.
        overrides: config keys to replace, e.g. ``doc_to_text`` for renamed fields.
    """
    scored_role = "test_split" if builtin_config.get("test_split") else "validation_split"
    dataset = datasets.DatasetDict({name: datasets.Dataset.from_list(docs) for name, docs in splits.items()})
    config = {
        **builtin_config,
        "dataset_path": None,
        "dataset_name": None,
        "dataset_kwargs": None,
        "custom_dataset": _returning(dataset),
        "training_split": None,
        "validation_split": None,
        "test_split": None,
        scored_role: eval_split,
        "fewshot_split": fewshot_split,
        # The decontamination query names the built-in dataset's fields; decontamination is off anyway.
        "should_decontaminate": False,
        "doc_to_decontamination_query": None,
        **overrides,
    }
    with _without_custom_dataset_notice():
        return ConfigurableTask(config=config)


def _returning(dataset: datasets.DatasetDict) -> Callable[..., datasets.DatasetDict]:
    """A ``custom_dataset`` callable; lm-eval calls it with the task metadata as keyword arguments."""

    def custom_dataset(**_task_metadata: Any) -> datasets.DatasetDict:
        return dataset

    return custom_dataset


class _DropCustomDatasetNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@contextmanager
def _without_custom_dataset_notice() -> Iterator[None]:
    """lm-eval warns for every ``custom_dataset`` task that it could take ``--metadata``; that is noise here."""
    logger = logging.getLogger("lm_eval.api.task")
    notice_filter = _DropCustomDatasetNotice()
    logger.addFilter(notice_filter)
    try:
        yield
    finally:
        logger.removeFilter(notice_filter)
