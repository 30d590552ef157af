"""Model statistics like the paper's Table 3: parameters, MACs, weight memory, measured latency and throughput.

MACs are counted from the architecture itself: every weight matrix a token passes through costs its size in
multiply-accumulates per token (expert tensors of a MoE block only for the ``top_k`` experts a token uses), and
each attention layer adds its context-dependent part, ``2 * heads * head_dim`` per (query, visible key) pair,
causal and within its sliding window. A removed sub-layer has no weights and so costs nothing.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from finercut.adapters import ArchitectureAdapter, adapter_for_config
from finercut.pruned_modeling import RemovedAttention

MAC_CATEGORIES = ("attention_projections", "attention_context", "ffn", "head")


def weight_macs_per_token(module: nn.Module, *, experts_per_token: int | None) -> int:
    """MACs one token costs in ``module``'s weight matrices (embeddings excluded: they are lookups).

    2-D weights (Linear, GPT-2's Conv1D) cost their size; 3-D expert tensors ``[experts, out, in]`` cost
    ``top_k / experts`` of theirs; 1-D parameters (norms, biases) are not counted.
    """
    total = 0
    for submodule in module.modules():
        if isinstance(submodule, nn.Embedding):
            continue
        for param in submodule.parameters(recurse=False):
            if param.dim() == 2:
                total += param.numel()
            elif param.dim() == 3:
                if experts_per_token is None:
                    raise ValueError("3-D expert weights need the number of experts per token")
                total += param.numel() * experts_per_token // param.shape[0]
    return total


def visible_keys(context_length: int, window: int | None) -> int:
    """Sum over query positions ``t = 1..n`` of the keys it attends to: ``min(t, window)`` (causal)."""
    n = context_length
    if window is None or window >= n:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def attention_windows(config: Any, num_blocks: int) -> list[int | None]:
    """Per block, the attention window (None = full causal attention)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if kind == "sliding_attention" else None for kind in layer_types[:num_blocks]]
    if getattr(config, "use_sliding_window", True) is False:
        return [None] * num_blocks
    return [window] * num_blocks


def count_macs(model: nn.Module, *, context_length: int) -> dict[str, int]:
    """MACs of one forward pass over ``context_length`` tokens, per category and in total."""
    config = model.config
    adapter: ArchitectureAdapter = adapter_for_config(config)
    blocks = adapter.blocks_of(model)
    experts_per_token = getattr(config, "num_experts_per_tok", None)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    macs = dict.fromkeys(MAC_CATEGORIES, 0)
    for block, window in zip(blocks, attention_windows(config, len(blocks))):
        attention = getattr(block, adapter.attention)
        macs["attention_projections"] += context_length * weight_macs_per_token(attention, experts_per_token=None)
        if not isinstance(attention, RemovedAttention):
            macs["attention_context"] += 2 * heads * head_dim * visible_keys(context_length, window)
        macs["ffn"] += context_length * weight_macs_per_token(getattr(block, adapter.ffn),
                                                              experts_per_token=experts_per_token)
    macs["head"] = context_length * model.get_submodule(adapter.head).weight.numel()
    macs["total"] = sum(macs[c] for c in MAC_CATEGORIES)
    return macs


def kv_cache_bytes_per_token(model: nn.Module, *, dtype: torch.dtype | None = None) -> int:
    """Bytes the KV cache holds per cached token: keys and values of every attention layer that remains.

    ``2 * kv_heads * head_dim * itemsize`` per attention layer (a sliding-window layer caps its cache at the
    window, which this per-token figure ignores); removed or replaced attention sub-layers have no cache.

    Args:
        dtype: the cache's dtype (default: the model's).
    """
    config = model.config
    adapter = adapter_for_config(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = sum(not isinstance(getattr(block, adapter.attention), RemovedAttention)
                 for block in adapter.blocks_of(model))
    return layers * 2 * kv_heads * head_dim * (dtype or model.dtype).itemsize


def kv_cache_summary(model: nn.Module, removed: Sequence[Any]) -> dict[str, Any]:
    """KV-cache bytes per token of a dense model before and after removing ``removed`` (units), in its dtype."""
    from finercut.candidates import removed_sublayers
    from finercut.pruned_modeling import ATTENTION

    dense = kv_cache_bytes_per_token(model)
    layers = len(adapter_for_config(model.config).blocks_of(model))
    removed_attention = len({unit.block for unit in removed_sublayers(removed) if unit.kind == ATTENTION})
    after = dense * (layers - removed_attention) // layers
    return {"bytes_per_token_before": dense, "bytes_per_token_after": after,
            "attention_layers_before": layers, "attention_layers_after": layers - removed_attention,
            "dtype": str(model.dtype).removeprefix("torch.")}


def synchronize_devices() -> None:
    """Wait until every queued GPU kernel has run: CUDA and MPS run them asynchronously, so a clock read just
    after a call would time the kernel launches, not the work."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)
    if torch.backends.mps.is_available():
        torch.mps.synchronize()


def _timed(fn) -> float:
    synchronize_devices()  # work queued before the call is not the call's
    started = time.perf_counter()
    fn()
    synchronize_devices()
    return time.perf_counter() - started


def median_seconds_side_by_side(calls: dict[str, Callable[[], Any]], *, warmup: int = 1,
                                repeats: int = 5) -> dict[str, float]:
    """Median wall time of each call, measured round-robin so that machine noise hits all of them alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            times[name].append(_timed(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def _random_ids(model: nn.Module, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, length), generator=generator).to(model.device)


@torch.inference_mode()
def forward_latencies(models: dict[str, nn.Module], *, context_length: int, repeats: int = 5,
                      seed: int = 0) -> dict[str, float]:
    """Median seconds of one forward pass (no cache, full logits) over ``context_length`` random tokens."""
    calls = {}
    for name, model in models.items():
        ids = _random_ids(model, context_length, seed)
        calls[name] = lambda model=model, ids=ids: model(input_ids=ids, use_cache=False)
    return median_seconds_side_by_side(calls, repeats=repeats)


@torch.inference_mode()
def generation_throughputs(models: dict[str, nn.Module], *, prompt_length: int = 32, new_tokens: int = 64,
                           repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Median generated tokens per second, greedy with the KV cache, batch of one."""
    calls = {}
    for name, model in models.items():
        ids = _random_ids(model, prompt_length, seed)
        calls[name] = lambda model=model, ids=ids: model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0)
    seconds = median_seconds_side_by_side(calls, repeats=repeats)
    return {name: new_tokens / value for name, value in seconds.items()}


@dataclass(frozen=True)
class ModelStats:
    """One row of the model-statistics table."""

    name: str
    parameters: int
    weight_bytes: int
    macs: dict[str, int]
    context_length: int
    forward_seconds: float | None = None
    tokens_per_second: float | None = None
    kv_cache_bytes_per_token: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def model_stats(models: dict[str, nn.Module], *, context_length: int, measure: bool = True,
                forward_repeats: int = 5, generation_repeats: int = 3) -> list[ModelStats]:
    """Parameters, weight bytes, MACs and, if ``measure``, latency and throughput measured side by side."""
    from finercut.checkpoint import parameter_stats

    latencies = forward_latencies(models, context_length=context_length, repeats=forward_repeats) if measure else {}
    positions = min(getattr(m.config, "max_position_embeddings", None) or 96 for m in models.values())
    prompt_length = min(32, positions // 3)
    throughputs = generation_throughputs(models, prompt_length=prompt_length,
                                         new_tokens=min(64, positions - prompt_length),
                                         repeats=generation_repeats) if measure else {}
    rows = []
    for name, model in models.items():
        sizes = parameter_stats(model)
        rows.append(ModelStats(
            name=name, parameters=sizes.total_parameters, weight_bytes=sizes.total_bytes,
            macs=count_macs(model, context_length=context_length), context_length=context_length,
            forward_seconds=latencies.get(name), tokens_per_second=throughputs.get(name),
            kv_cache_bytes_per_token=kv_cache_bytes_per_token(model),
        ))
    return rows


def format_stats_table(rows: Sequence[ModelStats]) -> str:
    """Markdown table; ratios are relative to the first row (the dense model)."""
    base = rows[0]
    lines = [
        f"| model | parameters | weight memory | MACs @ {base.context_length} tokens | KV cache per token | "
        "forward latency | generation |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        latency = (f"{row.forward_seconds:.3f} s ({row.forward_seconds / base.forward_seconds:.2f}x)"
                   if row.forward_seconds and base.forward_seconds else "n/a")
        throughput = (f"{row.tokens_per_second:.1f} tok/s ({row.tokens_per_second / base.tokens_per_second:.2f}x)"
                      if row.tokens_per_second and base.tokens_per_second else "n/a")
        lines.append(
            f"| {row.name} | {row.parameters / 1e6:.1f} M ({row.parameters / base.parameters:.1%}) "
            f"| {row.weight_bytes / 2**20:.0f} MiB ({row.weight_bytes / base.weight_bytes:.1%}) "
            f"| {row.macs['total'] / 1e9:.1f} G ({row.macs['total'] / base.macs['total']:.1%}) "
            f"| {_kv_cell(row, base)} | {latency} | {throughput} |"
        )
    return "\n".join(lines)


def _kv_cell(row: ModelStats, base: ModelStats) -> str:
    if row.kv_cache_bytes_per_token is None:
        return "n/a"
    share = (f" ({row.kv_cache_bytes_per_token / base.kv_cache_bytes_per_token:.1%})"
             if base.kv_cache_bytes_per_token else "")
    return f"{row.kv_cache_bytes_per_token / 1024:.1f} KiB{share}"


@torch.inference_mode()
def greedy_samples(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 48) -> list[str]:
    """Greedy continuations of each prompt (paper Appendix F), without the prompt."""
    outputs = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt").to(model.device)
        generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        outputs.append(tokenizer.decode(generated[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True))
    return outputs
