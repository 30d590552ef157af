"""Recovery without fine-tuning on SmolLM2-135M: WikiText-2 test perplexity, fitting seconds, extra parameters.

    python benchmarks/recovery_quality.py --data-dir ../shared/data --output runs/recovery.jsonl

Applies a fixed list of removals (default: FinerCut's 15 sub-layers at 25% on SmolLM2-135M-Instruct, from
docs/results.md) to the dense model, once plainly and once per recovery variant, and measures each variant's
perplexity on the first ``--max-windows`` windows of 2048 tokens of WikiText-2 test (``all``: the whole test set),
the method of docs/results.md. Calibration for the fits: ``--samples`` random windows of ``--seq-len`` tokens of
the WikiText-2 validation split (seed 0), never the test text. One JSON line per variant is appended to
``--output``; variants already there are not measured again. Ends with a Markdown table.

``--eval validation`` scores on held-out WikiText-2 *validation* windows instead (4 windows of 512 tokens, seed
123, drawn like the calibration windows but with another seed): for choosing options (ridge, rank, target)
without looking at the test text.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from finercut import apply_removal, parameter_stats, recover
from finercut.calibration import calibration_samples, resolve_source
from finercut.candidates import Unit
from finercut.evaluation import windowed_perplexity
from finercut.modelio import load_model, load_tokenizer, resolve_model_source

FINERCUT_25 = ("25.attn 26.attn 22.attn 12.attn 29.attn 17.attn 16.ffn 13.ffn 14.attn 14.ffn 13.attn 12.ffn "
               "27.ffn 25.ffn 26.ffn")
VARIANTS = {
    # name: recover() options (None: plain removal)
    "none": None,
    "bias": dict(method="bias"),
    "bias-dense": dict(method="bias", target="dense"),
    "lowrank64": dict(method="lowrank", rank=64),
    "lowrank64-dense": dict(method="lowrank", rank=64, target="dense"),
    "lowrank64-run-dense": dict(method="lowrank", rank=64, group="run", target="dense"),
    "lowrank128": dict(method="lowrank", rank=128),
    "lowrank64-ridge1": dict(method="lowrank", rank=64, ridge=1.0),
    "lowrank64-ridge10": dict(method="lowrank", rank=64, ridge=10.0),
    "lowrank128-ridge10": dict(method="lowrank", rank=128, ridge=10.0),
    "linear-run-ridge1": dict(method="linear", group="run", ridge=1.0),
    "linear-run-ridge10": dict(method="linear", group="run", ridge=10.0),
    "linear-run-ridge100": dict(method="linear", group="run", ridge=100.0),
    "linear-ridge10": dict(method="linear", ridge=10.0),
    "lowrank256-run": dict(method="lowrank", rank=256, group="run"),
    "linear-run": dict(method="linear", group="run"),
    "linear-run-dense": dict(method="linear", group="run", target="dense"),
    "linear": dict(method="linear"),
    "linear-dense": dict(method="linear", target="dense"),
    "fold-sublayer": dict(method="fold", target="sublayer"),
    "fold-dense": dict(method="fold", target="dense"),
    "fold-sublayer-ridge10": dict(method="fold", target="sublayer", ridge=10.0),
    "fold-dense-ridge10": dict(method="fold", target="dense", ridge=10.0),
}


def parse_units(text: str) -> list[Unit]:
    """``"25.attn 16.ffn"`` -> units."""
    units = []
    for item in text.split():
        block, kind = item.split(".")
        units.append(Unit(int(block), "attention" if kind == "attn" else kind))
    return units


@torch.inference_mode()
def held_out_perplexity(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """``exp`` of the mean next-token cross-entropy over ``[windows, seq]`` token ids, in one forward."""
    logits = model(input_ids).logits
    return math.exp(float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                            input_ids[:, 1:].reshape(-1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--output", required=True, help="JSON lines file (appended)")
    parser.add_argument("--removed", default=FINERCUT_25, help="sub-layers to remove, e.g. '25.attn 16.ffn'")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    parser.add_argument("--max-windows", default="20", help="perplexity windows of 2048 tokens, or all")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of the fit")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2, help="perplexity windows per forward")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval", choices=("test", "validation"), default="test",
                        help="test: windowed WikiText-2 test perplexity; validation: held-out validation windows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    max_windows = None if args.max_windows == "all" else int(args.max_windows)
    output = Path(args.output)
    done = set()
    if output.exists():
        done = {(row["variant"], row["max_windows"], row.get("eval", "test"))
                for row in map(json.loads, output.read_text().splitlines())}

    source = resolve_model_source(None)
    tokenizer = load_tokenizer(source)
    dense, _ = load_model(source, dtype="float32", device="cpu")
    dense_parameters = parameter_stats(dense).total_parameters
    units = parse_units(args.removed)
    held_out = None
    if args.eval == "validation":
        held_out, _ = calibration_samples(tokenizer, resolve_source("wikitext2", args.data_dir), num_samples=4,
                                          seq_len=512, seed=123)
    for name in args.variants.split(","):
        if (name, max_windows, args.eval) in done:
            print(f"{name}: already measured")
            continue
        options = VARIANTS[name]
        model = copy.deepcopy(dense)
        row = {"variant": name, "options": options, "removed": args.removed, "max_windows": max_windows,
               "threads": args.threads, "eval": args.eval, "samples": args.samples, "seq_len": args.seq_len}
        if options is None:
            apply_removal(model, units)
            row.update(fit_seconds=0.0, extra_parameters=0)
        else:
            _, result = recover(model, units, tokenizer=tokenizer, data_dir=args.data_dir, num_samples=args.samples,
                                seq_len=args.seq_len, **options)
            row.update(fit_seconds=result.seconds, extra_parameters=result.extra_parameters,
                       replacements=len(result.replacements or result.folds), calibration_tokens=result.tokens,
                       calibration=result.calibration["description"])
        row["parameters"] = parameter_stats(model).total_parameters
        row["dense_parameters"] = dense_parameters
        started = time.perf_counter()
        if held_out is None:
            ppl = windowed_perplexity(model, tokenizer, data_dir=args.data_dir, max_windows=max_windows,
                                      batch_size=args.batch_size)
            row.update(ppl=ppl.ppl, windows=ppl.num_windows)
        else:
            row.update(ppl=held_out_perplexity(model, held_out), windows=held_out.shape[0])
        row["ppl_seconds"] = time.perf_counter() - started
        print(json.dumps(row), flush=True)
        with output.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        del model

    rows = [json.loads(line) for line in output.read_text().splitlines()]
    print("| variant | eval | windows | ppl | extra parameters (% of dense) | fit seconds |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row.get('eval', 'test')} | {row['windows']} | {row['ppl']:.2f} | "
              f"{row['extra_parameters']:,} "
              f"({row['extra_parameters'] / row['dense_parameters']:.2%}) | {row['fit_seconds']:.1f} |")


if __name__ == "__main__":
    main()
