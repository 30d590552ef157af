"""The seven zero-shot commonsense tasks of the paper, as lm-eval tasks over the local jsonl exports.

The local files (``<data_dir>/tasks/<name>.jsonl``) hold each benchmark's scored split in a processed form,
``{"query", "choices", "gold"}`` (winogrande: ``{"context_options", "continuation", "gold"}``), not the raw
dataset columns the built-in lm-eval tasks template over. Each entry of :data:`LOCAL_FIELD_MAPPINGS` maps the
local fields onto the built-in prompt; the result is checked against the built-in template, request by request,
in ``tests/test_lm_eval_tasks.py``. Local query -> prompt lm-eval 0.4.13 sends (``\\n`` is a newline):

* arc_easy, arc_challenge: ``Question: <question>`` -> ``Question: <question>\\nAnswer:``
* piqa: ``Question: <goal>\\n`` -> ``Question: <goal>\\nAnswer:``
* boolq: ``Passage: <passage>\\nQuestion: <question>?`` -> ``<passage>\\nQuestion: <question>?\\nAnswer:``
* openbookqa: ``<question_stem>`` -> the same
* hellaswag: ``<activity_label>: <ctx_a> <ctx_b>`` -> ``<activity_label>: <ctx_a> <ctx_b.capitalize()>``
* winogrande: one context per option and the shared continuation -> the same (partial scoring)

Answer choices and the gold index are the export's ``choices`` and ``gold``; everything else (target delimiter
" ", metrics, versions) is the built-in config's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lm_eval.api.task import ConfigurableTask

from finercut.evaluation.tasks.builtin import builtin_task_config, task_on_local_docs
from finercut.errors import MissingFileError

# The export's ActivityNet items end in ctx_b, the unfinished last sentence, as the dataset stores it (lower case);
# lm-eval's hellaswag process_docs joins ``ctx_a + " " + ctx_b.capitalize()``. ctx_b is the text after the last
# sentence end; WikiHow items end in a full sentence (empty ctx_b) and so have no lower-case trailing fragment.
_TRAILING_FRAGMENT = re.compile(r"(?<=[.!?] )[^.!?]+$")


def capitalize_hellaswag_ctx_b(query: str) -> str:
    """The local hellaswag query with its trailing ctx_b capitalized as lm-eval's ``process_docs`` does.

    ``"Roof shingle removal: A man is sitting on a roof. he"`` -> ``"...on a roof. He"``. Fragments that do not
    start with a lower-case letter (WikiHow items, ctx_b starting with a digit) are left alone, as
    ``str.capitalize`` would leave their first character.
    """
    match = _TRAILING_FRAGMENT.search(query)
    if match is None or not match.group()[0].islower():
        return query
    return query[: match.start()] + match.group().capitalize()


def _boolq_text(doc: dict[str, Any]) -> str:
    # The export prefixed the passage with "Passage: " and stopped before lm-eval's "\nAnswer:".
    return doc["query"].removeprefix("Passage: ") + "\nAnswer:"


@dataclass(frozen=True)
class LocalFieldMapping:
    """How the fields of one local jsonl file render the built-in task's prompt.

    Attributes:
        file: file name under ``<data_dir>/tasks``.
        split: the split the file holds, which is the one lm-eval scores (``test`` or ``validation``).
        fields: ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` over the local fields, in lm-eval's
            forms (field name, Jinja template, or callable).
        prepare_query: applied to ``query`` on loading, where the export's query differs from lm-eval's.
    """

    file: str
    split: str
    fields: dict[str, Any]
    prepare_query: Callable[[str], str] | None = None


_QUERY_CHOICES_GOLD = {"doc_to_choice": "choices", "doc_to_target": "gold"}

LOCAL_FIELD_MAPPINGS: dict[str, LocalFieldMapping] = {
    "arc_easy": LocalFieldMapping(
        "arc_easy.jsonl", "test", {"doc_to_text": "{{query}}\nAnswer:", **_QUERY_CHOICES_GOLD}
    ),
    "arc_challenge": LocalFieldMapping(
        "arc_challenge.jsonl", "test", {"doc_to_text": "{{query}}\nAnswer:", **_QUERY_CHOICES_GOLD}
    ),
    "piqa": LocalFieldMapping("piqa.jsonl", "validation", {"doc_to_text": "{{query}}Answer:", **_QUERY_CHOICES_GOLD}),
    # choices stay lm-eval's literal ["no", "yes"]; the export's are the same.
    "boolq": LocalFieldMapping("boolq.jsonl", "validation", {"doc_to_text": _boolq_text, "doc_to_target": "gold"}),
    "openbookqa": LocalFieldMapping("openbook_qa.jsonl", "test", {"doc_to_text": "query", **_QUERY_CHOICES_GOLD}),
    "hellaswag": LocalFieldMapping(
        "hellaswag.jsonl",
        "validation",
        # lm-eval's process_docs builds query/choices/gold from the raw columns; the export already holds them.
        {"process_docs": None, "doc_to_text": "{{query}}", **_QUERY_CHOICES_GOLD},
        prepare_query=capitalize_hellaswag_ctx_b,
    ),
    # An int from doc_to_text marks lm-eval's multiple-input form: one context per option, scored on the shared
    # continuation (partial scoring); the int is the gold context.
    "winogrande": LocalFieldMapping(
        "winogrande.jsonl",
        "validation",
        {"doc_to_text": "gold", "doc_to_choice": "context_options", "doc_to_target": "continuation"},
    ),
}

COMMONSENSE_TASKS = tuple(LOCAL_FIELD_MAPPINGS)


def read_local_docs(name: str, tasks_dir: Path) -> list[dict[str, Any]]:
    """The documents of local task ``name`` from ``tasks_dir/<file>.jsonl``, queries prepared as lm-eval's."""
    mapping = LOCAL_FIELD_MAPPINGS[name]
    path = tasks_dir / mapping.file
    if not path.is_file():
        raise MissingFileError(
            f"{name}: local file {path} not found; pass data_dir=<folder containing tasks/{mapping.file}> "
            "(or set FINERCUT_DATA_DIR)"
        )
    with path.open(encoding="utf-8") as handle:
        docs = [json.loads(line) for line in handle if line.strip()]
    if mapping.prepare_query is not None:
        docs = [{**doc, "query": mapping.prepare_query(doc["query"])} for doc in docs]
    return docs


def commonsense_task(name: str, tasks_dir: Path) -> ConfigurableTask:
    """lm-eval's built-in task ``name`` (a key of :data:`LOCAL_FIELD_MAPPINGS`) on the local documents."""
    mapping = LOCAL_FIELD_MAPPINGS[name]
    return task_on_local_docs(
        builtin_task_config(name),
        splits={mapping.split: read_local_docs(name, tasks_dir)},
        eval_split=mapping.split,
        **mapping.fields,
    )
