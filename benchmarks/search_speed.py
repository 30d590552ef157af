"""Fast (prefix-cached) vs naive (full forward per candidate) search, measured side by side in one process.

    python benchmarks/search_speed.py --data-dir ../shared/data --steps 3

Both scorers run the same steps on the same model, calibration samples and thread count, alternating step by
step so that machine noise hits both alike. Prints per-step wall time and block executions, their ratios, and
checks that both chose the same sub-layers with the same scores.
"""

from __future__ import annotations

import argparse
import time

import torch

from finercut.adapters import adapter_for
from finercut.calibration import calibration_samples, resolve_source
from finercut.candidates import first_window_block
from finercut.distances import metric_named
from finercut.modelio import load_model, load_tokenizer, resolve_model_source
from finercut.scoring import FastScorer, NaiveScorer, ScoringContext
from finercut.search import greedy_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--data-dir")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--metric", default="js")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source = resolve_model_source(args.model)
    tokenizer = load_tokenizer(source)
    model, info = load_model(source, dtype="float32", device="cpu")
    adapter = adapter_for(model)
    num_blocks = adapter.num_blocks(model)
    input_ids, _ = calibration_samples(tokenizer, resolve_source("wikitext2", args.data_dir),
                                       num_samples=args.samples, seq_len=args.seq_len, seed=0)
    metric = metric_named(args.metric)
    contexts = {name: ScoringContext.build(model, adapter, metric, input_ids) for name in ("fast", "naive")}
    scorers = {"fast": FastScorer(contexts["fast"]), "naive": NaiveScorer(contexts["naive"])}
    steps = {"fast": [], "naive": []}
    window = dict(window_until_ratio=0.4, window_first_block=first_window_block(num_blocks, 0.4))
    print(f"{info['id']}: {num_blocks} blocks, {args.samples} x {args.seq_len} calibration tokens, metric "
          f"{args.metric}, {args.threads} threads")
    started = time.perf_counter()
    for k in range(args.steps):
        for name, scorer in scorers.items():
            steps[name] = greedy_search(scorer, num_blocks=num_blocks, granularity="sublayer", target=k + 1,
                                        completed=steps[name], **window)
        fast, naive = steps["fast"][k], steps["naive"][k]
        print(f"step {k + 1}: {len(fast.candidates)} candidates | fast {fast.seconds:7.1f} s, "
              f"{fast.block_executions:5d} block executions | naive {naive.seconds:7.1f} s, "
              f"{naive.block_executions:5d} | time ratio naive/fast {naive.seconds / fast.seconds:.2f}, "
              f"executions ratio {naive.block_executions / fast.block_executions:.2f}")
    fast_seconds = sum(s.seconds for s in steps["fast"])
    naive_seconds = sum(s.seconds for s in steps["naive"])
    fast_blocks = sum(s.block_executions for s in steps["fast"])
    naive_blocks = sum(s.block_executions for s in steps["naive"])
    same_order = [s.unit for s in steps["fast"]] == [s.unit for s in steps["naive"]]
    worst = max(abs(a - b) / max(abs(b), 1e-30) for f, n in zip(steps["fast"], steps["naive"])
                for (_, a), (_, b) in zip(f.candidates, n.candidates))
    print(f"total: fast {fast_seconds:.1f} s / {fast_blocks} block executions, naive {naive_seconds:.1f} s / "
          f"{naive_blocks}; naive/fast wall-time ratio {naive_seconds / fast_seconds:.2f}, block-execution ratio "
          f"{naive_blocks / fast_blocks:.2f}")
    print(f"same removal order: {same_order} ({', '.join(str(s.unit) for s in steps['fast'])}); largest relative "
          f"score difference {worst:.2e} (float32)")
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
