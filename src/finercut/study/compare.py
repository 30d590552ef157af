"""The paper's comparison in one command: prune with each method, evaluate every ratio, write table and plots.

The methods are the ``compare`` entries the registered methods declare (:mod:`finercut.methods`). A method whose
runs are prefixes of longer ones (greedy and one-shot methods) is pruned once, to its largest ratio; a method that
selects anew per target (DeeperLayers) is pruned per ratio. Every model is evaluated masked (the same stand-in
modules a physically pruned model holds); evaluations are cached on disk by the exact set of removed sub-layers
and the evaluation settings, so reruns and methods that remove the same set reuse them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from finercut.adapters import adapter_for
from finercut.candidates import Unit, count_units, removed_sublayers, target_count
from finercut.distances import METRICS
from finercut.errors import ConfigError
from finercut.jsonio import read_json, write_json_atomic
from finercut.methods import CompareEntry, Method, compare_entries, method_named
from finercut.methods.base import options_from_dict
from finercut.modelio import load_config, load_model, load_tokenizer, resolve_model_source
from finercut.plots import plot_layer_map, plot_metric_vs_ratio
from finercut.record import Record, RunConfig, config_differences, read_record, read_run_config, removal_summary
from finercut.recovery import DEFAULT_NUM_SAMPLES as DEFAULT_RECOVERY_SAMPLES
from finercut.recovery import DEFAULT_SEQ_LEN as DEFAULT_RECOVERY_SEQ_LEN
from finercut.recovery import FOLD, FOLD_TARGET, check_foldable, masked_with_replacements, parse_recovery_spec
from finercut.run import resolve_run_config, run_in_folder
from finercut.study.table import compare_series, recovery_table, results_table

Log = Callable[[str], None]

DEFAULT_PROMPTS = (
    "The capital of France is",
    "In 1969, the first humans to walk on the Moon",
    "The best way to learn a new programming language is",
)
LEGACY_CONFIG_FIELDS = {"shapley_permutations": ("shapley", "permutations"),
                        "shapley_truncation": ("shapley", "truncation")}
"""compare.json fields of an older finercut, and the method option each became."""


def entry_named(name: str) -> tuple[Method, CompareEntry]:
    entries = compare_entries()
    if name not in entries:
        raise ConfigError(f"unknown methods {[name]}; choose from {', '.join(entries)}")
    return entries[name]


@dataclass(frozen=True)
class CompareConfig:
    """Everything ``finercut compare`` needs; written as ``compare.json`` next to its results."""

    model: str | None = None
    methods: tuple[str, ...] = ("finercut", "finercut_block", "shortgpt", "deeper_layers")
    ratios: tuple[float, ...] = (0.0, 0.1, 0.25, 0.4)
    metric: str = "js"
    data_dir: str | None = None
    calibration: str = "wikitext2"
    num_samples: int = 10
    seq_len: int = 256
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    eval_threads: int | None = None
    """CPU threads for the evaluations (default: the pruning runs'); not part of any run's settings."""
    tasks: tuple[str, ...] = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                              "openbookqa", "mmlu")
    limit: int | None = 200
    mmlu_limit_per_subject: int | None = 3
    ppl_window: int = 2048
    ppl_max_windows: int | None = None
    lm_eval_wikitext_docs: int | None = 5
    eval_batch_size: int = 4
    stats_ratio: float = 0.25
    stats_context: int = 2048
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    recoveries: tuple[str, ...] = ()
    """Recovery variants of every primary entry's model (:func:`finercut.recovery.parse_recovery_spec`: ``bias``,
    ``linear``, ``lowrank64``, each optionally ``-run``), fitted on ``recovery_samples`` windows of
    ``recovery_seq_len`` tokens of the calibration text (the WikiText-2 validation split by default)."""
    recovery_samples: int = DEFAULT_RECOVERY_SAMPLES
    recovery_seq_len: int = DEFAULT_RECOVERY_SEQ_LEN
    method_options: dict = field(default_factory=dict)
    """Per method name, its own options (e.g. ``{"shapley": {"permutations": 20}}``) for its runs only."""
    equal_budget: bool = False
    """Also evaluate primary entries (FinerCut) at the sub-layer count the block methods remove (2 round(r L),
    e.g. 16 of 60 at 25% of 30 blocks, where FinerCut's own round(2 r L) is 15), so the comparison holds at
    equal budgets."""

    def __post_init__(self) -> None:
        for spec in self.methods:
            entry_named(split_method(spec, self.ratios)[0])
        own = [r for spec in self.methods for r in split_method(spec, ())[1]]
        bad = [r for r in (*self.ratios, *own) if not 0.0 <= r < 1.0]
        if bad:
            raise ConfigError(f"ratios must be in [0, 1) (0 = the dense model), got {bad}")
        if self.metric not in METRICS:
            raise ConfigError(f"compare's metric is FinerCut's output distance, one of {', '.join(METRICS)}; for "
                              "BlockPruner's perplexity score add blockpruner to the methods")
        for spec in self.recoveries:
            parse_recovery_spec(spec)
        for name, options in self.method_options.items():
            options_from_dict(method_named(name).options, options, name)
        primary = [entry.name for _, entry in compare_entries().values() if entry.primary]
        if (self.recoveries or self.equal_budget) and not any(self.entry(spec)[1].primary for spec in self.methods):
            raise ConfigError(f"recoveries and the equal-budget rows apply to {', '.join(primary)}: add it to the "
                              "methods")
        if not self.methods or not all(any(r > 0 for r in self.method_ratios(spec)) for spec in self.methods):
            raise ConfigError("compare needs at least one method and one ratio above 0 for each")

    def entry(self, spec: str) -> tuple[Method, CompareEntry]:
        return entry_named(split_method(spec, ())[0])

    def method_ratios(self, spec: str) -> tuple[float, ...]:
        """The ratios above 0 a method entry is evaluated at (its own after ``@``, else ``ratios``), sorted."""
        return tuple(sorted(r for r in split_method(spec, self.ratios)[1] if r > 0))

    def evaluation_settings(self) -> dict:
        """The settings an evaluation result depends on (beyond the removed sub-layers)."""
        keys = ("data_dir", "dtype", "tasks", "limit", "mmlu_limit_per_subject", "ppl_window", "ppl_max_windows",
                "lm_eval_wikitext_docs", "eval_batch_size")
        return {key: getattr(self, key) for key in keys}

    def recovery_settings(self, spec: str) -> dict:
        """What a recovered variant's evaluation depends on beyond the removed sub-layers and the evaluation."""
        settings = {"recovery": spec, "calibration": self.calibration, "num_samples": self.recovery_samples,
                    "seq_len": self.recovery_seq_len, "seed": self.seed}
        if spec == FOLD:
            settings["target"] = FOLD_TARGET
        return settings

    def run_config(self, name: str, ratio: float) -> RunConfig:
        """The run of compare entry ``name`` at ``ratio``."""
        method, entry = entry_named(name)
        return RunConfig(
            model=self.model, dtype=self.dtype, device=self.device, method=method.name,
            granularity=entry.granularity, only=entry.only, metric=self.metric, ratio=ratio,
            data_dir=self.data_dir, calibration=self.calibration,
            num_samples=self.num_samples, seq_len=self.seq_len, seed=self.seed, threads=self.threads,
            save_model=False, options=self.method_options.get(method.name),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CompareConfig":
        """``compare.json`` of this or an older finercut (Shapley's settings were fields of their own)."""
        data = dict(data)
        options: dict = {name: dict(value) for name, value in (data.pop("method_options", None) or {}).items()}
        for name in list(data):
            if name in LEGACY_CONFIG_FIELDS:
                method, option = LEGACY_CONFIG_FIELDS[name]
                value = data.pop(name)
                if value != getattr(method_named(method).options(), option):
                    options.setdefault(method, {})[option] = value
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**values, method_options=options)


@dataclass(frozen=True)
class Variant:
    """One evaluated model: a method at a ratio (ratio 0: the dense model)."""

    method: str
    """The compare entry (``finercut``, ``finercut_block``, ...), or ``dense``."""
    ratio: float
    removed: tuple[Unit, ...]
    summary: dict = field(default_factory=dict)
    recovery: str | None = None
    """A recovery spec (``linear-run``, ...): the removed sub-layers are replaced by maps fitted for them."""
    equal_budget: bool = False
    """A primary entry at the block methods' sub-layer count for ``ratio`` instead of its own."""

    @property
    def sublayers(self) -> list[Unit]:
        return sorted(removed_sublayers(self.removed), key=lambda unit: unit.sort_key)

    @property
    def plain(self) -> bool:
        """A method at its own budget, without recovery (what the figures' layer maps and statistics show)."""
        return self.recovery is None and not self.equal_budget

    @property
    def label(self) -> str:
        if self.method == "dense":
            return "Dense"
        return entry_named(self.method)[1].label + (f" + {self.recovery}" if self.recovery else "")


def split_method(spec: str, ratios: Sequence[float]) -> tuple[str, tuple[float, ...]]:
    """A ``--methods`` entry: ``name`` (evaluated at ``ratios``) or ``name@r1/r2`` (at its own ratios).

    >>> split_method("finercut_attention@0.33", (0.0, 0.25))
    ('finercut_attention', (0.33,))
    """
    name, _, own = spec.partition("@")
    try:
        return name, tuple(float(r) for r in own.split("/")) if own else tuple(ratios)
    except ValueError:
        raise ConfigError(f"method entry {spec!r}: write name@r1/r2 with ratios in (0, 1), e.g. "
                          "finercut_attention@0.33") from None


def result_key(variant: Variant, settings: dict, recovery: dict | None = None) -> str:
    """Cache key of an evaluation: the set of removed sub-layers, the evaluation settings and (for a recovered
    variant) the recovery's settings."""
    payload = {"removed": [u.to_dict() for u in variant.sublayers], "settings": settings}
    if recovery is not None:
        payload["recovery"] = recovery
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def prune_variants(config: CompareConfig, output_dir: Path, *, progress: bool, log: Log) -> list[Variant]:
    """Run (or reuse) every method's pruning and list the variants to evaluate, dense first."""
    records: dict[str, dict[float, Record]] = {}
    for spec in config.methods:
        name, ratios = split_method(spec, ())[0], config.method_ratios(spec)
        runs = run_folders(output_dir, name, ratios)
        records[spec] = {run_ratio: _pruned_record(config, name, run_ratio, folder, progress=progress, log=log)
                         for run_ratio, folder in runs}
        if config.entry(spec)[1].primary and config.equal_budget:  # the block methods' count may exceed its own
            num_blocks = records[spec][max(ratios)].num_blocks
            needed = max(2 * target_count(r, num_blocks) for r in ratios)
            if len(records[spec][max(ratios)].steps) < needed:
                records[spec][max(ratios)] = _pruned_record(config, name, max(ratios), runs[0][1], count=needed,
                                                            progress=progress, log=log)
    return list_variants(config, records)


def run_folders(output_dir: Path, name: str, ratios: Sequence[float]) -> list[tuple[float, Path]]:
    """Where an entry's runs live: one per ratio where each is selected anew, else one at the largest ratio."""
    method, _ = entry_named(name)
    if not method.prefix_consistent:
        return [(ratio, output_dir / "runs" / f"{name}-r{ratio:g}") for ratio in ratios]
    return [(max(ratios), output_dir / "runs" / name)]


def list_variants(config: CompareConfig, records: dict[str, dict[float, Record]]) -> list[Variant]:
    """The variants to evaluate, dense first, from each ``--methods`` entry's records (run ratio -> record; a
    prefix-consistent method has one, at its largest ratio). Entries without records are left out."""
    variants = [Variant("dense", 0.0, ())] if 0.0 in config.ratios else []
    for spec, by_ratio in records.items():
        if not by_ratio:
            continue
        name = split_method(spec, ())[0]
        _, entry = entry_named(name)
        for ratio in config.method_ratios(spec):
            record = by_ratio.get(ratio, by_ratio[max(by_ratio)])
            num_blocks = record.num_blocks
            counts = [(target_count(ratio, count_units(num_blocks, entry.granularity, entry.only)), False)]
            if entry.primary and config.equal_budget and 2 * target_count(ratio, num_blocks) != counts[0][0]:
                counts.append((2 * target_count(ratio, num_blocks), True))
            for count, equal_budget in counts:
                kept = tuple(record.removed[:count])
                summary = removal_summary(kept, num_blocks=num_blocks, granularity=entry.granularity)
                variants.append(Variant(name, ratio, kept, summary, equal_budget=equal_budget))
                if entry.primary and not equal_budget:
                    variants += [Variant(name, ratio, kept, summary, recovery=recovery)
                                 for recovery in config.recoveries]
    return variants


def _pruned_record(config: CompareConfig, name: str, ratio: float, folder: Path, *, progress: bool,
                   log: Log, count: int | None = None) -> Record:
    """The record of entry ``name`` pruned to ``ratio`` (or to ``count`` units) in ``folder``: reused if the folder
    already holds the same run taken at least that far (a greedy run holds every shorter one as its prefix), else
    run or extended."""
    method, entry = entry_named(name)
    run_config = config.run_config(name, ratio)
    if count is not None:
        run_config = run_config.replace(ratio=None, count=count)
    if (folder / "record.json").is_file() and method.prefix_consistent:
        saved = read_run_config(folder / "run.json")
        record = read_record(folder)
        needed = count or target_count(ratio, count_units(record.num_blocks, saved.granularity, saved.only))
        if not config_differences(saved, resolve_run_config(run_config, saved)) and len(record.steps) >= needed:
            log(f"compare: reusing {name} run in {folder} ({len(record.steps)} units removed)")
            return record
    log(f"compare: pruning with {name} to " + (f"{count} units" if count else f"ratio {ratio:g}") + f" in {folder}")
    return run_in_folder(run_config, folder, progress=progress, log=log).record


def evaluate_variant(model, tokenizer, variant: Variant, config: CompareConfig, results_dir: Path,
                     log: Log) -> dict:
    """Evaluate one variant (masked), stage by stage, saving after each stage; reuse what is on disk."""
    from finercut.evaluation import evaluate_tasks, lm_eval_wikitext_perplexity, windowed_perplexity

    settings = config.evaluation_settings()
    recovery = config.recovery_settings(variant.recovery) if variant.recovery else None
    path = results_dir / f"{result_key(variant, settings, recovery)}.json"
    result = read_json(path) if path.exists() else {
        "removed_sublayers": [u.to_dict() for u in variant.sublayers], "settings": settings, "stages": {},
        **({"recovery": recovery} if recovery else {}),
    }
    if "parameters" not in result:
        result["parameters"] = _removed_parameters(model, variant.sublayers)
        write_json_atomic(path, result)
    stages = {
        "windowed_perplexity": lambda: dataclasses.asdict(windowed_perplexity(
            model, tokenizer, data_dir=config.data_dir, window_length=config.ppl_window,
            max_windows=config.ppl_max_windows)),
        "lm_eval_wikitext": lambda: dataclasses.asdict(lm_eval_wikitext_perplexity(
            model, tokenizer, data_dir=config.data_dir, limit=config.lm_eval_wikitext_docs)),
        "tasks": lambda: _task_results_dict(evaluate_tasks(
            model, tokenizer, tasks=config.tasks, data_dir=config.data_dir, limit=config.limit,
            mmlu_limit_per_subject=config.mmlu_limit_per_subject, batch_size=config.eval_batch_size)),
    }
    adapter = adapter_for(model)
    missing = [name for name in stages if name not in result["stages"]]
    replacements: list = []
    if variant.recovery and missing:  # fitted again for every invocation that still has stages to run
        replacements = _fit_recovery(model, tokenizer, variant, config, result, path, log)
    for name in missing:
        log(f"compare: {variant.label} @ {variant.ratio:g} ({len(variant.sublayers)} sub-layers): {name}")
        started = time.perf_counter()
        with masked_with_replacements(model, adapter, variant.removed, replacements):
            value = stages[name]()
        result["stages"][name] = {**value, "seconds": time.perf_counter() - started}
        write_json_atomic(path, result)
    return result


def _removed_parameters(model, sublayers: Sequence[Unit]) -> dict:
    """Parameters of the dense model and of the sub-layers a variant removes (their modules and own norms)."""
    from finercut.budgets import sublayer_parameters

    per_unit = sublayer_parameters(model)
    return {"dense": sum(p.numel() for p in model.parameters()), "removed": sum(per_unit[u] for u in sublayers)}


def _fit_recovery(model, tokenizer, variant: Variant, config: CompareConfig, result: dict, path: Path,
                  log: Log) -> list:
    """Fit ``variant``'s replacements on the dense model; the first fit's cost is kept in the result."""
    from finercut.recovery import fit_recovery, fold_plan, recovery_samples, unrecovered_note

    options = parse_recovery_spec(variant.recovery)
    input_ids, _ = recovery_samples(tokenizer, input_ids=None, calibration=config.calibration,
                                    data_dir=config.data_dir, num_samples=config.recovery_samples,
                                    seq_len=config.recovery_seq_len, seed=config.seed)
    log(f"compare: {variant.label} @ {variant.ratio:g}: fitting on {input_ids.numel()} tokens")
    replacements, errors, seconds = fit_recovery(model, list(variant.removed), input_ids, **options)
    if options["method"] == FOLD:
        for run in fold_plan(variant.removed, num_blocks=adapter_for(model).num_blocks(model))[1]:
            log(unrecovered_note(run))
    if "fit" not in result:
        result["fit"] = {"seconds": seconds, "tokens": int(input_ids.numel()),
                         "extra_parameters": sum(r.parameters for r in replacements), "errors": errors}
        write_json_atomic(path, result)
    return replacements


def _task_results_dict(results) -> dict:
    data = dataclasses.asdict(results)
    data.pop("mmlu_subjects", None)
    return data


def run_compare(config: CompareConfig, output_dir: str | Path, *, report: str | Path | None = None,
                command: str = "", progress: bool = True, log: Log = print,
                shard: tuple[int, int] | None = None) -> Path | None:
    """Prune with every method, evaluate every variant, and write the report (Markdown + figures).

    Args:
        shard: ``(i, n)``: only evaluate every n-th variant starting at the i-th, and write no report. Run n
            shards side by side (e.g. one thread each), then once without a shard to assemble the report from
            the results they left on disk.

    Returns:
        The report's path (None for a shard).
    """
    from finercut.calibration import resolve_data_dir, resolve_source
    from finercut.run import check_output_location

    output_dir = Path(output_dir).expanduser().resolve()
    check_output_location(output_dir)  # refused before anything is written: the folder, the model, the data
    source = resolve_model_source(config.model)
    if FOLD in config.recoveries:
        check_foldable(load_config(source))  # from the config alone, before any pruning
    resolve_source(config.calibration, resolve_data_dir(config.data_dir))
    if report is not None:
        check_output_location(Path(report).expanduser().resolve().parent)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / "compare.json", config.to_dict())
    started = time.perf_counter()
    variants = prune_variants(config, output_dir, progress=progress, log=log)

    first_run = next(iter(sorted((output_dir / "runs").glob("*/run.json"))))
    run = read_run_config(first_run)
    torch.set_num_threads(config.eval_threads or run.threads)
    source = resolve_model_source(run.model, run.revision)
    tokenizer = load_tokenizer(source)
    model, model_info = load_model(source, dtype=run.dtype, device=run.device)
    if shard is not None:
        index, count = shard
        for variant in variants[index::count]:
            evaluate_variant(model, tokenizer, variant, config, output_dir / "results", log)
        log(f"compare: shard {index + 1}/{count} done")
        return None
    results = [evaluate_variant(model, tokenizer, v, config, output_dir / "results", log) for v in variants]
    stats_rows, samples = _stats_and_samples(model, tokenizer, variants, config, output_dir, log)

    report_path = Path(report) if report else output_dir / "results.md"
    figures = _figures(variants, results, report_path.parent / "figures", output_dir)
    first_record = read_record(first_run.parent)
    calibration = first_record.calibration["description"]
    if run.data_dir and config.data_dir:  # the data folder as the command gave it, not this machine's absolute path
        calibration = calibration.replace(run.data_dir, config.data_dir)
    text = format_report(config, variants, results, stats_rows, samples, figures, report_path.parent,
                         model_info=model_info, run=run, num_blocks=first_record.num_blocks,
                         calibration=calibration, command=command,
                         wall_seconds=time.perf_counter() - started)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(text, encoding="utf-8")
    log(f"compare: report written to {report_path}")
    return report_path


def _stats_and_samples(model, tokenizer, variants: Sequence[Variant], config: CompareConfig, output_dir: Path,
                       log: Log):
    """Table-3 statistics (dense vs each method at ``stats_ratio``, physically pruned) and text samples."""
    from finercut.checkpoint import apply_removal
    from finercut.evaluation.stats import greedy_samples, model_stats

    chosen = [v for v in variants if v.method == "dense"]
    chosen += [v for v in variants if v.method != "dense" and v.ratio == config.stats_ratio and v.plain]
    key = json.dumps({"model": config.model, "context": config.stats_context, "prompts": config.prompts,
                      "variants": {v.method: [u.to_dict() for u in v.sublayers] for v in chosen}}, sort_keys=True)
    cache = output_dir / "results" / f"stats-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cache.exists():
        saved = read_json(cache)
        return saved["stats"], saved["samples"]
    log(f"compare: model statistics and samples (dense vs ratio {config.stats_ratio:g})")
    pruned_models = {}
    for variant in chosen:
        pruned = copy.deepcopy(model)
        if variant.removed:
            apply_removal(pruned, variant.removed)
        pruned_models[_variant_label(variant)] = pruned
    context = min(config.stats_context, getattr(model.config, "max_position_embeddings", None) or config.stats_context)
    stats = [row.to_dict() for row in model_stats(pruned_models, context_length=context)]
    samples = {name: greedy_samples(m, tokenizer, config.prompts) for name, m in pruned_models.items()}
    write_json_atomic(cache, {"stats": stats, "samples": samples})
    return stats, samples


def _figures(variants, results, figures_dir: Path, output_dir: Path) -> dict[str, Path]:
    accuracy, perplexity = compare_series(variants, results)
    figures = {
        "accuracy": plot_metric_vs_ratio(accuracy, figures_dir / "compare_accuracy.png",
                                         ylabel="average accuracy (%)", title="Average zero/few-shot accuracy"),
        "perplexity": plot_metric_vs_ratio(perplexity, figures_dir / "compare_perplexity.png",
                                           ylabel="WikiText-2 perplexity (log)", title="WikiText-2 perplexity",
                                           log_y=True),
    }
    for variant in variants:
        if variant.method != "dense" and entry_named(variant.method)[1].primary and variant.removed and variant.plain:
            record = read_record(output_dir / "runs" / variant.method).prefix(len(variant.removed))
            path = figures_dir / f"layer_map_{variant.method}_r{variant.ratio:g}.png"
            key = "layer_map" if variant.method == "finercut" else f"layer_map_{variant.method}"
            figures[f"{key}_{variant.ratio:g}"] = plot_layer_map(list(variant.removed), record.num_blocks, path,
                                                                 title=record.title())
    return figures


def _stage_minutes(results: Sequence[dict]) -> float:
    """Minutes the evaluations took when they ran, summed over every variant and stage."""
    return sum(stage["seconds"] for result in results for stage in result["stages"].values()) / 60


def _variant_label(variant: Variant) -> str:
    return variant.label if variant.method == "dense" else f"{variant.label} {variant.ratio:.0%}"


def format_report(config, variants, results, stats_rows, samples, figures, report_dir: Path, *, model_info, run,
                  num_blocks: int, calibration: str, command: str, wall_seconds: float) -> str:
    """The Markdown report: setup, Table-1-style results, figures, Table-3-style statistics, text samples."""
    import lm_eval
    import transformers

    from finercut.version import __version__

    tasks = list(config.tasks)
    lines = [
        f"# FinerCut vs. baselines on {model_info['id']}",
        "",
        "Produced by:",
        "",
        "```",
        command or "finercut compare ...",
        "```",
        "",
        f"- model: `{model_info['id']}` ({model_info['architecture']}, {num_blocks} blocks), "
        f"{run.dtype} on {run.device}, {run.threads} threads",
        f"- calibration: {run.num_samples} random windows of {run.seq_len} tokens (seed {run.seed}) of {calibration}; "
        f"FinerCut metric `{config.metric}`",
        f"- tasks: first {config.limit or 'all'} documents of each zero-shot task"
        + (f"; MMLU 5-shot: first {config.mmlu_limit_per_subject or config.limit or 'all'} questions of each of its "
           "57 subjects" if "mmlu" in config.tasks else "")
        + f"; lm-eval {lm_eval.__version__}"
        + (", offline task definitions reading the local data files" if config.data_dir else ", hub datasets"),
        f"- perplexity (a): WikiText-2 test joined with blank lines, consecutive windows of {config.ppl_window} "
        f"tokens ({'all' if config.ppl_max_windows is None else f'first {config.ppl_max_windows}'} windows); "
        f"(b): lm-eval `wikitext` word perplexity on the first {config.lm_eval_wikitext_docs} documents, rebuilt "
        "from the local rows at their top-level headings",
        f"- finercut {__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}; evaluation compute {_stage_minutes(results):.0f} min summed over "
        f"all stages (this invocation: {wall_seconds / 60:.0f} min; results already on disk are reused)",
        "",
        "The full evaluation, for a GPU: `finercut compare --model <hub id or folder> --ratios 0,0.1,0.25,0.4 "
        "--limit all --mmlu-limit all --wikitext-docs all --device cuda --batch-size 16 --output runs/full "
        "--report docs/full.md` (add `--data-dir` to read the local files instead of the hub).",
        "",
        "Accuracy is `acc_norm` where lm-eval reports it (ARC, HellaSwag, OBQA, PIQA), else `acc`; ± is lm-eval's "
        "standard error; the average is over the tasks shown. The ratio reached counts removed sub-layers / 2L "
        "(a removed block counts 2). Plain `acc` for every task follows in the second table.",
        "",
        *results_table(variants, results, tasks, headline=True).markdown(),
        "",
        "Plain `acc` (no length normalisation):",
        "",
        *results_table(variants, results, tasks, headline=False).markdown(),
    ]
    recovered = recovery_table(variants, results)
    if recovered is not None:
        lines += ["", "Recovery without fine-tuning: perplexity (a) without and with the fitted replacements, the "
                  "part of the gap to the dense model they close, their parameters (of the dense model's) and the "
                  "fit's time on this machine (closed form, one pass over the calibration tokens):", "",
                  *recovered.markdown()]
    lines += ["", "## Figures", ""]
    for name, path in figures.items():
        lines.append(f"![{name}]({path.relative_to(report_dir).as_posix()})")
        lines.append("")
    from finercut.evaluation.stats import ModelStats, format_stats_table

    lines += [
        f"## Model statistics (dense vs. {config.stats_ratio:.0%} pruned, physically removed)", "",
        f"MACs for a {config.stats_context}-token forward pass counted from the architecture; latency is the median "
        f"forward time of one {config.stats_context}-token sequence and generation is greedy with the KV cache, "
        "measured side by side in one process on this machine's CPU.", "",
        format_stats_table([ModelStats(**row) for row in stats_rows]), "",
        "## Text samples (greedy)", "",
    ]
    for i, prompt in enumerate(config.prompts):
        lines.append(f"**Prompt:** {prompt}")
        lines.append("")
        for label, texts in samples.items():
            lines.append(f"- *{label}:* {texts[i].strip()}")
        lines.append("")
    return "\n".join(lines) + "\n"
