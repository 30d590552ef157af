"""Task accuracies of several evaluated models side by side, as one Markdown table.

Each argument is ``LABEL=FILE``: a ``finercut eval --output`` JSON, or a cached result of ``finercut compare`` /
``benchmarks/study_rows.py`` (``runs/full/results/<key>.json``). Accuracy is ``acc_norm`` where the task reports
it, else ``acc`` (as the study tables), in percent, with the average over the tasks shown:

    python benchmarks/task_table.py dense=docs/study/cache/results/<key>.json \\
        "greedy, ARC-Easy objective"=docs/study/cache/runs/trade25-greedy-arc_easy/eval-tasks.json
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

TASK_LABELS = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
               "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA", "mmlu": "MMLU"}


def task_scores(path: Path) -> dict[str, dict]:
    """Task name -> its score dict (``acc``, ``acc_norm``, ...) from either kind of result file."""
    data = json.loads(path.read_text())
    stages = data.get("stages", data)
    if isinstance(stages, str):  # older cached results hold their stages as a Python literal
        stages = ast.literal_eval(stages)
    tasks = stages.get("tasks")
    if not tasks or "scores" not in tasks:
        raise SystemExit(f"{path}: no task scores in this file")
    return tasks["scores"]


def accuracy(score: dict) -> float:
    """``acc_norm`` where reported, else ``acc``, in percent."""
    value = score["acc_norm"] if score.get("acc_norm") is not None else score["acc"]
    return 100 * value


def table(rows: list[tuple[str, dict[str, dict]]]) -> str:
    """A Markdown table: one row per labelled result, one column per task all of them hold, then the average."""
    tasks = [task for task in TASK_LABELS if all(task in scores for _, scores in rows)]
    lines = ["| model | " + " | ".join(TASK_LABELS[task] for task in tasks) + " | average |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for label, scores in rows:
        values = [accuracy(scores[task]) for task in tasks]
        lines.append(f"| {label} | " + " | ".join(f"{value:.1f}" for value in values)
                     + f" | {sum(values) / len(values):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="LABEL=FILE")
    args = parser.parse_args()
    rows = []
    for item in args.results:
        label, separator, file = item.partition("=")
        if not separator:
            parser.error(f"{item!r}: give LABEL=FILE")
        rows.append((label, task_scores(Path(file))))
    print(table(rows))


if __name__ == "__main__":
    main()
