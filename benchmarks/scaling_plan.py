"""FLOPs and expected wall time of a FinerCut search on big models, from the algorithm (no model is loaded).

    python benchmarks/scaling_plan.py            # prints the tables of docs/scaling.md

The fast scorer's work per step, counted from the code (``finercut.scoring.replay``):

* the prefix cache is refreshed from the first block whose input the last removal changed: blocks ``q..L-2``
  (all ``L-1`` in the first step), on every rank;
* each candidate at block ``p`` replays blocks ``p..L-1`` and runs the output head once, and once more to
  recompute the original logits when they do not fit the reference budget (2 GiB of float32 logits);
* no early abort is assumed (an upper bound: the measured saving is in ``benchmarks/search_speed.py``'s
  "full-forward equivalents per removed sub-layer", to be applied as a factor).

Removals are assumed spread over the candidate window (a fixed-seed random order, averaged over 50 orders). A
replayed block is booked at its dense cost even when one of its sub-layers is removed (an over-count). With
ranks, a step lasts as long as its slowest rank; candidates are dealt round-robin (``finercut.distributed``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

REFERENCE_BUDGET_BYTES = 2 * 2**30  # finercut.scoring.DEFAULT_MAX_REFERENCE_BYTES


@dataclass(frozen=True)
class Model:
    name: str
    blocks: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def block_flops_per_token(self, seq: int) -> float:
        """2 x weights (q, k, v, o and the gated FFN) plus causal attention over (seq + 1) / 2 keys on average."""
        kv = self.kv_heads * self.head_dim
        weights = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.ffn
        return 2 * weights + 4 * self.heads * self.head_dim * (seq + 1) / 2

    def head_flops_per_token(self) -> float:
        return 2 * self.hidden * self.vocab

    def weight_bytes(self) -> float:
        kv = self.kv_heads * self.head_dim
        per_block = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.ffn
        return 2 * (self.blocks * per_block + 2 * self.hidden * self.vocab)  # bf16, embeddings and head


LLAMA3_8B = Model("Llama-3-8B", 32, 4096, 14336, 32, 8, 128256)
LLAMA3_70B = Model("Llama-3-70B", 80, 8192, 28672, 64, 8, 128256)


def window_units(model: Model, window_fraction: float = 0.4) -> list[int]:
    """The candidate blocks of the sub-layers in the paper's window (blocks >= ceil(0.4 L)), two per block."""
    first = math.ceil(window_fraction * model.blocks - 1e-9)
    return [b for b in range(first, model.blocks) for _ in ("attention", "ffn")]


def search_cost(model: Model, *, samples: int, seq: int, ratio: float, ranks: int, orders: int = 50) -> dict:
    """FLOPs of the whole search (all ranks) and of its critical path (slowest rank per step), per the model."""
    tokens = samples * seq
    block, head = model.block_flops_per_token(seq), model.head_flops_per_token()
    heads_per_candidate = 1 + (tokens * model.vocab * 4 > REFERENCE_BUDGET_BYTES)
    target = math.floor(ratio * 2 * model.blocks + 0.5)
    total = critical = 0.0
    rng = random.Random(0)
    for _ in range(orders):
        remaining = window_units(model)
        valid_through = 0
        for _step in range(target):
            refresh = (model.blocks - 1 - valid_through) * block
            costs = [(model.blocks - p) * block + heads_per_candidate * head for p in remaining]
            per_rank = [sum(costs[r::ranks]) + refresh for r in range(ranks)]
            total += sum(per_rank)
            critical += max(per_rank)
            removed = remaining.pop(rng.randrange(len(remaining)))
            valid_through = removed  # the next refresh starts at the removed unit's block
    full_forward = model.blocks * block + head
    reference = full_forward + head  # the original model's pass and its logits, once
    return {
        "target": target,
        "candidates": sum(len(window_units(model)) - k for k in range(target)),
        "flops": tokens * (total / orders + ranks * reference),
        "critical_flops": tokens * (critical / orders + reference),
        "full_forward_equivalents": (total / orders) / full_forward,
        "cache_bytes": model.blocks * tokens * model.hidden * 2,
    }


GPU = "H100 SXM 80 GB"
PEAK = 989e12  # bf16 dense
ACHIEVED = {256: 0.25, 1024: 0.40}
"""Fraction of peak assumed reached: GEMMs of 256 rows (one 256-token sample per call) run further from peak
than GEMMs of 1,024 rows."""


def gpus_per_copy(model: Model, samples: int, seq: int, gpu_bytes: float = 80e9, headroom: float = 0.85) -> int:
    """GPUs one copy of the model needs with --device-map: weights, prefix cache, a few GB of activations."""
    need = model.weight_bytes() + model.blocks * samples * seq * model.hidden * 2 + 4e9
    return math.ceil(need / (gpu_bytes * headroom))


def main() -> None:
    print(f"GPU: {GPU}, bf16 peak {PEAK / 1e12:.0f} TFLOP/s, assumed {ACHIEVED[256]:.0%} of it with 256-token calls, "
          f"{ACHIEVED[1024]:.0%} with 1024-token calls\n")
    print("| model | calibration | removed | candidate evaluations | full-forward equivalents | search FLOPs "
          "| prefix cache | GPUs per copy |")
    print("|---|---|---|---|---|---|---|---|")
    setups = [(m, n, s) for m in (LLAMA3_8B, LLAMA3_70B) for n, s in ((10, 256), (32, 1024))]
    for model, samples, seq in setups:
        cost = search_cost(model, samples=samples, seq=seq, ratio=0.25, ranks=1)
        print(f"| {model.name} | {samples} x {seq} | {cost['target']} of {2 * model.blocks} | {cost['candidates']} "
              f"| {cost['full_forward_equivalents']:.0f} | {cost['flops'] / 1e15:.1f} PFLOP "
              f"| {cost['cache_bytes'] / 1e9:.1f} GB | {gpus_per_copy(model, samples, seq)} |")
    print("\n| model | calibration | GPUs | ranks x GPUs per rank | expected search time | speed-up over 1 copy "
          "| parallel efficiency |")
    print("|---|---|---|---|---|---|---|")
    for model, samples, seq in setups:
        per_copy = gpus_per_copy(model, samples, seq)
        rate = PEAK * ACHIEVED[seq]
        single = search_cost(model, samples=samples, seq=seq, ratio=0.25, ranks=1)["critical_flops"] / rate
        for gpus in sorted({1, per_copy, 8, 64}):
            if gpus < per_copy:
                print(f"| {model.name} | {samples} x {seq} | {gpus} | - | does not fit (needs {per_copy} GPUs "
                      "per copy) | | |")
                continue
            ranks, per_rank = rank_layout(gpus, per_copy)
            cost = search_cost(model, samples=samples, seq=seq, ratio=0.25, ranks=ranks)
            seconds = cost["critical_flops"] / rate  # a device-mapped copy runs one GPU at a time
            print(f"| {model.name} | {samples} x {seq} | {gpus} | {ranks} x {per_rank} | {_duration(seconds)} "
                  f"| {single / seconds:.1f}x | {single / seconds / ranks:.0%} |")


def rank_layout(gpus: int, per_copy: int, node_gpus: int = 8) -> tuple[int, int]:
    """Ranks and GPUs per rank on nodes of ``node_gpus``: each node's GPUs split equally among its ranks
    (:func:`finercut.placement.gpu_share`), as many ranks per node as copies fit."""
    if gpus < node_gpus:
        return gpus // per_copy, per_copy
    per_node = node_gpus // per_copy
    return per_node * (gpus // node_gpus), node_gpus // per_node


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    main()
