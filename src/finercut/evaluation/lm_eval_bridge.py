"""Zero-shot and few-shot accuracy of an in-memory model through lm-evaluation-harness (lm-eval 0.4.13).

The paper's setting: BoolQ, PIQA, HellaSwag, WinoGrande, ARC-easy, ARC-challenge and OpenBookQA zero-shot, MMLU
5-shot, each scored by lm-eval's multiple-choice loglikelihood comparison.

Task definitions come from one of two places, and the result says which:

* ``data_dir`` given (or ``FINERCUT_DATA_DIR`` set): the offline definitions of :mod:`finercut.evaluation.tasks`,
  lm-eval's built-in tasks reading the local files under ``<data_dir>/tasks``. Nothing is downloaded.
* neither: lm-eval's built-in tasks by name, which download their datasets from the Hugging Face hub. If the hub
  is unreachable this fails; it never falls back to local files (or the other way round).

**Average.** lm-eval reports ``acc`` for every task and also ``acc_norm`` (loglikelihood divided by the choice's
length in characters) for ARC-e, ARC-c, HellaSwag, OpenBookQA and PIQA. The paper (App. B) divides the answer's
likelihood by its length (in tokens; lm-eval's nearest metric normalises by characters), so
:attr:`TaskResults.average` averages each task's ``acc_norm`` where lm-eval reports it and ``acc`` elsewhere (BoolQ,
WinoGrande, MMLU); :attr:`TaskResults.average_acc` averages plain ``acc`` for comparison. MMLU enters the average
as one task, its accuracy over all questions (lm-eval's size-weighted ``mmlu`` group).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lm_eval import simple_evaluate
from lm_eval.api.group import Group
from lm_eval.api.task import Task
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from finercut.calibration import DataError, resolve_data_dir
from finercut.evaluation.tasks import MMLU_NUM_FEWSHOT, commonsense_task, mmlu_group
from finercut.errors import ConfigError

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "mmlu")
MMLU = "mmlu"
AVERAGE_METRIC = "acc_norm where lm-eval reports it (arc_easy, arc_challenge, hellaswag, openbookqa, piqa), else acc"

_FILTER = "none"  # lm-eval keys metrics "<metric>,<filter>"; multiple-choice tasks have only the "none" filter


@dataclass(frozen=True)
class TaskScore:
    """One task's accuracy as lm-eval reports it; fractions in [0, 1].

    Attributes:
        task: lm-eval task name (``mmlu`` is the size-weighted group over its 57 subjects).
        acc, acc_stderr: accuracy and its standard error; the stderr is None where lm-eval reports "N/A" (fewer
            than 2 samples, or a group with such a member).
        acc_norm, acc_norm_stderr: length-normalised accuracy, None for tasks lm-eval does not report it for.
        num_samples: documents scored.
        num_fewshot: in-context examples per prompt.
        version: lm-eval's version of the task definition.
    """

    task: str
    acc: float
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    num_samples: int
    num_fewshot: int
    version: str

    @property
    def headline_metric(self) -> str:
        """The metric that counts for the average: ``acc_norm`` where reported, else ``acc``."""
        return "acc" if self.acc_norm is None else "acc_norm"

    @property
    def headline(self) -> float:
        return self.acc if self.acc_norm is None else self.acc_norm


@dataclass(frozen=True)
class TaskResults:
    """Accuracies of one :func:`evaluate_tasks` run.

    Attributes:
        scores: requested task -> score, in the requested order.
        mmlu_subjects: ``mmlu_<subject>`` -> score; empty unless MMLU was requested.
        average: mean over ``scores`` of each task's headline metric (see :data:`AVERAGE_METRIC`).
        average_acc: mean over ``scores`` of plain ``acc``.
        definitions: ``"offline"`` (local files, this package's definitions) or ``"built-in"`` (lm-eval's, hub data).
        data_source: where the documents came from, in words.
        limit: first documents per task (None: all).
        mmlu_limit_per_subject: first test questions per MMLU subject (None: all).
        lm_eval_version: version of the lm-eval package that ran.
        wall_time_s: seconds for the whole run, task loading included.
    """

    scores: dict[str, TaskScore]
    mmlu_subjects: dict[str, TaskScore] = field(repr=False)
    average: float
    average_acc: float
    definitions: str
    data_source: str
    limit: int | None
    mmlu_limit_per_subject: int | None
    lm_eval_version: str
    wall_time_s: float


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    tasks: Sequence[str] = PAPER_TASKS,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    mmlu_limit_per_subject: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    max_length: int | None = None,
) -> TaskResults:
    """Accuracy of ``model`` on ``tasks`` through lm-eval: commonsense tasks zero-shot, MMLU 5-shot.

    Args:
        model: a causal LM with the usual ``transformers`` forward (pruned or not); used in place, in eval mode.
        tokenizer: its tokenizer; lm-eval sets a pad token on it if it has none.
        tasks: names from :data:`PAPER_TASKS`.
        data_dir: folder holding ``tasks/*.jsonl`` and ``tasks/mmlu``; defaults to ``$FINERCUT_DATA_DIR``. With
            neither, lm-eval's built-in tasks download their data from the hub.
        limit: score only the first ``limit`` documents of each task (None: all).
        mmlu_limit_per_subject: first questions per MMLU subject; None means ``limit``, which lm-eval applies
            to every subject task.
        batch_size: lm-eval's loglikelihood batch size.
        device: where the model must already be; checked, not moved (lm-eval uses an in-memory model where it
            is). None: wherever it is.
        max_length: context length lm-eval truncates to; None: the model config's.

    Returns:
        Per-task accuracies with standard errors, the average, limits, versions and the data source.
    """
    names = _checked_task_names(tasks)
    for name, value in (("limit", limit), ("mmlu_limit_per_subject", mmlu_limit_per_subject)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be a positive number of documents or None, got {value}")
    if mmlu_limit_per_subject is None:
        mmlu_limit_per_subject = limit
    _check_lm_arguments(model, batch_size=batch_size, device=device)
    root = resolve_data_dir(data_dir)
    start = time.perf_counter()
    task_manager, specs, definitions, data_source = _task_definitions(names, root)
    loaded = task_manager.load(specs)
    mmlu_tasks = [task.task_name for task in loaded["groups"][MMLU].get_all_tasks()] if MMLU in names else []
    for name in mmlu_tasks:
        loaded["tasks"][name].set_config(key="num_fewshot", value=MMLU_NUM_FEWSHOT)
    first_n = {name: mmlu_limit_per_subject if name in mmlu_tasks else limit for name in loaded["tasks"]}
    lm = hf_lm(model, tokenizer, batch_size=batch_size, device=device, max_length=max_length)
    raw = run_lm_eval(lm, specs, task_manager=task_manager, leaf_tasks=loaded["tasks"], first_n=first_n)

    scores = {name: _task_score(raw, name) for name in names}
    return TaskResults(
        scores=scores,
        mmlu_subjects={name: _task_score(raw, name) for name in sorted(mmlu_tasks)},
        average=sum(score.headline for score in scores.values()) / len(scores),
        average_acc=sum(score.acc for score in scores.values()) / len(scores),
        definitions=definitions,
        data_source=data_source,
        limit=limit,
        mmlu_limit_per_subject=mmlu_limit_per_subject,
        lm_eval_version=lm_eval_version(),
        wall_time_s=time.perf_counter() - start,
    )


def format_results_table(results: TaskResults, *, mmlu_subjects: bool = False) -> str:
    """Markdown table of ``results``: one row per task with ``value ± stderr``, the average, and the run's setup.

    Args:
        mmlu_subjects: also list each MMLU subject (below the main table).
    """
    header = "| {} | n | shots | acc ± stderr | acc_norm ± stderr | in average | version |"
    rule = "|---|---:|---:|---:|---:|---|---:|"
    lines = [
        header.format("task"),
        rule,
        *(_table_row(score) for score in results.scores.values()),
        f"| **average** of {len(results.scores)} | | | {results.average_acc:.4f} (plain acc) | "
        f"| **{results.average:.4f}** | |",
    ]
    if mmlu_subjects and results.mmlu_subjects:
        lines += ["", header.format("MMLU subject"), rule]
        lines += [_table_row(score) for score in results.mmlu_subjects.values()]
    limits = f"limit {results.limit}" if results.limit is not None else "all documents"
    if results.mmlu_limit_per_subject is not None:
        limits += f", MMLU {results.mmlu_limit_per_subject} per subject"
    lines += [
        "",
        f"Average: {AVERAGE_METRIC}.",
        f"Definitions: {results.definitions} ({results.data_source}); {limits}; lm-eval {results.lm_eval_version}; "
        f"{results.wall_time_s:.0f} s.",
    ]
    return "\n".join(lines)


def hf_lm(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    max_length: int | None = None,
) -> HFLM:
    """lm-eval's HF wrapper around the in-memory ``model`` (not copied, not moved)."""
    _check_lm_arguments(model, batch_size=batch_size, device=device)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                trust_remote_code=False)


def load_builtin(task_manager: TaskManager, names: Sequence[str]) -> list[Task | Group]:
    """lm-eval's built-in tasks/groups ``names``, with their hub datasets; errors say how to run offline."""
    try:
        with no_dataset_scripts():  # loading a task downloads its dataset
            loaded = task_manager.load(list(names))
    except Exception as error:  # datasets raises several types for an unreachable hub
        raise DataError(
            f"could not load lm-eval's built-in tasks {list(names)} from the Hugging Face hub ({error}); "
            "to run offline pass data_dir=<folder with tasks/ and wikitext2/> or set FINERCUT_DATA_DIR"
        ) from error
    return [loaded["groups"][name] if name in loaded["groups"] else loaded["tasks"][name] for name in names]


@contextlib.contextmanager
def no_dataset_scripts() -> Iterator[None]:
    """Have ``datasets`` refuse a hub dataset's loading script instead of running it (or asking on a terminal).

    ``datasets`` 4 and later have no loading scripts at all. Before 4, a dataset loaded without an explicit
    ``trust_remote_code`` (as lm-eval loads its built-in tasks' data) falls back to
    ``datasets.config.HF_DATASETS_TRUST_REMOTE_CODE``, which is set to False here for the duration.
    """
    import datasets.config

    if not hasattr(datasets.config, _DATASETS_TRUST_FLAG):
        yield
        return
    previous = getattr(datasets.config, _DATASETS_TRUST_FLAG)
    setattr(datasets.config, _DATASETS_TRUST_FLAG, False)
    try:
        yield
    finally:
        setattr(datasets.config, _DATASETS_TRUST_FLAG, previous)


_DATASETS_TRUST_FLAG = "HF_DATASETS_TRUST_REMOTE_CODE"


def run_lm_eval(
    lm: HFLM,
    specs: Sequence[Task | Group],
    *,
    task_manager: TaskManager,
    leaf_tasks: dict[str, Task],
    first_n: dict[str, int | None],
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on ready task objects; ``first_n[task]`` limits a leaf task to its first documents.

    lm-eval's own ``limit`` is one number for all tasks; its ``samples`` (document indices per task) lets MMLU
    subjects and the other tasks have different limits in one run.
    """
    samples = {
        name: list(range(min(n, len(task.eval_docs))))
        for name, task in leaf_tasks.items()
        if (n := first_n.get(name)) is not None
    }
    return simple_evaluate(
        model=lm,
        tasks=list(specs),
        task_manager=task_manager,
        samples=samples or None,
        log_samples=False,
        # lm-eval would reseed the caller's global RNGs; loglikelihood scoring draws no random numbers, and the
        # few-shot sampler keeps its own seeded generator (fewshot_random_seed).
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
    )


def _check_lm_arguments(model: torch.nn.Module, *, batch_size: int, device: str | torch.device | None) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    model_device = next(model.parameters()).device
    if device is not None and torch.device(device) != model_device:
        raise ConfigError(f"the model is on {model_device}, not {device}; move it first (lm-eval does not)")


def lm_eval_version() -> str:
    return importlib.metadata.version("lm_eval")


def _checked_task_names(tasks: Sequence[str]) -> list[str]:
    """``tasks`` as a list, failing early on unknown or repeated names."""
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = [name for name in tasks if name not in PAPER_TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; known tasks: {', '.join(PAPER_TASKS)}")
    if len(set(tasks)) != len(tasks) or not tasks:
        raise ConfigError(f"tasks must be distinct and non-empty, got {list(tasks)}")
    return list(tasks)


def _task_definitions(names: Sequence[str], root: Path | None) -> tuple[TaskManager, list[Task | Group], str, str]:
    """Task manager, task objects, ``definitions`` and ``data_source`` for ``names``: offline if ``root`` is set."""
    if root is None:
        task_manager = TaskManager()
        return task_manager, load_builtin(task_manager, names), "built-in", "hub datasets of lm-eval's built-in tasks"
    tasks_dir = root / "tasks"
    specs = [mmlu_group(tasks_dir / "mmlu") if name == MMLU else commonsense_task(name, tasks_dir) for name in names]
    # Without the built-in index: the task objects are complete, and indexing 14k YAML files takes ~10 s.
    return TaskManager(include_defaults=False), specs, "offline", f"local files under {tasks_dir}"


def _task_score(raw: dict[str, Any], name: str) -> TaskScore:
    """The score of task or group ``name`` from a ``simple_evaluate`` result."""
    is_group = name in raw.get("groups", {})
    metrics = raw["groups"][name] if is_group else raw["results"][name]
    if f"acc,{_FILTER}" not in metrics:
        raise KeyError(f"lm-eval reported no accuracy for {name}: {sorted(metrics)}")
    return TaskScore(
        task=name,
        acc=float(metrics[f"acc,{_FILTER}"]),
        acc_stderr=_stderr(metrics.get(f"acc_stderr,{_FILTER}")),
        acc_norm=float(metrics[f"acc_norm,{_FILTER}"]) if f"acc_norm,{_FILTER}" in metrics else None,
        acc_norm_stderr=_stderr(metrics.get(f"acc_norm_stderr,{_FILTER}")),
        num_samples=int(metrics["sample_len"]) if is_group else int(raw["n-samples"][name]["effective"]),
        num_fewshot=int(raw["n-shot"][name]),
        version=str(raw["versions"][name]),
    )


def _stderr(value: Any) -> float | None:
    """lm-eval's stderr as a float; None for its "N/A" (or a missing or non-finite value)."""
    if value is None or isinstance(value, str):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _table_row(score: TaskScore) -> str:
    acc_norm = "—" if score.acc_norm is None else _with_stderr(score.acc_norm, score.acc_norm_stderr)
    return (
        f"| {score.task} | {score.num_samples} | {score.num_fewshot} | {_with_stderr(score.acc, score.acc_stderr)} "
        f"| {acc_norm} | {score.headline_metric} | {score.version} |"
    )


def _with_stderr(value: float, stderr: float | None) -> str:
    return f"{value:.4f} ± {'n/a' if stderr is None else f'{stderr:.4f}'}"
