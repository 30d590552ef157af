"""MMLU (57 subjects, 5-shot from each subject's dev split) as lm-eval tasks over the local csv files.

Each subject is lm-eval's built-in ``mmlu_<subject>`` task (prompt template, description, ``first_n`` few-shot
sampler over ``dev``) with its documents read from ``<data_dir>/tasks/mmlu/{dev,test}/<subject>_{dev,test}.csv``
and put in the shape of the hub's ``cais/mmlu`` rows (``question``, ``subject``, ``choices``, ``answer``), which
is what the built-in template reads. The csv files are read with the ``csv`` module, all fields as strings: a
dataframe reader would turn answers such as "None" or "1.50" into NaN or 1.5.

The subjects form one group ``mmlu`` whose accuracy is the mean over all questions (lm-eval's
``weight_by_size``), as the built-in ``mmlu`` group reports it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lm_eval.api.group import Group
from lm_eval.api.task import ConfigurableTask
from lm_eval.config.group import AggMetricConfig

from finercut.evaluation.tasks.builtin import builtin_task_config, task_on_local_docs
from finercut.calibration import DataError
from finercut.errors import MissingFileError

MMLU_NUM_FEWSHOT = 5  # the paper's (and the MMLU paper's) setting
MMLU_NUM_SUBJECTS = 57
MMLU_GROUP_VERSION = 2  # lm-eval 0.4.13's mmlu/default/_mmlu.yaml
_CSV_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


def mmlu_subjects(mmlu_dir: Path) -> list[str]:
    """Sorted subject names with both a dev and a test csv under ``mmlu_dir``; errors if any of the 57 is missing."""
    test_subjects = {path.name.removesuffix("_test.csv") for path in (mmlu_dir / "test").glob("*_test.csv")}
    dev_subjects = {path.name.removesuffix("_dev.csv") for path in (mmlu_dir / "dev").glob("*_dev.csv")}
    subjects = sorted(test_subjects & dev_subjects)
    if len(subjects) != MMLU_NUM_SUBJECTS:
        missing = sorted(test_subjects ^ dev_subjects)
        raise MissingFileError(
            f"MMLU: expected {MMLU_NUM_SUBJECTS} subjects with dev and test csv files under {mmlu_dir}, found "
            f"{len(subjects)}" + (f" (dev or test missing for: {', '.join(missing)})" if missing else "")
            + "; pass data_dir=<folder containing tasks/mmlu/{dev,test}> (or set FINERCUT_DATA_DIR)"
        )
    return subjects


def read_mmlu_csv(path: Path, *, subject: str) -> list[dict[str, Any]]:
    """Rows of one MMLU csv as ``cais/mmlu`` documents: ``{"question", "subject", "choices", "answer"}``.

    ``choices`` is the list of the four answer strings, ``answer`` the index of the right one.
    """
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        if header != _CSV_HEADER:
            raise DataError(f"{path}: expected header {','.join(_CSV_HEADER)}, got {','.join(header)}")
        rows = list(reader)
    malformed = [line for line, row in enumerate(rows, start=2) if len(row) != len(_CSV_HEADER)]
    if malformed:
        raise DataError(f"{path}: lines {malformed[:5]} do not have {len(_CSV_HEADER)} fields")
    return [
        {"question": question, "subject": subject, "choices": choices, "answer": int(answer)}
        for question, *choices, answer in rows
    ]


def mmlu_subject_task(subject: str, mmlu_dir: Path, *, num_fewshot: int = MMLU_NUM_FEWSHOT) -> ConfigurableTask:
    """lm-eval's built-in ``mmlu_<subject>`` task on the local dev (few-shot pool) and test (scored) csv files."""
    return task_on_local_docs(
        builtin_task_config(f"mmlu_{subject}"),
        splits={
            "test": read_mmlu_csv(mmlu_dir / "test" / f"{subject}_test.csv", subject=subject),
            "dev": read_mmlu_csv(mmlu_dir / "dev" / f"{subject}_dev.csv", subject=subject),
        },
        eval_split="test",
        fewshot_split="dev",
        num_fewshot=num_fewshot,
    )


def mmlu_group(mmlu_dir: Path, *, num_fewshot: int = MMLU_NUM_FEWSHOT) -> Group:
    """Group ``mmlu`` of the 57 local subject tasks; its ``acc`` is weighted by subject size, as lm-eval's."""
    group = Group(
        name="mmlu",
        alias="mmlu",
        aggregate_metric_list=[AggMetricConfig(metric="acc", weight_by_size=True)],
        metadata={"version": MMLU_GROUP_VERSION},
    )
    for subject in mmlu_subjects(mmlu_dir):
        group.add(mmlu_subject_task(subject, mmlu_dir, num_fewshot=num_fewshot))
    return group
