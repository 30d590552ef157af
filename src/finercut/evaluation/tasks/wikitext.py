"""lm-eval's ``wikitext`` task (document-level rolling loglikelihood) on documents rebuilt from local rows.

The built-in task reads ``EleutherAI/wikitext_document_level`` from the hub: one document ("page") per Wikipedia
article of ``wiki.test.raw``. That dataset's loading script splits the raw file at top-level headings; the same
split is applied here to the file rebuilt from the rows of ``wikitext`` / ``wikitext-2-raw-v1`` (the local
``test.json``). The built-in detokenizer (``doc_to_target``) and word/byte counts (``process_results``) are
used unchanged.
"""

from __future__ import annotations

from typing import Sequence

from lm_eval.api.task import ConfigurableTask

from finercut.evaluation.tasks.builtin import builtin_task_config, task_on_local_docs

WIKITEXT_DOCUMENTS_SOURCE = "documents rebuilt from local rows at top-level headings"


def wikitext_raw_text(rows: Sequence[str]) -> str:
    """The text of ``wiki.test.raw`` from the rows of the hub's ``wikitext-2-raw-v1`` split.

    The hub's loading script yields one row per line of the raw file, the line with its ``"\\n"``, except that
    blank lines -- a single space in the raw file, as in ``valid.tokens.txt`` -- become ``""``.
    """
    return "".join(row if row else " \n" for row in rows)


def is_top_level_heading(line: str) -> bool:
    """Whether ``line`` starts a new article: ``" = Title = "``, not ``" = = Section = = "``.

    The rule of the ``wikitext_document_level`` loading script, kept character for character.
    """
    collapsed = line.replace("= = =", "===").replace("= =", "==").strip()
    return collapsed.startswith("= ") and collapsed.endswith(" =")


def wikitext_documents(rows: Sequence[str]) -> list[str]:
    """The test split of ``EleutherAI/wikitext_document_level`` (``wikitext-2-raw-v1``), one string per article.

    Lines of the raw text are grouped from each top-level heading to the next and joined with ``"\\n"``; text
    before the first heading is kept only if not blank. The last document keeps the file's final empty line.
    """
    documents: list[str] = []
    current: list[str] = []
    for line in wikitext_raw_text(rows).split("\n"):
        if is_top_level_heading(line):
            page = "\n".join(current)
            if page.strip():
                documents.append(page)
            current = []
        current.append(line)
    documents.append("\n".join(current))
    return documents


def wikitext_task(rows: Sequence[str]) -> ConfigurableTask:
    """lm-eval's built-in ``wikitext`` task scoring the documents rebuilt from ``rows``."""
    documents = [{"page": page} for page in wikitext_documents(rows)]
    return task_on_local_docs(builtin_task_config("wikitext"), splits={"test": documents}, eval_split="test")
