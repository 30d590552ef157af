"""The results table of a comparison as one model (:class:`ResultsTable`), rendered to Markdown (the report) and to
HTML (the page), and the series the comparison's figures draw.

A cell holds a value and its standard error; Markdown shows ``value ± error``, HTML the value alone (the error
in the cell's title), and a missing result is ``–`` in both.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Sequence

TASK_LABELS = {
    "boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande", "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c", "openbookqa": "OBQA", "mmlu": "MMLU (5-shot)",
}
MISSING = "–"


@dataclass(frozen=True)
class Cell:
    """One table cell: text, or a number shown with ``digits`` decimals (``percent``: times 100) and its error."""

    text: str | None = None
    value: float | None = None
    error: float | None = None
    digits: int = 1
    percent: bool = False

    def number(self, value: float) -> str:
        return f"{(100 * value if self.percent else value):.{self.digits}f}"

    def plain(self) -> str:
        if self.text is not None:
            return self.text
        return MISSING if self.value is None else self.number(self.value)

    def with_error(self) -> str:
        if self.text is not None or self.value is None or self.error is None:
            return self.plain()
        return f"{self.plain()} ± {self.number(self.error)}"


@dataclass(frozen=True)
class ResultsTable:
    """Columns and rows of cells; the first ``text_columns`` columns are text."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    text_columns: int = 1

    def markdown(self) -> list[str]:
        """The table as Markdown lines (numbers with their errors)."""
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(cell.with_error() for cell in row) + " |" for row in self.rows]
        return lines

    def html(self, *, table_id: str = "") -> str:
        """The table as an HTML ``<table>`` (numbers without their errors, which are in each cell's title)."""
        def cell(tag: str, index: int, text: str, title: str | None = None) -> str:
            attributes = ' class="text"' if index < self.text_columns else ""
            if title:
                attributes += f' title="{html.escape(title)}"'
            return f"<{tag}{attributes}>{html.escape(text)}</{tag}>"

        head = "".join(cell("th", i, name) for i, name in enumerate(self.columns))
        body = "".join(
            "<tr>" + "".join(cell("td", i, c.plain(), c.with_error() if c.error is not None else None)
                             for i, c in enumerate(row)) + "</tr>"
            for row in self.rows)
        ident = f' id="{table_id}"' if table_id else ""
        return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def net_removed_parameters(result: dict | None) -> str:
    """Share of the dense model's parameters a variant removes, net of its replacements' parameters ('–' for a
    result saved without the counts)."""
    parameters = (result or {}).get("parameters")
    if parameters is None:
        return MISSING
    return f"{(parameters['removed'] - result.get('fit', {}).get('extra_parameters', 0)) / parameters['dense']:.1%}"


def results_table(variants: Sequence[Any], results: Sequence[dict | None], tasks: Sequence[str], *,
                  headline: bool = True) -> ResultsTable:
    """Table-1-style rows: per variant, each task's accuracy ± stderr, the average and both perplexities.

    ``headline``: ``acc_norm`` where lm-eval reports it (else ``acc``) and the average of those; otherwise
    plain ``acc`` and its average. A variant without a saved result (None) shows ``–`` in every result cell.
    """
    columns = ("method", "target", "reached", "sub-layers", "params removed",
               *(TASK_LABELS.get(task, task) for task in tasks), "average", "ppl (a)", "word ppl (b)")
    rows = []
    for variant, result in zip(variants, results):
        stages = (result or {}).get("stages", {})
        scores = stages.get("tasks", {}).get("scores", {})
        cells = []
        for task in tasks:
            score = scores.get(task) or {}
            metric = "acc_norm" if headline and score.get("acc_norm") is not None else "acc"
            cells.append(Cell(value=score.get(metric), error=score.get(f"{metric}_stderr"), percent=True))
        average = stages.get("tasks", {}).get("average" if headline else "average_acc")
        rows.append((
            Cell(variant.label), Cell(f"{variant.ratio:.0%}"),
            Cell(f"{variant.summary.get('sublayer_ratio', 0.0):.1%}"),
            Cell(str(len(variant.sublayers))), Cell(net_removed_parameters(result)), *cells,
            Cell(value=average, percent=True), Cell(value=stages.get("windowed_perplexity", {}).get("ppl"), digits=2),
            Cell(value=stages.get("lm_eval_wikitext", {}).get("word_perplexity"), digits=2),
        ))
    return ResultsTable(columns, tuple(rows))


def recovery_table(variants: Sequence[Any], results: Sequence[dict | None]) -> ResultsTable | None:
    """Per recovered variant: perplexity without and with the replacements, the share of the gap to the dense model
    they close, their parameters and the fit's time; None without recovered variants."""
    by_removal = {(v.method, tuple(v.sublayers)): r for v, r in zip(variants, results) if v.plain}
    dense = next((r for v, r in zip(variants, results) if v.method == "dense"), None)
    rows = []
    for variant, result in zip(variants, results):
        plain = by_removal.get((variant.method, tuple(variant.sublayers)))
        if not variant.recovery or plain is None or result is None:
            continue
        before, after = (r["stages"]["windowed_perplexity"]["ppl"] for r in (plain, result))
        gap = None if dense is None else before - dense["stages"]["windowed_perplexity"]["ppl"]
        fit = result["fit"]
        rows.append((Cell(variant.label), Cell(f"{variant.ratio:.0%}"), Cell(value=before, digits=2),
                     Cell(value=after, digits=2), Cell(MISSING if not gap else f"{(before - after) / gap:.0%}"),
                     Cell(f"{fit['extra_parameters'] / result['parameters']['dense']:.2%}"),
                     Cell(f"{fit['seconds']:.1f} s")))
    if not rows:
        return None
    return ResultsTable(("method", "target", "ppl (a) without", "with", "gap closed", "extra parameters", "fit"),
                        tuple(rows))


def compare_series(variants: Sequence[Any], results: Sequence[dict | None]) -> tuple[dict, dict]:
    """Accuracy and perplexity against the ratio reached, per method (dense as every method's ratio 0)."""
    accuracy: dict[str, list] = {}
    perplexity: dict[str, list] = {}
    dense = next((r for v, r in zip(variants, results) if v.method == "dense" and r), None)
    for variant, result in zip(variants, results):
        if variant.method == "dense" or not result:
            continue
        label, stages = variant.label, result["stages"]
        ratio = variant.summary["sublayer_ratio"]
        if "tasks" in stages:
            accuracy.setdefault(label, []).append((ratio, 100 * stages["tasks"]["average"]))
        if "windowed_perplexity" in stages:
            perplexity.setdefault(label, []).append((ratio, stages["windowed_perplexity"]["ppl"]))
    if dense:
        for label in accuracy:
            accuracy[label].append((0.0, 100 * dense["stages"]["tasks"]["average"]))
        for label in perplexity:
            perplexity[label].append((0.0, dense["stages"]["windowed_perplexity"]["ppl"]))
    return accuracy, perplexity
