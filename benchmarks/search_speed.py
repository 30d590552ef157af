"""Fast vs naive search measured side by side in one process, then whole runs of the fast search.

    python benchmarks/search_speed.py --data-dir ../shared/data --steps 3 --full-ratio 0.25

Part 1: the fast scorer (prefix-cached replay, exact early abort, vocabulary-free angular/Euclidean where the
head allows it) and the naive one (a full forward and the plain distance per candidate) run the same steps on
the same model, calibration samples and thread count, alternating step by step so that machine noise hits both
alike. Per step: wall time, samples evaluated, candidates aborted, time in blocks / head / distance, and
full-forward equivalents (FLOPs spent scoring divided by the FLOPs of one full forward of the calibration set,
output head included). It checks that both removed the same units and gave the same distances to every
candidate the fast path scored completely.

With a distance metric, ``--scorers fast,nosubset,naive`` adds ``nosubset``: the fast scorer without the
vocabulary-subset bounds of JS (``subset_tokens=0``), what the fast path was before them.

With ``--metric ppl`` (BlockPruner: the calibration perplexity over every block, no window) part 1 adds a
third scorer, ``replay``: replay from each candidate's own block with neither replay states nor early abort,
what BlockPruner's scorer did before it shared the fast path.

Part 2: whole runs of the fast search to ``--full-ratio`` for each of ``--full-metrics``, timed from the
original-model pass (included) to the last removal; ``--subset-tokens 4096,0`` runs each once with and once
without the vocabulary-subset bounds (JS), one after the other.

FLOPs are counted with ``torch.utils.flop_counter`` on one dense block, one head row and one full forward of a
sample; a replayed block is booked at its dense cost even when one of its sub-layers is removed (an over-count
of the fast path), and the element-wise work of the distances (exp, log over the vocabulary) is not counted:
its time is in the "distance" column.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from finercut.adapters import adapter_for
from finercut.methods.blockpruner import perplexity_scorer
from finercut.calibration import calibration_samples, resolve_source
from finercut.candidates import count_units, first_window_block, target_count
from finercut.distances import metric_named
from finercut.modelio import load_model, load_tokenizer, resolve_model_source
from finercut.scoring import FastScorer, NaiveScorer, ScoringContext, run_block
from finercut.search import greedy_search


BATCH = {"size": 1}
"""Samples per batch (the early-abort granularity), from --batch-size."""


def flop_costs(model, adapter, context: ScoringContext) -> dict:
    """Dense FLOPs of each block on one calibration batch, of the head per position, of a full forward."""
    batch = context.batches[0]
    blocks = adapter.blocks_of(model)
    per_block = []
    hidden = batch.first_block_input
    with torch.inference_mode():
        for i, block in enumerate(blocks):
            with FlopCounterMode(display=False) as counter:
                output = run_block(block, hidden, batch.block_calls[i])
            per_block.append(counter.get_total_flops() / batch.num_samples)
            hidden = output
        rows = hidden.reshape(-1, hidden.shape[-1])
        with FlopCounterMode(display=False) as counter:
            adapter.logits(model, rows)
        head_per_row = counter.get_total_flops() / rows.shape[0]
    seq = batch.input_ids.shape[1]
    full_forward = context.num_samples * (sum(per_block) + seq * head_per_row)
    hidden_size = rows.shape[-1]
    return {"block_per_sample": per_block, "head_per_row": head_per_row, "full_forward": full_forward,
            "gram_per_row": 6 * hidden_size**2}  # three [1, H] x [H, H] quadratic forms per position


def snapshot(context: ScoringContext) -> dict:
    work = context.work
    return {"block_runs": list(work.block_runs), "head_rows": work.head_rows, "gram_rows": work.gram_rows,
            "subset_head_rows": work.subset_head_rows, "seconds": dict(work.seconds)}


def spent(before: dict, after: dict, flops: dict) -> dict:
    """Work between two snapshots: seconds per part and full-forward equivalents."""
    block_flops = sum((a - b) * f for a, b, f in zip(after["block_runs"], before["block_runs"],
                                                      flops["block_per_sample"]))
    # a subset bound's head rows are booked as the fraction of a full head row they cost
    head_rows = after["head_rows"] - before["head_rows"] + after["subset_head_rows"] - before["subset_head_rows"]
    head_flops = head_rows * flops["head_per_row"]
    gram_flops = (after["gram_rows"] - before["gram_rows"]) * flops["gram_per_row"]
    return {
        "seconds": {k: after["seconds"][k] - before["seconds"][k] for k in after["seconds"]},
        "ffe": (block_flops + head_flops + gram_flops) / flops["full_forward"],
        "ffe_blocks": block_flops / flops["full_forward"],
        "ffe_head": (head_flops + gram_flops) / flops["full_forward"],
    }


def split(work: dict) -> str:
    s = work["seconds"]
    return (f"blocks {s['blocks']:6.1f} s, head {s['head']:6.1f} s, distance {s['distance']:5.1f} s; "
            f"{work['ffe']:5.2f} full-forward equivalents ({work['ffe_blocks']:.2f} blocks + "
            f"{work['ffe_head']:.2f} head)")


def part1_scorer(name: str, context: ScoringContext, metric: str):
    if metric == "ppl":
        options = {"fast": {}, "replay": dict(exhaustive=True, replay_state_bytes=0), "naive": dict(scorer="naive")}
        return perplexity_scorer(context, **options[name])
    scorers = {"fast": lambda c: FastScorer(c), "nosubset": lambda c: FastScorer(c, subset_tokens=0),
               "naive": lambda c: NaiveScorer(c)}
    return scorers[name](context)


def compare_fast_naive(model, adapter, input_ids, *, metric: str, steps: int, window: dict,
                       names: tuple[str, ...] = ("fast", "naive")) -> None:
    """Part 1 with the scorers ``names`` (``fast`` first; the last is the reference of the summary)."""
    num_blocks = adapter.num_blocks(model)
    distance = metric_named("js" if metric == "ppl" else metric)  # BlockPruner never reads the reference
    contexts = {name: ScoringContext.build(model, adapter, distance, input_ids, batch_size=BATCH["size"])
                for name in names}
    flops = flop_costs(model, adapter, contexts["fast"])
    scorers = {name: part1_scorer(name, contexts[name], metric) for name in names}
    if metric == "ppl":
        window = dict(window_until_ratio=0.0, window_first_block=0)
    print(f"part 1: {steps} steps, metric {metric}, fast distance path: {scorers['fast'].distance_path}; "
          f"head = {flops['head_per_row'] * input_ids.shape[1] / (sum(flops['block_per_sample']) / num_blocks):.1f}"
          " blocks of FLOPs per sample", flush=True)
    done = {name: [] for name in names}
    works = {name: [] for name in names}
    cpu = {name: 0.0 for name in names}
    for k in range(steps):
        for name, scorer in scorers.items():
            before, cpu_before = snapshot(contexts[name]), time.process_time()
            done[name] = greedy_search(scorer, num_blocks=num_blocks, granularity="sublayer", target=k + 1,
                                       completed=done[name], **window)
            cpu[name] += time.process_time() - cpu_before
            works[name].append(spent(before, snapshot(contexts[name]), flops))
        fast, reference = done["fast"][k], done[names[-1]][k]
        aborted = sum(c.aborted for c in fast.candidates)
        print(f"step {k + 1}: {len(fast.candidates)} candidates, removed fast {fast.unit} / {names[-1]} "
              f"{reference.unit}\n"
              f"  fast  {fast.seconds:7.1f} s, {fast.samples_evaluated:4d} samples evaluated, {aborted} aborted; "
              f"{split(works['fast'][k])}", flush=True)
        for name in names[1:]:
            step = done[name][k]
            print(f"  {name:6s}{step.seconds:7.1f} s, {step.samples_evaluated:4d} samples; {split(works[name][k])}\n"
                  f"  wall-time ratio {name}/fast {step.seconds / fast.seconds:.2f}", flush=True)
    if "replay" in done and names[-1] != "replay":
        replay_seconds = sum(s.seconds for s in done["replay"])
        print(f"replay/fast wall-time ratio {replay_seconds / sum(s.seconds for s in done['fast']):.2f}, same order: "
              f"{[s.unit for s in done['replay']] == [s.unit for s in done['fast']]}")
    fast_seconds = sum(s.seconds for s in done["fast"])
    naive = names[-1]
    naive_seconds = sum(s.seconds for s in done[naive])
    same_order = [s.unit for s in done["fast"]] == [s.unit for s in done[naive]]
    worst = max(abs(f.distance - n.distance) / max(abs(n.distance), 1e-30)
                for fs, ns in zip(done["fast"], done[naive])
                for f, n in zip(fs.candidates, ns.candidates) if f.distance is not None)
    fast_ffe = sum(w["ffe"] for w in works["fast"]) / steps
    naive_ffe = sum(w["ffe"] for w in works[naive]) / steps
    print(f"total: fast {fast_seconds:.1f} s, {naive} {naive_seconds:.1f} s: {naive}/fast wall-time ratio "
          f"{naive_seconds / fast_seconds:.2f} (process CPU time: fast {cpu['fast']:.0f} s, {naive} "
          f"{cpu[naive]:.0f} s, ratio {cpu[naive] / cpu['fast']:.2f}); full-forward equivalents per removed "
          f"sub-layer: fast {fast_ffe:.2f}, {naive} {naive_ffe:.2f}")
    print(f"same removal order: {same_order} ({', '.join(str(s.unit) for s in done['fast'])}); largest relative "
          f"difference of fully scored candidates' distances {worst:.2e} (float32)", flush=True)
    for context in contexts.values():
        context.close()


def fast_vs_sampled_naive(model, adapter, input_ids, *, metric: str, steps: int, window: dict, sampled: int) -> None:
    """Part 1 on a budget: the naive scorer timed on ``sampled`` candidates of each step (the fast path's own
    candidates, after the fast path's removals), its step time extrapolated to all candidates (its cost per
    candidate does not depend on the candidate: one full forward of every sample)."""
    num_blocks = adapter.num_blocks(model)
    contexts = {name: ScoringContext.build(model, adapter, metric_named(metric), input_ids, batch_size=BATCH["size"])
                for name in ("fast", "naive")}
    flops = flop_costs(model, adapter, contexts["fast"])
    fast_scorer, naive_scorer = FastScorer(contexts["fast"]), NaiveScorer(contexts["naive"])
    print(f"part 1 (naive sampled on {sampled} candidates per step): {steps} steps, metric {metric}, fast distance "
          f"path {fast_scorer.distance_path}", flush=True)
    done, totals, worst = [], {"fast": 0.0, "naive": 0.0, "fast_ffe": 0.0}, 0.0
    for k in range(steps):
        before, cpu_before = snapshot(contexts["fast"]), time.process_time()
        done = greedy_search(fast_scorer, num_blocks=num_blocks, granularity="sublayer", target=k + 1,
                             completed=done, **window)
        fast_cpu = time.process_time() - cpu_before
        fast_work = spent(before, snapshot(contexts["fast"]), flops)
        step = done[k]
        removed = [s.unit for s in done[:k]]
        picked = [c.unit for c in step.candidates][:: max(1, len(step.candidates) // sampled)][:sampled]
        started, cpu_before, before = time.perf_counter(), time.process_time(), snapshot(contexts["naive"])
        naive_scores = naive_scorer.score(removed, picked)
        naive_seconds = (time.perf_counter() - started) * len(step.candidates) / len(picked)
        naive_cpu = (time.process_time() - cpu_before) * len(step.candidates) / len(picked)
        naive_work = spent(before, snapshot(contexts["naive"]), flops)
        fast_by_unit = {c.unit: c for c in step.candidates}
        for score in naive_scores:
            fast_score = fast_by_unit[score.unit]
            if fast_score.distance is not None:
                worst = max(worst, abs(fast_score.distance - score.distance) / score.distance)
            else:
                assert fast_score.lower_bound <= score.distance * (1 + 1e-5), (fast_score, score)
        totals["fast"] += step.seconds
        totals["naive"] += naive_seconds
        totals["fast_ffe"] += fast_work["ffe"]
        print(f"step {k + 1}: {len(step.candidates)} candidates, removed {step.unit}; fast {step.seconds:.1f} s wall, "
              f"{fast_cpu:.0f} s CPU, {step.samples_evaluated} samples, "
              f"{sum(c.aborted for c in step.candidates)} aborted; {split(fast_work)}\n"
              f"  naive on {', '.join(map(str, picked))}: extrapolated to the step {naive_seconds:.1f} s wall, "
              f"{naive_cpu:.0f} s CPU, {naive_work['ffe'] * len(step.candidates) / len(picked):.2f} full-forward "
              f"equivalents; ratio naive/fast wall {naive_seconds / step.seconds:.1f}, CPU {naive_cpu / fast_cpu:.1f}",
              flush=True)
    print(f"total: fast {totals['fast']:.1f} s, naive (extrapolated) {totals['naive']:.1f} s, ratio "
          f"{totals['naive'] / totals['fast']:.1f}; fast full-forward equivalents per removed sub-layer "
          f"{totals['fast_ffe'] / steps:.2f}; largest relative difference fast vs naive on the sampled candidates "
          f"scored completely {worst:.2e}; every sampled aborted bound <= its naive distance", flush=True)
    for context in contexts.values():
        context.close()


def full_run(model, adapter, input_ids, *, metric: str, ratio: float, window: dict, max_steps: int | None,
             replay_memory_gb: float = 2.0, subset_tokens: int | None = None) -> None:
    num_blocks = adapter.num_blocks(model)
    target = target_count(ratio, count_units(num_blocks, "sublayer"))
    planned = target if max_steps is None else min(target, max_steps)
    started, cpu_started = time.perf_counter(), time.process_time()
    context = ScoringContext.build(model, adapter, metric_named(metric), input_ids, batch_size=BATCH["size"])
    scorer = FastScorer(context, replay_state_bytes=int(replay_memory_gb * 2**30), subset_tokens=subset_tokens)
    reference_seconds = time.perf_counter() - started
    flops = flop_costs(model, adapter, context)
    before = snapshot(context)

    def report(step):
        print(f"  step {step.index + 1:2d}: {step.unit}, distance {step.distance:.5g}, {step.seconds:5.1f} s, "
              f"{step.samples_evaluated} samples (+ {sum(c.subset_samples or 0 for c in step.candidates)} bounded), "
              f"{sum(c.aborted for c in step.candidates)}/{len(step.candidates)} aborted", flush=True)

    print(f"part 2: run of ratio {ratio} ({target} sub-layers), {planned} steps of it, metric {metric}, distance "
          f"path {scorer.distance_path}, replay states within {replay_memory_gb:g} GiB, vocabulary-subset bound "
          f"{scorer.subset.tokens if scorer.subset else 0} tokens", flush=True)
    steps = greedy_search(scorer, num_blocks=num_blocks, granularity="sublayer", target=planned, on_step=report,
                          **window)
    work = spent(before, snapshot(context), flops)
    search_seconds = sum(s.seconds for s in steps)
    cpu_seconds = time.process_time() - cpu_started
    print(f"  {metric}, {planned}/{target} steps: search {search_seconds:.1f} s + original-model pass and G "
          f"{reference_seconds:.1f} s = {search_seconds + reference_seconds:.1f} s wall "
          f"({(search_seconds + reference_seconds) / 60:.2f} min), process CPU time {cpu_seconds:.0f} s; "
          f"{split(work)}; {work['ffe'] / planned:.2f} full-forward equivalents per removed sub-layer", flush=True)
    print(f"  order: {', '.join(str(s.unit) for s in steps)}", flush=True)
    context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--data-dir")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="steps of part 1 (0 skips it)")
    parser.add_argument("--metric", default="js", help="metric of part 1 (ppl: BlockPruner's perplexity)")
    parser.add_argument("--scorers", help="part 1's scorers, fast first, the summary's reference last (default "
                                           "fast,naive; with --metric ppl fast,replay,naive)")
    parser.add_argument("--naive-candidates", type=int,
                        help="time the naive scorer on this many candidates per step only, extrapolated (part 1)")
    parser.add_argument("--full-ratio", type=float, default=0.25, help="ratio of part 2 (0 skips it)")
    parser.add_argument("--full-metrics", default="js,angular")
    parser.add_argument("--full-steps", type=int, help="stop part 2 after this many steps (default: the whole run)")
    parser.add_argument("--replay-memory", default="2",
                        help="GiB for replay states in part 2; a comma-separated list runs part 2 once per value "
                             "(e.g. 2,0: with and without them, one after the other in this process)")
    parser.add_argument("--subset-tokens", default="default",
                        help="vocabulary-subset tokens of the JS bounds in part 2 (0: none); a comma-separated "
                             "list runs part 2 once per value (e.g. 4096,0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1, help="samples per batch: the early-abort granularity")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    BATCH["size"] = args.batch_size

    source = resolve_model_source(args.model)
    tokenizer = load_tokenizer(source)
    model, info = load_model(source, dtype="float32", device="cpu")
    adapter = adapter_for(model)
    num_blocks = adapter.num_blocks(model)
    input_ids, _ = calibration_samples(tokenizer, resolve_source("wikitext2", args.data_dir),
                                       num_samples=args.samples, seq_len=args.seq_len, seed=0)
    window = dict(window_until_ratio=0.4, window_first_block=first_window_block(num_blocks, 0.4))
    print(f"{info['id']}: {num_blocks} blocks, {args.samples} x {args.seq_len} calibration tokens ({args.batch_size} "
          f"sample(s) per batch), float32, {torch.get_num_threads()} threads", flush=True)
    started = time.perf_counter()
    if args.steps and args.naive_candidates:
        fast_vs_sampled_naive(model, adapter, input_ids, metric=args.metric, steps=args.steps, window=window,
                              sampled=args.naive_candidates)
    elif args.steps:
        names = args.scorers or ("fast,replay,naive" if args.metric == "ppl" else "fast,naive")
        compare_fast_naive(model, adapter, input_ids, metric=args.metric, steps=args.steps, window=window,
                           names=tuple(names.split(",")))
    if args.full_ratio:
        for metric in args.full_metrics.split(","):
            for memory in args.replay_memory.split(","):
                for tokens in args.subset_tokens.split(","):
                    full_run(model, adapter, input_ids, metric=metric, ratio=args.full_ratio, window=window,
                             max_steps=args.full_steps, replay_memory_gb=float(memory),
                             subset_tokens=None if tokens == "default" else int(tokens))
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
