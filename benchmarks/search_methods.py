"""Greedy vs the searches over whole removal sets, side by side in one process on the same calibration context.

    python benchmarks/search_methods.py --data-dir ../shared/data --samples 4 --seq-len 128 --count 8

Runs, on SmolLM2-135M (or ``--tiny``: a small random Llama and random token ids, for a quick check) with a fixed
thread count, one after the other on one :class:`~finercut.scoring.ScoringContext` (the original model's pass
is shared):

* ``greedy``: FinerCut's greedy search (:class:`~finercut.scoring.FastScorer`: prefix cache, replay states,
  exact early abort, vocabulary-subset bounds), the reference;
* ``beam W=1``: the same search on the set scorer (:class:`~finercut.scoring.sets.SetScorer`), for its overhead;
* ``beam W=2``: the beam search of width 2 (``--beam-width``);
* ``swap``: the swap method as it runs: the greedy phase on the set scorer, then first-improvement swaps on the
  same scorer (its kept states and sums), until a local optimum or ``--max-evaluations``;
* ``evopress``, ``evopress_free``: the EvoPress method as it runs: the greedy phase, then ``--generations``
  generations of ``--offspring`` children, with equal attention/FFN counts (the default) or free counts.

Each search gets a fresh scorer (nothing cached from another search). Per search it prints the final objective
(the distance of the removed set), set evaluations, full-forward equivalents (block runs over the calibration
set divided by the number of blocks; the output head's share separately, positions through the full head
divided by the calibration positions), wall time, and the time relative to greedy's (the mean of greedy's runs:
by default it runs first and last, so that a change of machine load weighs on both sides).
"""

from __future__ import annotations

import argparse
import time

import torch

from finercut.adapters import adapter_for
from finercut.candidates import all_units, first_window_block
from finercut.distances import metric_named
from finercut.scoring import FastScorer, ScoringContext
from finercut.scoring.sets import SetScorer
from finercut.search import greedy_search
from finercut.set_search import (
    beam_search, equal_quotas, evopress_search, kind_counts, make_window, meet_quotas, swap_search,
)


def tiny_model(layers: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def measure(context: ScoringContext, name: str, run) -> dict:
    work = context.work
    blocks, head = context.block_rows, work.head_rows
    started = time.perf_counter()
    objective, evaluations, removed = run()
    seconds = time.perf_counter() - started
    num_blocks = len(work.block_runs)
    return {"name": name, "objective": objective, "evaluations": evaluations, "seconds": seconds,
            "ffe": (context.block_rows - blocks) / context.num_samples / num_blocks,
            "head_ffe": (work.head_rows - head) / context.num_positions, "removed": removed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--tiny", action="store_true", help="a small random Llama and random ids instead")
    parser.add_argument("--tiny-layers", type=int, default=8)
    parser.add_argument("--data-dir")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--count", type=int, default=8, help="units to remove")
    parser.add_argument("--metric", default="js")
    parser.add_argument("--beam-width", type=int, default=2)
    parser.add_argument("--max-evaluations", type=int, help="the swap search's budget (default: local optimum)")
    parser.add_argument("--generations", type=int, default=10)
    parser.add_argument("--offspring", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--searches", default="greedy,beam1,beam,swap,evopress,evopress_free,greedy",
                        help="in this order; greedy's time, the reference, is the mean of its runs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.tiny:
        model = tiny_model(args.tiny_layers)
        generator = torch.Generator().manual_seed(args.seed)
        input_ids = torch.randint(3, 512, (args.samples, args.seq_len), generator=generator)
        label = f"tiny random Llama ({args.tiny_layers} blocks)"
    else:
        from finercut.calibration import calibration_samples, resolve_source
        from finercut.modelio import load_model, load_tokenizer, resolve_model_source

        source = resolve_model_source(args.model)
        tokenizer = load_tokenizer(source)
        model, info = load_model(source, dtype="float32", device="cpu")
        input_ids, _ = calibration_samples(tokenizer, resolve_source("wikitext2", args.data_dir),
                                           num_samples=args.samples, seq_len=args.seq_len, seed=args.seed)
        label = info["id"]
    adapter = adapter_for(model)
    num_blocks = adapter.num_blocks(model)
    units = all_units(num_blocks, "sublayer")
    first_block = first_window_block(num_blocks, 0.4)
    window = dict(window_until_ratio=0.4, window_first_block=first_block)
    admits = make_window(units, 0.4, first_block).admits
    started = time.perf_counter()
    context = ScoringContext.build(model, adapter, metric_named(args.metric), input_ids, batch_size=1)
    print(f"{label}: {num_blocks} blocks, {args.samples} x {args.seq_len} calibration tokens, metric {args.metric}, "
          f"removing {args.count} sub-layers, float32, {torch.get_num_threads()} threads; original-model pass "
          f"{time.perf_counter() - started:.1f} s", flush=True)

    def greedy():
        steps = greedy_search(FastScorer(context), num_blocks=num_blocks, granularity="sublayer", target=args.count,
                              **window)
        return steps[-1].distance, sum(len(s.candidates) for s in steps), [s.unit for s in steps]

    def beam(width):
        def run():
            scorer = SetScorer(context)
            result = beam_search(scorer, units=units, target=args.count, width=width, **window)
            return result.best.distance, scorer.evaluations, result.best.order
        return run

    def greedy_phase(scorer):
        return beam_search(scorer, units=units, target=args.count, width=1, **window).best

    def swap():
        scorer = SetScorer(context)
        start = greedy_phase(scorer)
        result = swap_search(scorer, units=units, start=start.order, admits=admits,
                             max_evaluations=args.max_evaluations)
        return result.distance, scorer.evaluations, result.units

    def evopress(free_counts: bool):
        return lambda: evopress_run(free_counts)

    def evopress_run(free_counts: bool):
        scorer = SetScorer(context)
        start = greedy_phase(scorer).order
        if not free_counts:
            quotas = equal_quotas(units, args.count)
            if kind_counts(start) != quotas:
                start = meet_quotas(start, units, quotas, admits)
        result = evopress_search(scorer, units=units, start=start, admits=admits, generations=args.generations,
                                 offspring=args.offspring, survivors=(max(1, args.offspring // 4), 1), seed=args.seed,
                                 same_kind=not free_counts)
        return result.distance, scorer.evaluations, result.units

    runs = {"greedy": ("greedy (FinerCut)", greedy), "beam1": ("beam W=1 (set scorer)", beam(1)),
            "beam": (f"beam W={args.beam_width}", beam(args.beam_width)), "swap": ("swap (greedy + swaps)", swap),
            "evopress": (f"evopress ({args.generations} gen x {args.offspring}, equal counts)", evopress(False)),
            "evopress_free": (f"evopress ({args.generations} gen x {args.offspring}, free counts)", evopress(True))}
    results = []
    for key in args.searches.split(","):
        name, run = runs[key]
        results.append(measure(context, name, run))
        row = results[-1]
        removed = ", ".join(str(u) for u in sorted(row["removed"], key=lambda u: u.sort_key))
        print(f"  {name}: objective {row['objective']:.6g}, {row['evaluations']} evaluations, {row['ffe']:.1f} FFE, "
              f"{row['seconds']:.1f} s; removed {removed}", flush=True)
    greedy_rows = [row for row in results if row["name"].startswith("greedy")] or results[:1]
    # greedy listed twice (first and last, the default): its mean time is the reference, so that a change of
    # machine load during the searches weighs on both sides
    reference = {"objective": greedy_rows[0]["objective"],
                 "seconds": sum(row["seconds"] for row in greedy_rows) / len(greedy_rows)}
    print()
    print("| search | objective | vs greedy | evaluations | FFE (blocks) | FFE (head) | seconds | time / greedy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        print(f"| {row['name']} | {row['objective']:.6g} | {row['objective'] / reference['objective'] - 1:+.2%} | "
              f"{row['evaluations']} | {row['ffe']:.1f} | {row['head_ffe']:.1f} | {row['seconds']:.1f} | "
              f"{row['seconds'] / reference['seconds']:.2f}x |")
    context.close()


if __name__ == "__main__":
    main()
