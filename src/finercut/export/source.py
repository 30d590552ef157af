"""What an export starts from: a pruned model folder (or a run folder holding one), loaded and described per block.

Both export formats describe a pruned model the same way: its remaining blocks in order, each keeping its
attention, its FFN or both (blocks that lost both are gone from a pruned model). :class:`PrunedSource` gathers
that, the dense config the blocks come from, and where the run's dense model came from (a GGUF source lends its
tokenizer to a GGUF export).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from finercut.errors import MissingFileError, UserError
from finercut.jsonio import read_json
from finercut.pruned_modeling import ATTENTION, FFN, LAYOUT_KEY, kept_blocks, removed_by_block

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
"""Base model types whose blocks are Llama's: RMSNorm, rotary attention (GQA), gated SiLU MLP."""


class ExportError(UserError, ValueError):
    """The model cannot be written in the requested format; the message says why and what would work."""


@dataclass(frozen=True)
class KeptBlock:
    """One block of the pruned model: its index there, the dense block it came from, and what it kept."""

    index: int
    dense_index: int
    attention: bool
    ffn: bool


@dataclass
class PrunedSource:
    """A loaded pruned model and the facts an export needs about it."""

    model: nn.Module
    tokenizer: Any
    folder: Path
    layout: dict[str, Any]
    blocks: list[KeptBlock]
    source_model: dict[str, Any]
    """The dense model the run pruned, as the record describes it (``kind``, ``location``, ``id``...); may be empty."""
    recovery: dict[str, Any] | None = None
    """The recovery the pruned folder records (a fold: its options, where each run went, what stayed unrecovered)."""

    def recovery_summary(self) -> dict[str, Any] | None:
        """What an export repeats about the recovery (None without one)."""
        if not self.recovery:
            return None
        keys = ("method", "target", "ridge", "group", "folded", "folds", "unrecovered")
        return {key: self.recovery[key] for key in keys if key in self.recovery}

    @property
    def base_model_type(self) -> str:
        return self.layout["base_model_type"]

    def source_gguf(self) -> Path | None:
        """The GGUF file the dense model was read from, if that is how the run loaded it and it is still there."""
        if self.source_model.get("kind") != "gguf":
            return None
        path = Path(self.source_model.get("location", ""))
        return path if path.is_file() else None


def kept_block_list(layout: dict[str, Any]) -> list[KeptBlock]:
    """The pruned model's blocks, in order, from a pruning layout."""
    by_block = removed_by_block(layout)
    return [
        KeptBlock(index=i, dense_index=dense, attention=ATTENTION not in by_block.get(dense, set()),
                  ffn=FFN not in by_block.get(dense, set()))
        for i, dense in enumerate(kept_blocks(layout))
    ]


def pruned_model_folder(path: str | Path) -> Path:
    """The pruned model folder of ``path``: the folder itself, or a run folder's ``model/``.

    Raises:
        ExportError: ``path`` is neither, or is a run written without its model.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(f"{path} does not exist")
    if path.is_dir() and (path / "model" / "config.json").is_file():
        path = path / "model"
    elif path.is_dir() and (path / "record.json").is_file() and not (path / "config.json").is_file():
        raise ExportError(f"run folder {path} holds no pruned model (model/); write one with "
                          f"`finercut apply {path} --output DIR` and export DIR")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{path} is neither a pruned model folder nor a run folder (no config.json, no model/)")
    if LAYOUT_KEY not in read_json(config_file, what="model config", expect=dict):
        raise ExportError(f"{path} is not a model pruned by finercut (its config.json has no pruning layout); "
                          "export the pruned folder a run wrote (RUN/model) or one written by `finercut apply`")
    return path


def load_source(path: str | Path) -> PrunedSource:
    """Load the pruned model (CPU, the saved dtype) and its tokenizer from a pruned folder or a run folder."""
    from finercut.checkpoint import REPORT_FILE, load_pruned, load_pruned_tokenizer

    folder = pruned_model_folder(path)
    model = load_pruned(folder)
    tokenizer = load_pruned_tokenizer(folder) if (folder / "tokenizer_config.json").is_file() else None
    report = folder / REPORT_FILE
    provenance = read_json(report, what="pruning report", expect=dict).get("provenance", {}) if report.is_file() else {}
    layout = getattr(model.config, LAYOUT_KEY)
    return PrunedSource(model=model, tokenizer=tokenizer, folder=folder, layout=layout,
                        blocks=kept_block_list(layout), source_model=dict(provenance.get("source_model") or {}),
                        recovery=provenance.get("recovery") or None)


def check_llama_family(config: Any, blocks: Sequence[KeptBlock], format_name: str) -> None:
    """Refuse what neither DeciLM loader (vLLM, llama.cpp) can run, from the pruned config alone.

    Both build every block from Llama's parts with one head size ``hidden_size / num_attention_heads`` and a
    gated SiLU MLP, and neither has sliding-window attention in this architecture.
    """
    layout = getattr(config, LAYOUT_KEY)
    base = layout["base_model_type"]
    if layout.get("replacements"):
        raise ExportError(f"--format {format_name}: the model replaces removed sub-layers by fitted maps (recovery); "
                          "the DeciLM and GGUF layouts have no place for them. Export the model without recovery, "
                          "or recovered with --recover fold (merged into the weights)")
    if base not in LLAMA_FAMILY:
        raise ExportError(f"--format {format_name} writes Llama-family models ({', '.join(LLAMA_FAMILY)}); this model "
                          f"is {base!r}, whose blocks the DeciLM layout cannot express")
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if hidden % heads or head_dim != hidden // heads:
        raise ExportError(f"--format {format_name}: head size {head_dim} is not hidden_size / num_attention_heads "
                          f"= {hidden}/{heads}; the DeciLM loaders derive the head size from those two")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"--format {format_name}: hidden_act {config.hidden_act!r}; llama.cpp's deci graph runs "
                          "a SiLU-gated MLP only")
    if _sliding_window(config) is not None:
        raise ExportError(f"--format {format_name}: the model uses sliding-window attention (window "
                          f"{_sliding_window(config)}); neither vLLM's nor llama.cpp's DeciLM code applies a window")
    if not blocks[0].attention:
        raise ExportError(
            f"--format {format_name}: the first remaining block (dense block {blocks[0].dense_index}) has no "
            "attention. llama.cpp takes the head size from layer 0's head count (0 here), and vLLM's "
            "DeciLMDecoderLayer runs its first FFN norm without the residual an attention would have set; both "
            "would fail. "
            "Export a prefix of the run that keeps it (`finercut apply RUN --count N`)."
        )


def _sliding_window(config: Any) -> int | None:
    if getattr(config, "model_type", "").endswith("qwen2") and not getattr(config, "use_sliding_window", False):
        return None
    return getattr(config, "sliding_window", None)


def expected_weight_names(source: PrunedSource) -> set[str]:
    """Every weight name the DeciLM layout allows for this model (biases included where the config has them)."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for block in source.blocks:
        prefix = f"model.layers.{block.index}."
        if block.attention:
            names.add(prefix + "input_layernorm.weight")
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                names.update({prefix + f"self_attn.{proj}.weight", prefix + f"self_attn.{proj}.bias"})
        if block.ffn:
            names.add(prefix + "post_attention_layernorm.weight")
            for proj in ("gate_proj", "up_proj", "down_proj"):
                names.update({prefix + f"mlp.{proj}.weight", prefix + f"mlp.{proj}.bias"})
    return names


def check_plain_weights(source: PrunedSource, format_name: str) -> None:
    """Refuse weights outside the Llama block layout, which neither format can express (they would be dropped
    silently otherwise)."""
    unexpected = sorted(set(source.model.state_dict()) - expected_weight_names(source))
    if unexpected:
        raise ExportError(f"--format {format_name}: weights with no place in the Llama block layout: "
                          f"{', '.join(unexpected[:6])}")
