"""Where each architecture keeps its decoder blocks, sub-layers, norms and output head.

This is the only place with per-architecture knowledge. Everything else asks an :class:`ArchitectureAdapter`.
Sub-layers are skipped by swapping in the parameter-free stand-ins of :mod:`finercut.pruned_modeling`, so every
block still runs through the architecture's own ``transformers`` forward code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finercut.errors import UserError
from finercut.pruned_modeling import LAYOUT_FORMAT, LAYOUT_KEY


class UnsupportedArchitectureError(UserError, ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module paths of one family of decoder-only architectures.

    Paths are dotted attribute paths: ``blocks``, ``final_norm`` and ``head`` from the ``*ForCausalLM`` model;
    ``attention``, ``ffn`` and the norm names from one decoder block.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    attention: str
    attention_norms: tuple[str, ...]
    ffn: str
    ffn_norms: tuple[str, ...]
    final_norm: str
    head: str
    layer_idx: str = "layer_idx"
    num_layers: str = "num_hidden_layers"
    logit_softcap: str | None = None
    """Config attribute holding the final-logit soft-capping value (Gemma 2/3), if the family has one."""
    attention_output: str = "o_proj"
    ffn_output: str = "down_proj"
    """The output projections (paths from the attention / FFN module): the last linear map of each sub-layer,
    whose output the block adds to the residual stream as is. An ``nn.Linear``, a GPT-2 ``Conv1D`` or a stack of
    expert weights ``[experts, hidden, width]`` (an MoE FFN's output is a gate-weighted sum of its experts', so a
    map folded into every expert's projection maps the sum). See :func:`finercut.recovery.fold_into_projection`."""
    fold_refusal: str | None = None
    """Why a linear map cannot be folded exactly into this family's output projections (None: it can)."""

    def module_names(self) -> dict[str, Any]:
        """The layout entry that lets :mod:`finercut.pruned_modeling` find the sub-layers without this registry."""
        return {
            "blocks": self.blocks,
            "attention": self.attention,
            "attention_norms": list(self.attention_norms),
            "ffn": self.ffn,
            "ffn_norms": list(self.ffn_norms),
            "layer_idx": self.layer_idx,
            "num_layers": self.num_layers,
        }

    def output_projection(self, block: nn.Module, kind: str) -> nn.Module | nn.Parameter:
        """The output projection of ``block``'s attention (``kind`` ``"attention"``) or FFN (``"ffn"``)."""
        path = f"{self.attention}.{self.attention_output}" if kind == "attention" else f"{self.ffn}.{self.ffn_output}"
        owner, _, name = path.rpartition(".")
        return getattr(block.get_submodule(owner), name)

    def fold_problem(self, config: Any) -> str | None:
        """Why recovery by folding into the output projections is not exact for a model of this ``config``, or None.
        """
        if self.fold_refusal is not None:
            return self.fold_refusal
        if getattr(config, "use_parallel_residual", False):
            return ("its blocks have a parallel residual (attention and FFN read the same input and share one "
                    "residual add), so no sub-layer's output is the stream a removed run would have read")
        return None

    def blocks_of(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def num_blocks(self, model: nn.Module) -> int:
        return len(self.blocks_of(model))

    def logits(self, model: nn.Module, block_output: torch.Tensor) -> torch.Tensor:
        """Output logits from the last block's output.

        Args:
            block_output: ``[..., hidden]`` residual stream after the last block.

        Returns:
            ``[..., vocab]`` logits exactly as the model's own forward computes them.
        """
        return self.head_logits(model, model.get_submodule(self.final_norm)(block_output))

    def head_logits(self, model: nn.Module, normed_hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the final norm's output: ``[..., hidden] -> [..., vocab]`` (head, then soft-capping)."""
        logits = model.get_submodule(self.head)(normed_hidden)
        cap = getattr(model.config, self.logit_softcap, None) if self.logit_softcap else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def linear_head_weight(self, model: nn.Module) -> torch.Tensor | None:
        """``W`` (``[vocab, hidden]``) if :meth:`head_logits` is exactly ``normed_hidden @ W^T``, else None.

        None for a head with a bias, with final-logit soft-capping, or that is not a plain ``nn.Linear``: then
        no vocabulary-free form of a distance applies. A weight tied to the embeddings is returned as is (read
        only).
        """
        linear = self.linear_head(model)
        if linear is None or linear[1] is not None or linear[2] is not None:
            return None
        return linear[0]

    def linear_head(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float | None] | None:
        """``(W, b, cap)`` if :meth:`head_logits` is ``z = h W^T + b`` followed, with a ``cap``, by
        ``cap tanh(z / cap)``: each logit then depends on its own row of ``W`` only. None if the head is not a
        plain ``nn.Linear``. ``b`` and ``cap`` are None where absent."""
        head = model.get_submodule(self.head)
        if type(head) is not nn.Linear:
            return None
        cap = getattr(model.config, self.logit_softcap, None) if self.logit_softcap else None
        return head.weight, head.bias, cap

    def layout(self, model: nn.Module, removed: list[dict[str, Any]]) -> dict[str, Any]:
        """The pruning layout of ``model`` (dense) with ``removed`` sub-layers, for config and checkpoint."""
        layer_types = getattr(model.config, "layer_types", None)
        return {
            "format": LAYOUT_FORMAT,
            "base_model_type": model.config.model_type,
            "modules": self.module_names(),
            "original_num_blocks": self.num_blocks(model),
            "original_layer_types": list(layer_types) if layer_types is not None else None,
            "removed": [dict(entry) for entry in removed],
        }

    def check_structure(self, model: nn.Module) -> None:
        """Fail early, with the missing path, if ``model`` does not have the layout this adapter expects."""
        for path in (self.blocks, self.final_norm, self.head):
            try:
                model.get_submodule(path)
            except AttributeError as error:
                raise UnsupportedArchitectureError(
                    f"{type(model).__name__} has no module {path!r} expected by the {self.name} adapter"
                ) from error
        blocks = self.blocks_of(model)
        if len(blocks) == 0:
            raise UnsupportedArchitectureError(f"{type(model).__name__} has no decoder blocks")
        for name in (self.attention, self.ffn, *self.attention_norms, *self.ffn_norms):
            if not hasattr(blocks[0], name):
                raise UnsupportedArchitectureError(
                    f"decoder block {type(blocks[0]).__name__} has no sub-module {name!r} expected by the "
                    f"{self.name} adapter"
                )


def _pre_norm(name: str, model_types: tuple[str, ...], **overrides: Any) -> ArchitectureAdapter:
    """Llama-style pre-norm blocks: ``h += Attn(norm1 h); h += FFN(norm2 h)``."""
    fields = dict(
        name=name,
        model_types=model_types,
        blocks="model.layers",
        attention="self_attn",
        attention_norms=("input_layernorm",),
        ffn="mlp",
        ffn_norms=("post_attention_layernorm",),
        final_norm="model.norm",
        head="lm_head",
    )
    fields.update(overrides)
    return ArchitectureAdapter(**fields)


_SANDWICH_NORMS = dict(
    attention_norms=("input_layernorm", "post_attention_layernorm"),
    ffn_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    logit_softcap="final_logit_softcapping",
    fold_refusal="a norm is applied to every sub-layer's output before the residual add (post-attention and "
                 "post-feedforward norms), so a map folded into the output projection would be normalised away",
)

ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    _pre_norm("llama", ("llama",)),
    _pre_norm("mistral", ("mistral",)),
    # ffn = the sparse MoE block (router + experts) as one candidate; its output projection, the experts' stack
    _pre_norm("mixtral", ("mixtral",), ffn_output="experts.down_proj"),
    _pre_norm("qwen2", ("qwen2",)),
    _pre_norm("qwen3", ("qwen3",)),
    _pre_norm("gemma", ("gemma",)),
    _pre_norm("gemma2", ("gemma2",), **_SANDWICH_NORMS),
    _pre_norm("gemma3", ("gemma3_text",), **_SANDWICH_NORMS),
    _pre_norm("phi3", ("phi3",)),
    ArchitectureAdapter(
        name="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        attention="attn",
        attention_norms=("ln_1",),
        ffn="mlp",
        ffn_norms=("ln_2",),
        final_norm="transformer.ln_f",
        head="lm_head",
        attention_output="c_proj",
        ffn_output="c_proj",
    ),
    ArchitectureAdapter(
        # Parallel residual (h + Attn(LN1 h) + FFN(LN2 h)) or sequential, per config.use_parallel_residual: the
        # stand-ins add zero either way, so a removed sub-layer's term simply drops out of the sum.
        name="gpt_neox",
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        attention="attention",
        attention_norms=("input_layernorm",),
        ffn="mlp",
        ffn_norms=("post_attention_layernorm",),
        final_norm="gpt_neox.final_layer_norm",
        head="lm_head",
        attention_output="dense",
        ffn_output="dense_4h_to_h",
    ),
)

_BY_MODEL_TYPE = {model_type: adapter for adapter in ADAPTERS for model_type in adapter.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def adapter_for_config(config: Any) -> ArchitectureAdapter:
    """The adapter for a ``transformers`` config, or a clear error naming the supported model types.

    A pruned model's config (its layout under ``config.finercut``) maps to its base architecture's adapter.
    """
    layout = getattr(config, LAYOUT_KEY, None)
    model_type = layout["base_model_type"] if isinstance(layout, dict) else getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} has cross-attention; finercut prunes decoder-only causal LMs"
        )
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}: finercut has adapters for "
            f"{', '.join(supported_model_types())}. Add an ArchitectureAdapter to finercut/adapters.py for others."
        ) from None


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for a loaded model, after checking the model really has the expected modules."""
    adapter = adapter_for_config(model.config)
    adapter.check_structure(model)
    return adapter
