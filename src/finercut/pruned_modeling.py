"""Removed sub-layers and the pruned causal-LM classes.

This module imports only ``torch``, ``transformers`` and the standard library: finercut copies it next to saved
pruned weights (as ``modeling_finercut.py``) so that ``AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)`` rebuilds the pruned model without finercut installed.

A pruned model is the architecture's own ``transformers`` class with

* every removed attention or FFN sub-layer (and the norms that belong to it) replaced by a parameter-free module
  that adds nothing to the residual stream, so ``h' = h`` for a removed attention and ``h = h'`` for a removed FFN;
* every block that lost both sub-layers deleted from the block list;
* the remaining attention layers renumbered ``0..A-1``, and a KV cache with exactly those ``A`` layers, each of the
  type (full or sliding window) its attention had in the dense model. Renumbering keeps the cache dense: code that
  reads the cache's layer 0 (sequence length, mask sizes) always finds a layer that is written to.

The layout lives in the config under :data:`LAYOUT_KEY`::

    {"format": 1, "base_model_type": "llama",
     "modules": {"blocks": "model.layers", "attention": "self_attn", "attention_norms": ["input_layernorm"],
                 "ffn": "mlp", "ffn_norms": ["post_attention_layernorm"], "layer_idx": "layer_idx",
                 "num_layers": "num_hidden_layers"},
     "original_num_blocks": 30, "original_layer_types": null,
     "removed": [{"block": 27, "kind": "attention"}, ...]}      # dense block indices, in removal order

``removed`` holds sub-layers (``"attention"`` / ``"ffn"``); a ``"block"`` entry stands for both.

An optional ``replacements`` list holds the cheap stand-ins fitted by ``finercut.recover`` (no fine-tuning): each
sits in the slot of one removed sub-layer and emulates the residual term of the removed sub-layers it ``covers``
(that one, or a maximal run of consecutive removed sub-layers starting there) as an affine map of its input::

    "replacements": [{"block": 12, "kind": "attention", "map": "lowrank", "rank": 64,
                      "covers": [{"block": 12, "kind": "attention"}, {"block": 12, "kind": "ffn"}, ...]}]

A block holding a replacement is kept even if both its sub-layers were removed; a replaced attention never touches
the KV cache (it has no cache layer).
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers import DynamicCache

LAYOUT_KEY = "finercut"
LAYOUT_FORMAT = 1
ATTENTION = "attention"
FFN = "ffn"
BLOCK = "block"
SUBLAYER_KINDS = (ATTENTION, FFN)


CACHE_KEYWORDS = ("cache", "past_key_values")
"""The KV cache's keyword in ``forward`` and ``generate``: ``past_key_values`` up to transformers 5.23, ``cache``
from 5.24 on (the old name still works there, with a deprecation warning)."""
WEIGHTS_VARIANT = "finercut"
"""Pruned weights are saved as ``model.finercut.safetensors`` (a ``transformers`` weights variant): the config
keeps the base model type, so tools that only read it (``AutoTokenizer``, ``AutoConfig``) load it quietly, while
the base class, which would fill the removed sub-layers with random weights, finds no ``model.safetensors``."""


def cache_keyword(forward: Callable) -> str:
    """The name under which ``forward`` (a model's, as installed) takes its KV cache."""
    parameters = inspect.signature(forward).parameters
    return next((name for name in CACHE_KEYWORDS if name in parameters), "past_key_values")


class RemovedAttention(nn.Module):
    """Stands in for a removed attention sub-layer: adds zero to the residual stream, never touches the KV cache."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """``[batch, seq, hidden]`` -> zeros of the same shape, and no attention weights."""
        return torch.zeros_like(hidden_states), None


class RemovedFFN(nn.Module):
    """Stands in for a removed FFN (dense MLP or MoE) sub-layer: adds zero to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``[batch, seq, hidden]`` -> zeros of the same shape."""
        return torch.zeros_like(hidden_states)


REPLACEMENT_MAPS = ("bias", "lowrank", "linear")


def init_replacement_map(module: nn.Module, hidden: int, map_kind: str, rank: int | None) -> None:
    """Give ``module`` the (zero) parameters of one replacement map; ``load_state_dict`` fills them.

    ``bias`` ``[hidden]`` always; ``linear`` adds ``weight`` ``[hidden, hidden]`` (as ``nn.Linear``); ``lowrank``
    adds ``down`` ``[rank, hidden]`` and ``up`` ``[hidden, rank]``.
    """
    if map_kind not in REPLACEMENT_MAPS:
        raise ValueError(f"unknown replacement map {map_kind!r}; expected one of {REPLACEMENT_MAPS}")
    module.map_kind, module.rank = map_kind, rank
    module.bias = nn.Parameter(torch.zeros(hidden))
    if map_kind == "linear":
        module.weight = nn.Parameter(torch.zeros(hidden, hidden))
    elif map_kind == "lowrank":
        if not rank or rank < 1:
            raise ValueError(f"a lowrank replacement needs a rank >= 1, got {rank!r}")
        module.down = nn.Parameter(torch.zeros(rank, hidden))
        module.up = nn.Parameter(torch.zeros(hidden, rank))


def replacement_output(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The residual term a replacement adds: ``[batch, seq, hidden] -> [batch, seq, hidden]``."""
    if module.map_kind == "linear":
        return nn.functional.linear(hidden_states, module.weight, module.bias)
    if module.map_kind == "lowrank":
        return nn.functional.linear(nn.functional.linear(hidden_states, module.down), module.up, module.bias)
    return module.bias.expand_as(hidden_states).clone()


class ReplacedAttention(RemovedAttention):
    """A removed attention sub-layer emulated by an affine map of its input (see :func:`init_replacement_map`).

    Still a :class:`RemovedAttention`: it has no KV-cache layer and never touches the cache.
    """

    def __init__(self, hidden: int, map_kind: str, rank: int | None = None) -> None:
        super().__init__()
        init_replacement_map(self, hidden, map_kind, rank)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """``[batch, seq, hidden]`` -> the fitted residual term, and no attention weights."""
        return replacement_output(self, hidden_states), None


class ReplacedFFN(RemovedFFN):
    """A removed FFN sub-layer emulated by an affine map of its input (see :func:`init_replacement_map`)."""

    def __init__(self, hidden: int, map_kind: str, rank: int | None = None) -> None:
        super().__init__()
        init_replacement_map(self, hidden, map_kind, rank)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``[batch, seq, hidden]`` -> the fitted residual term."""
        return replacement_output(self, hidden_states)


def replacement_module(kind: str, hidden: int, map_kind: str, rank: int | None) -> nn.Module:
    """An empty replacement for the ``kind`` (attention / ffn) slot of a block."""
    return (ReplacedAttention if kind == ATTENTION else ReplacedFFN)(hidden, map_kind, rank)


def replaced_blocks(layout: dict[str, Any]) -> set[int]:
    """Dense indices of the blocks that hold a replacement (kept even when both sub-layers were removed)."""
    return {int(entry["block"]) for entry in layout.get("replacements") or ()}


def install_replacements(model: nn.Module, layout: dict[str, Any]) -> None:
    """Put an empty replacement module into the slot of every ``replacements`` entry (dense block numbering)."""
    modules = layout["modules"]
    blocks = model.get_submodule(modules["blocks"])
    hidden = int(model.config.hidden_size)
    like = next(model.parameters())  # the replacements take the model's dtype and device (meta for skeletons)
    for entry in layout.get("replacements") or ():
        main_name, _ = sublayer_module_names(modules, entry["kind"])
        module = replacement_module(entry["kind"], hidden, entry["map"], entry.get("rank"))
        setattr(blocks[int(entry["block"])], main_name, module.to(device=like.device, dtype=like.dtype))


def check_replacements(layout: dict[str, Any]) -> None:
    """Refuse replacements that do not sit in, and cover only, removed sub-layers."""
    by_block = removed_by_block(layout)
    covered: list[tuple[int, str]] = []
    for entry in layout.get("replacements") or ():
        slots = [(int(entry["block"]), entry["kind"])] + [(int(c["block"]), c["kind"]) for c in entry["covers"]]
        for block, kind in slots:
            if kind not in SUBLAYER_KINDS or kind not in by_block.get(block, set()):
                raise ValueError(f"a replacement covers {block}.{kind}, which the pruning layout does not remove")
        if slots[0] != slots[1]:
            raise ValueError(f"a replacement at {slots[0]} must cover its own slot first, not {slots[1]}")
        if entry["map"] not in REPLACEMENT_MAPS:
            raise ValueError(f"unknown replacement map {entry['map']!r}; expected one of {REPLACEMENT_MAPS}")
        covered += slots[1:]
    if len(covered) != len(set(covered)):
        raise ValueError("a removed sub-layer is covered by more than one replacement")


class RemovedNorm(nn.Identity):
    """Stands in for the norm of a removed sub-layer (its output only ever fed the removed sub-layer)."""


def set_submodule(root: nn.Module, dotted_path: str, module: nn.Module) -> None:
    parent_path, _, name = dotted_path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def sublayer_module_names(modules: dict[str, Any], kind: str) -> tuple[str, list[str]]:
    """The block attribute of sub-layer ``kind`` and the names of the norms that belong to it."""
    if kind == ATTENTION:
        return modules["attention"], list(modules["attention_norms"])
    if kind == FFN:
        return modules["ffn"], list(modules["ffn_norms"])
    raise ValueError(f"unknown sub-layer kind {kind!r}; expected one of {SUBLAYER_KINDS}")


def stub_sublayer(block: nn.Module, kind: str, modules: dict[str, Any]) -> dict[str, nn.Module]:
    """Replace one sub-layer of ``block`` (and its norms) by parameter-free stand-ins.

    Returns:
        The replaced modules by attribute name, for :func:`restore_modules`.
    """
    main_name, norm_names = sublayer_module_names(modules, kind)
    replaced = {name: getattr(block, name) for name in [main_name, *norm_names]}
    setattr(block, main_name, RemovedAttention() if kind == ATTENTION else RemovedFFN())
    for name in norm_names:
        setattr(block, name, RemovedNorm())
    return replaced


def restore_modules(block: nn.Module, replaced: dict[str, nn.Module]) -> None:
    for name, module in replaced.items():
        setattr(block, name, module)


def is_removed(block: nn.Module, kind: str, modules: dict[str, Any]) -> bool:
    main_name, _ = sublayer_module_names(modules, kind)
    return isinstance(getattr(block, main_name), (RemovedAttention, RemovedFFN))


def removed_by_block(layout: dict[str, Any]) -> dict[int, set[str]]:
    """Dense block index -> sub-layer kinds removed from it (a ``"block"`` entry counts as both)."""
    by_block: dict[int, set[str]] = {}
    for entry in layout["removed"]:
        kind = entry["kind"]
        if kind not in (*SUBLAYER_KINDS, BLOCK):
            raise ValueError(f"unknown removed kind {kind!r} in the pruning layout; expected attention, ffn or block")
        by_block.setdefault(int(entry["block"]), set()).update(SUBLAYER_KINDS if kind == BLOCK else (kind,))
    return by_block


def kept_blocks(layout: dict[str, Any]) -> list[int]:
    """Dense indices of the blocks that keep at least one sub-layer, in order."""
    by_block = removed_by_block(layout)
    replaced = replaced_blocks(layout)
    return [i for i in range(layout["original_num_blocks"])
            if by_block.get(i, set()) != set(SUBLAYER_KINDS) or i in replaced]


def kept_attention_blocks(layout: dict[str, Any]) -> list[int]:
    """Dense indices of the blocks whose attention remains, in order (= the KV cache's layers)."""
    by_block = removed_by_block(layout)
    return [i for i in range(layout["original_num_blocks"]) if ATTENTION not in by_block.get(i, set())]


def check_layout(layout: dict[str, Any]) -> None:
    """Refuse a layout this module cannot apply, naming what is wrong."""
    if layout.get("format") != LAYOUT_FORMAT:
        raise ValueError(
            f"pruning layout format {layout.get('format')!r} is not supported (this code reads format {LAYOUT_FORMAT})"
        )
    num_blocks = int(layout["original_num_blocks"])
    out_of_range = sorted({int(e["block"]) for e in layout["removed"] if not 0 <= int(e["block"]) < num_blocks})
    if out_of_range:
        raise ValueError(f"removed blocks {out_of_range} do not exist in a model of {num_blocks} blocks")
    if not kept_blocks(layout):
        raise ValueError("the pruning layout removes every block; nothing would be left of the model")
    check_replacements(layout)


def remove_sublayers(model: nn.Module, layout: dict[str, Any]) -> None:
    """Physically remove the sub-layers listed in ``layout`` from a dense-shaped model, in place.

    Stubs the removed sub-layers, deletes blocks that lost both, and renumbers the remaining attention layers
    ``0..A-1`` so that each one owns one layer of the KV cache built by :func:`attention_cache_config`.
    """
    check_layout(layout)
    modules = layout["modules"]
    blocks = model.get_submodule(modules["blocks"])
    if len(blocks) != layout["original_num_blocks"]:
        raise ValueError(
            f"the model has {len(blocks)} blocks but the pruning layout was made for "
            f"{layout['original_num_blocks']}: apply a layout to the dense model it was searched on"
        )
    for block_index, kinds in removed_by_block(layout).items():
        for kind in sorted(kinds):
            if not is_removed(blocks[block_index], kind, modules):
                stub_sublayer(blocks[block_index], kind, modules)
    install_replacements(model, layout)
    for cache_index, block_index in enumerate(kept_attention_blocks(layout)):
        setattr(getattr(blocks[block_index], modules["attention"]), modules["layer_idx"], cache_index)
    set_submodule(model, modules["blocks"], nn.ModuleList([blocks[i] for i in kept_blocks(layout)]))


def set_pruned_shape(config: Any, layout: dict[str, Any]) -> None:
    """Make ``config`` describe the pruned block list: its block count and, where present, per-block layer types."""
    kept = kept_blocks(layout)
    setattr(config, layout["modules"]["num_layers"], len(kept))
    if layout.get("original_layer_types") is not None:
        config.layer_types = [layout["original_layer_types"][i] for i in kept]


def set_dense_shape(config: Any, layout: dict[str, Any]) -> None:
    """Make ``config`` describe the dense model the layout was made for."""
    setattr(config, layout["modules"]["num_layers"], layout["original_num_blocks"])
    if layout.get("original_layer_types") is not None:
        config.layer_types = list(layout["original_layer_types"])


@contextmanager
def original_shape(config: Any, layout: dict[str, Any]) -> Iterator[None]:
    """Temporarily give a pruned config the dense model's shape, so the dense skeleton can be built first.

    Building dense and then removing keeps every per-index detail of the architecture right (layer types,
    per-layer scaling such as GPT-2's ``scale_attn_by_inverse_layer_idx``), because each block is constructed
    with its original index.
    """
    set_dense_shape(config, layout)
    try:
        yield
    finally:
        set_pruned_shape(config, layout)


def attention_cache_config(config: Any, layout: dict[str, Any]) -> Any:
    """A copy of ``config`` that describes the KV cache of the pruned model: one layer per remaining attention."""
    attention_blocks = kept_attention_blocks(layout)
    cache_config = copy.deepcopy(config)
    setattr(cache_config, layout["modules"]["num_layers"], len(attention_blocks))
    if layout.get("original_layer_types") is not None:
        cache_config.layer_types = [layout["original_layer_types"][i] for i in attention_blocks]
    return cache_config


def removes_attention(layout: dict[str, Any]) -> bool:
    return any(ATTENTION in kinds for kinds in removed_by_block(layout).values())


class CheckpointMismatchError(ValueError):
    """The weights of a pruned checkpoint do not match the pruned model its config describes."""


def loading_problems(loading_info: dict[str, Any]) -> list[str]:
    """Human-readable problems in a ``from_pretrained`` loading report (missing, unexpected or reshaped weights)."""
    problems = []
    for key, what in (("missing_keys", "missing from the weights"), ("unexpected_keys", "not in the pruned model")):
        names = sorted(loading_info.get(key) or ())
        if names:
            problems.append(f"{len(names)} weights {what}: {_preview(names)}")
    mismatched = sorted(loading_info.get("mismatched_keys") or ())
    if mismatched:
        problems.append(f"{len(mismatched)} weights of the wrong shape: {_preview([str(m) for m in mismatched])}")
    return problems


def _preview(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


class PrunedCausalLMMixin:
    """Mixed in front of an architecture's ``*ForCausalLM`` class to build and run its pruned form.

    ``forward`` is added per class by :func:`pruned_classes`, with the base class's signature (``generate`` reads
    it to decide which inputs, e.g. ``position_ids`` for left-padded batches, the model accepts).
    """

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        layout = getattr(config, LAYOUT_KEY, None)
        if not isinstance(layout, dict):
            raise ValueError(f"a pruned model needs a config with the pruning layout under config.{LAYOUT_KEY}")
        check_layout(layout)
        with original_shape(config, layout):
            super().__init__(config, *args, **kwargs)
        remove_sublayers(self, layout)

    @property
    def pruning_layout(self) -> dict[str, Any]:
        return getattr(self.config, LAYOUT_KEY)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """``transformers``' ``from_pretrained``, but refusing weights that do not fit the pruned skeleton.

        ``transformers`` only warns about missing weights and fills them with random values; for a pruned
        checkpoint that means a config and weights that disagree, so it is an error here.
        """
        wants_info = kwargs.pop("output_loading_info", False)
        if "variant" not in kwargs and "gguf_file" not in kwargs:
            path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            kwargs["variant"] = saved_weights_variant(path, kwargs.get("subfolder") or "")
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = loading_problems(info)
        if problems:
            raise CheckpointMismatchError(
                "the pruned checkpoint's weights do not match the pruning layout in its config.json: "
                + "; ".join(problems)
            )
        return (model, info) if wants_info else model

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """``transformers``' ``save_pretrained``, writing the weights as :data:`WEIGHTS_VARIANT` as the model holds
        them (no conversion back to the base type's hub layout, e.g. per-expert MoE tensors).

        So a pruned model saved by any route (``save_pretrained``, ``push_to_hub``, a trainer's checkpoint) stays a
        folder that the dense class refuses instead of loading with random weights in the removed sub-layers.
        """
        kwargs.setdefault("variant", WEIGHTS_VARIANT)
        kwargs.setdefault("save_original_format", False)
        return super().save_pretrained(*args, **kwargs)

    def new_kv_cache(self) -> DynamicCache:
        """An empty KV cache with one layer per remaining attention, each of its original type."""
        return DynamicCache(config=attention_cache_config(self.config, self.pruning_layout))

    def _needs_own_cache(self) -> bool:
        # With only FFNs removed, the block list and the attention numbering are the dense ones, and the
        # architecture's own cache is exact.
        return removes_attention(self.pruning_layout)

    def _has_attention(self) -> bool:
        return bool(kept_attention_blocks(self.pruning_layout))

    def generate(self, *args: Any, **kwargs: Any):
        """``transformers``' ``generate`` with the pruned model's own KV cache (pass ``generation_config`` by name)."""
        if self._needs_own_cache() and not any(kwargs.get(name) is not None for name in CACHE_KEYWORDS):
            generation_config = kwargs.get("generation_config") or self.generation_config
            use_cache = kwargs.get("use_cache", generation_config.use_cache)
            implementation = kwargs.get("cache_implementation", generation_config.cache_implementation)
            if use_cache and implementation not in (None, "dynamic"):
                raise ValueError(
                    f"cache_implementation={implementation!r} is not supported on a model whose attention layers "
                    "were pruned; use the default dynamic cache (leave cache_implementation unset)"
                )
            if use_cache:
                if self._has_attention():
                    for name in CACHE_KEYWORDS:  # an explicit None under either name would clash with ours
                        kwargs.pop(name, None)
                    kwargs[cache_keyword(type(self).forward)] = self.new_kv_cache()
                else:
                    # Nothing to cache, and an empty cache would report every step at position 0.
                    kwargs["use_cache"] = False
        return super().generate(*args, **kwargs)


def _forward_with_pruned_cache(base_forward: Callable) -> Callable:
    """``base_forward`` (a ``*ForCausalLM.forward``), given the pruned KV cache whenever it would build its own.

    The architecture would build a cache from the config, one layer per *block* with the blocks' types; the pruned
    model needs one per remaining *attention* (see :meth:`PrunedCausalLMMixin.new_kv_cache`).
    """
    signature = inspect.signature(base_forward)
    keyword = cache_keyword(base_forward)

    @functools.wraps(base_forward)
    def forward(self, *args: Any, **kwargs: Any):
        if self._needs_own_cache() and keyword in signature.parameters:
            bound = signature.bind(self, *args, **kwargs)
            use_cache = bound.arguments.get("use_cache")
            if use_cache is None:
                use_cache = self.config.use_cache
            given = [bound.arguments.get(keyword), *(bound.kwargs.get(name) for name in CACHE_KEYWORDS)]
            if use_cache and all(cache is None for cache in given):
                if self._has_attention():
                    bound.arguments[keyword] = self.new_kv_cache()
                else:
                    bound.arguments["use_cache"] = False
            return base_forward(*bound.args, **bound.kwargs)
        return base_forward(self, *args, **kwargs)

    return forward


@functools.cache
def pruned_classes(base_model_type: str) -> tuple[type, type]:
    """The pruned config and causal-LM classes for one ``transformers`` model type (e.g. ``"llama"``).

    Named ``FinerCut<Base>Config`` / ``FinerCut<Base>ForCausalLM``. The config class keeps the base model type (a
    folder's ``config.json`` says ``"llama"``; folders of finercut before weights variants say ``finercut_llama``
    and load too); what makes a config pruned is its layout under :data:`LAYOUT_KEY`.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    base_config_class = CONFIG_MAPPING[base_model_type]
    base_model_class = MODEL_FOR_CAUSAL_LM_MAPPING[base_config_class]
    config_class = type(
        f"FinerCut{base_config_class.__name__}",
        (base_config_class,),
        {"model_type": base_model_type, "__module__": __name__},
    )
    model_class = type(
        f"FinerCut{base_model_class.__name__}",
        (PrunedCausalLMMixin, base_model_class),
        {
            "config_class": config_class,
            "forward": _forward_with_pruned_cache(base_model_class.forward),
            "__module__": __name__,
        },
    )
    return config_class, model_class


def is_variant_weights_file(name: str) -> bool:
    """Whether a file name is one of the pruned weights' files (``model.finercut.safetensors`` or a shard of it)."""
    return name.startswith(f"model.{WEIGHTS_VARIANT}")


def saved_weights_variant(path: Any, subfolder: str = "") -> str | None:
    """The weights variant to load from ``path`` (and ``subfolder``): :data:`WEIGHTS_VARIANT`, or None for a folder
    of finercut before variants (plain ``model.safetensors``). A hub id is read as the current format."""
    if path is None or not os.path.isdir(os.path.join(path, subfolder)):
        return WEIGHTS_VARIANT
    names = os.listdir(os.path.join(path, subfolder))
    current = any(is_variant_weights_file(name) or name.endswith(f".{WEIGHTS_VARIANT}.json") for name in names)
    return WEIGHTS_VARIANT if current or not any(name.startswith("model") for name in names) else None
