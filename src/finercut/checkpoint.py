"""Physically pruned models: apply a search result, save a folder that reloads, load it back, and report sizes.

A saved folder is an ordinary ``transformers`` model folder: its config keeps the base model type (``llama``) and
adds the pruning layout under ``config.finercut`` and an ``auto_map`` pointing at ``modeling_finercut.py``, a copy
of :mod:`finercut.pruned_modeling` (torch + transformers only) written next to the weights, which are saved as the
weights variant ``model.finercut.safetensors``. So it loads with

* ``finercut.load_pruned(path)`` (checks config against weights before reading them), or
* ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` without finercut installed,

and ``AutoTokenizer.from_pretrained(path)`` loads its tokenizer without a question about custom code. Without
``trust_remote_code`` the base class finds no ``model.safetensors`` and refuses; it never builds the dense
architecture with random weights in the removed places.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from finercut import pruned_modeling
from finercut.adapters import ArchitectureAdapter, adapter_for, adapter_for_config
from finercut.candidates import Unit, removed_sublayers
from finercut.errors import ConfigError, MissingFileError, OutputExistsError
from finercut.weights import check_safetensors_complete
from finercut.pruned_modeling import (
    ATTENTION,
    FFN,
    LAYOUT_KEY,
    CheckpointMismatchError,
    kept_attention_blocks,
    kept_blocks,
    pruned_classes,
    removed_by_block,
    removes_attention,
    set_dense_shape,
    set_pruned_shape,
)

MODELING_FILE = "modeling_finercut.py"
REPORT_FILE = "pruning.json"
CONFIG_FILE = "config.json"
CATEGORIES = ("attention", "ffn", "norms", "embeddings", "other")
CATEGORY_LABELS = {"embeddings": "embeddings/head"}


# ---------------------------------------------------------------------------------------------------------------------
# Applying a removal


def is_pruned(model_or_config: Any) -> bool:
    """Whether a model (or config) already carries a finercut pruning layout."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, LAYOUT_KEY, None) is not None


def apply_removal(
    model: nn.Module, removed: Iterable[Unit | dict[str, Any]], *, num_blocks: int | None = None,
    replacements: Iterable[tuple[dict[str, Any], dict[str, torch.Tensor]]] = (),
) -> nn.Module:
    """Physically remove sub-layers from a dense model, in place, and make it the pruned class.

    The removed attention / FFN modules (and their norms) are dropped, blocks that lost both are deleted, the
    remaining attention layers are renumbered for the KV cache, and the config records the layout
    (``config.finercut``), the pruned block count and ``auto_map`` for saving.

    Args:
        model: a dense ``*ForCausalLM`` of a supported architecture.
        removed: units in removal order, as :class:`Unit` or ``{"block": int, "kind": str}`` (a search record's
            ``removed``); ``kind`` ``"block"`` removes both sub-layers.
        num_blocks: the block count the units were found on (a record's ``model.num_blocks``), checked if given.
        replacements: fitted stand-ins for removed sub-layers (see :func:`finercut.recover`), each a layout
            entry ``{"block", "kind", "map", "rank", "covers"}`` and its tensors (``bias``, ``weight`` or
            ``down``/``up``).

    Returns:
        ``model`` itself, now an instance of ``FinerCut<Base>ForCausalLM``.

    Raises:
        ValueError: the model is already pruned, the block count differs, a unit is out of range or repeated, or
            the units would remove every block.
    """
    if is_pruned(model):
        raise ConfigError(
            "the model is already pruned (its config has a finercut layout); apply a record to the dense model"
        )
    adapter = adapter_for(model)
    dense_blocks = adapter.num_blocks(model)
    if num_blocks is not None and num_blocks != dense_blocks:
        raise ConfigError(
            f"the record was made for a model of {num_blocks} blocks but this model has {dense_blocks}; "
            "apply it to the model it was searched on"
        )
    sublayers = _checked_sublayers(removed, dense_blocks)
    layout = adapter.layout(model, [unit.to_dict() for unit in sublayers])
    replacements = list(replacements)
    if replacements:
        layout["replacements"] = [dict(entry) for entry, _ in replacements]
    pruned_modeling.check_layout(layout)

    config_class, model_class = pruned_classes(model.config.model_type)
    pruned_modeling.remove_sublayers(model, layout)
    _load_replacement_tensors(model, layout, [tensors for _, tensors in replacements])
    config = model.config
    setattr(config, LAYOUT_KEY, layout)
    set_pruned_shape(config, layout)
    config.__class__ = config_class
    config.architectures = [model_class.__name__]
    config.auto_map = auto_map(config_class, model_class)
    if removes_attention(layout) and getattr(model.generation_config, "cache_implementation", None):
        # A static or hybrid cache is sized from the config's block list, which no longer matches the attention
        # layers; the pruned model brings its own dynamic cache instead.
        model.generation_config.cache_implementation = None
    model.__class__ = model_class
    return model


def _load_replacement_tensors(model: nn.Module, layout: dict[str, Any],
                              tensors: list[dict[str, torch.Tensor]]) -> None:
    """Copy fitted tensors into the replacement modules :func:`remove_sublayers` installed (dense -> kept index)."""
    blocks = model.get_submodule(layout["modules"]["blocks"])
    kept = kept_blocks(layout)
    for entry, values in zip(layout.get("replacements") or (), tensors):
        main_name, _ = pruned_modeling.sublayer_module_names(layout["modules"], entry["kind"])
        getattr(blocks[kept.index(int(entry["block"]))], main_name).load_state_dict(values, strict=True)


def _checked_sublayers(removed: Iterable[Unit | dict[str, Any]], num_blocks: int) -> list[Unit]:
    units = [unit if isinstance(unit, Unit) else Unit.from_dict(unit) for unit in removed]
    sublayers = removed_sublayers(units)
    out_of_range = sorted({unit.block for unit in sublayers if not 0 <= unit.block < num_blocks})
    if out_of_range:
        raise ConfigError(f"blocks {out_of_range} do not exist: the model has {num_blocks} blocks")
    repeated = sorted({str(unit) for unit in sublayers if sublayers.count(unit) > 1})
    if repeated:
        raise ConfigError(f"sub-layers removed more than once: {', '.join(repeated)}")
    return sublayers


def auto_map(config_class: type, model_class: type) -> dict[str, str]:
    """The config's ``auto_map``: both classes come from the modeling file saved next to the weights."""
    module = Path(MODELING_FILE).stem
    return {
        "AutoConfig": f"{module}.{config_class.__name__}",
        "AutoModelForCausalLM": f"{module}.{model_class.__name__}",
    }


# ---------------------------------------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class ParameterStats:
    """Parameters and weight bytes of one model, per category (:data:`CATEGORIES`); tied tensors counted once."""

    parameters: dict[str, int]
    bytes: dict[str, int]

    @property
    def total_parameters(self) -> int:
        return sum(self.parameters.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def to_dict(self) -> dict[str, Any]:
        return {"parameters": dict(self.parameters), "bytes": dict(self.bytes)}


def parameter_category(name: str, module: nn.Module, adapter: ArchitectureAdapter) -> str:
    """The :data:`CATEGORIES` entry of parameter ``name`` (a full dotted name), owned directly by ``module``."""
    blocks_prefix = adapter.blocks + "."
    if name.startswith(blocks_prefix):
        sublayer = name[len(blocks_prefix):].split(".")[1]
        if sublayer == adapter.attention:
            return "attention"
        if sublayer == adapter.ffn:
            return "ffn"
        if sublayer in (*adapter.attention_norms, *adapter.ffn_norms):
            return "norms"
        return "other"
    if name.startswith(adapter.final_norm + "."):
        return "norms"
    if name.startswith(adapter.head + ".") or isinstance(module, nn.Embedding):
        return "embeddings"
    return "other"


def parameter_stats(model: nn.Module, *, dtype: torch.dtype | None = None) -> ParameterStats:
    """Parameters and bytes per category of ``model`` (dense or pruned).

    Args:
        dtype: count bytes as if every parameter had this dtype (for skeletons on the meta device); default:
            each parameter's own dtype.
    """
    adapter = adapter_for_config(model.config)
    parameters = dict.fromkeys(CATEGORIES, 0)
    sizes = dict.fromkeys(CATEGORIES, 0)
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied weights (embeddings and head) count once
                continue
            seen.add(id(param))
            category = parameter_category(f"{module_name}.{param_name}".lstrip("."), module, adapter)
            itemsize = (dtype or param.dtype).itemsize
            parameters[category] += param.numel()
            sizes[category] += param.numel() * itemsize
    return ParameterStats(parameters, sizes)


def dense_config(config: Any) -> Any:
    """The config of the dense model a pruned config came from (a new object of the base architecture's class)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    layout = getattr(config, LAYOUT_KEY)
    pruned_only = (LAYOUT_KEY, "auto_map", "architectures", "model_type")
    values = {key: value for key, value in config.to_dict().items() if key not in pruned_only}
    dense = CONFIG_MAPPING[layout["base_model_type"]].from_dict(values)
    set_dense_shape(dense, layout)
    return dense


def dense_parameter_stats(pruned: nn.Module) -> ParameterStats:
    """:func:`parameter_stats` of the dense model ``pruned`` came from, from a skeleton on the meta device.

    Exact for parameter counts; bytes assume the dense model had the pruned model's dtype throughout.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = dense_config(pruned.config)
    with torch.device("meta"):
        skeleton = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    return parameter_stats(skeleton, dtype=pruned.dtype)


@dataclass(frozen=True)
class SizeReport:
    """Sizes of a model before and after pruning, per category, and of the saved weight files."""

    before: ParameterStats
    after: ParameterStats
    weight_file_bytes: int | None = None
    """Total size of the saved ``*.safetensors`` files (tensor data plus their small JSON headers)."""

    def removed_parameters(self) -> int:
        return self.before.total_parameters - self.after.total_parameters

    def removed_bytes(self) -> int:
        return self.before.total_bytes - self.after.total_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "removed_parameters": self.removed_parameters(),
            "removed_bytes": self.removed_bytes(),
            "weight_file_bytes": self.weight_file_bytes,
        }

    def format(self) -> str:
        """A table: parameters and weight bytes (MiB) before / after / removed, per category and in total."""
        header = (f"{'':16} {'params before':>15} {'after':>15} {'removed':>15}   "
                  f"{'MiB before':>10} {'after':>10} {'removed':>10}")
        lines = [header, "-" * len(header)]
        rows = [(CATEGORY_LABELS.get(c, c), self.before.parameters[c], self.after.parameters[c],
                 self.before.bytes[c], self.after.bytes[c]) for c in CATEGORIES]
        rows.append(("total", self.before.total_parameters, self.after.total_parameters,
                     self.before.total_bytes, self.after.total_bytes))
        for label, p_before, p_after, b_before, b_after in rows:
            if label == "total":
                lines.append("-" * len(header))
            lines.append(
                f"{label:16} {p_before:>15,} {p_after:>15,} {p_before - p_after:>15,}   "
                f"{_mib(b_before):>10} {_mib(b_after):>10} {_mib(b_before - b_after):>10}"
            )
        share = self.removed_parameters() / self.before.total_parameters if self.before.total_parameters else 0.0
        lines.append(f"removed {self.removed_parameters():,} parameters ({share:.2%}), "
                     f"{self.removed_bytes():,} bytes of weights")
        if self.weight_file_bytes is not None:
            lines.append(f"saved weight files: {self.weight_file_bytes:,} bytes")
        return "\n".join(lines)


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f}"


# ---------------------------------------------------------------------------------------------------------------------
# Saving


def save_pruned(
    model: nn.Module, path: str | os.PathLike, *, tokenizer: Any = None, dense_stats: ParameterStats | None = None,
    overwrite: bool = False, max_shard_size: str | int | None = None, provenance: dict[str, Any] | None = None,
) -> SizeReport:
    """Save a pruned model (see :func:`apply_removal`) as a folder that reloads through ``transformers``.

    Writes to a hidden temporary folder next to ``path`` and renames it into place only when complete and
    verified, so an interrupted save never leaves a folder that looks complete.

    Args:
        path: the model folder to create.
        tokenizer: saved alongside, if given.
        dense_stats: :func:`parameter_stats` of the dense model, measured before :func:`apply_removal`; default:
            computed from a meta-device skeleton of the dense architecture.
        overwrite: replace an existing non-empty ``path`` (otherwise refused).
        max_shard_size: passed to ``save_pretrained`` (default: transformers' own).
        provenance: extra facts for ``pruning.json`` (e.g. the source model and the run).

    Returns:
        The :class:`SizeReport`, also written to ``pruning.json``.

    A model read from GGUF loses its (already dequantized) quantizer here, which ``save_pretrained`` refuses.
    """
    if not is_pruned(model):
        raise ValueError("the model is not pruned; call apply_removal(model, removed) before save_pruned")
    path = Path(path).expanduser().resolve()
    check_save_target(path, overwrite=overwrite)
    _drop_gguf_quantizer(model)
    before = dense_stats if dense_stats is not None else dense_parameter_stats(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(staging, **extra)  # the pruned class's: the finercut weights variant, as held
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / MODELING_FILE).write_text(modeling_source(model.config.finercut["base_model_type"]))
        report = SizeReport(before, parameter_stats(model), weight_file_bytes(staging))
        _write_json(staging / REPORT_FILE, pruning_summary(model.config, report, provenance))
        _write_manifest(staging)
        check_checkpoint(staging)
        _use_default_permissions(staging)
        _move_into_place(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


MODEL_FOLDER_FILES = re.compile(
    r"^(config\.json|generation_config\.json|.*\.safetensors|model\.safetensors\.index(\.finercut)?\.json|tokenizer.*|"
    r"special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json)|"
    r"modeling_finercut\.py|pruning\.json)$")
"""What a pruned folder of an older finercut (written without a manifest) holds."""


def foreign_files(path: Path) -> list[str]:
    """Entries of a model folder that :func:`save_pruned` did not write (by its manifest; for a folder of an older
    finercut, by the names a pruned folder holds)."""
    from finercut.folder import Manifest

    manifest = Manifest.read(path)
    names = sorted(p.name for p in path.iterdir())
    if manifest.present:
        return [name for name in names if not manifest.written_by_finercut(name)]
    return [name for name in names if not MODEL_FOLDER_FILES.match(name)]


def check_save_target(path: Path, *, overwrite: bool) -> None:
    """Refuse, before any work, a model folder that :func:`save_pruned` would not be allowed to write: an existing
    one without ``overwrite``, or one holding anything finercut did not write (never deleted, even then)."""
    path = Path(path).expanduser()
    for part in path.parts:
        if len(part.encode()) > 255:
            raise OutputExistsError(f"{path}: the name {part[:40]}... is longer than 255 bytes")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a folder")
    if not path.is_dir() or not any(path.iterdir()):
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise OutputExistsError(f"{path}: {parent} is a file, not a folder")
        return
    if not overwrite:
        raise OutputExistsError(f"{path} exists and is not empty; choose another folder or pass overwrite=True")
    foreign = foreign_files(path)
    if foreign:
        raise OutputExistsError(f"{path} holds files finercut did not write ({', '.join(foreign[:5])}"
                                f"{'...' if len(foreign) > 5 else ''}); not even --overwrite replaces them: choose "
                                "another folder or move them")


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """A model read from GGUF holds plain dequantized tensors but keeps its quantizer, which blocks saving."""
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is None:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(
        quantization, "quant_method", None)
    if str(getattr(method, "value", method)).lower() != "gguf":
        raise ConfigError(f"cannot save a model quantized with {method!r}; load it unquantized to prune and save it")
    model.hf_quantizer = None
    del model.config.quantization_config


def modeling_source(base_model_type: str) -> str:
    """``modeling_finercut.py``: :mod:`finercut.pruned_modeling` plus the two classes ``auto_map`` names."""
    config_class, model_class = pruned_classes(base_model_type)
    source = Path(pruned_modeling.__file__).read_text()
    return (
        source.rstrip("\n")
        + "\n\n\n# Written by finercut for this checkpoint: the classes config.json's auto_map names.\n"
        + f"{config_class.__name__}, {model_class.__name__} = pruned_classes({base_model_type!r})\n"
    )


def weight_file_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.glob("*.safetensors"))


def pruning_summary(config: Any, report: SizeReport, provenance: dict[str, Any] | None) -> dict[str, Any]:
    """The human-readable ``pruning.json``: what was removed, what is left of each dense block, and the sizes."""
    import transformers

    from finercut.version import __version__

    layout = getattr(config, LAYOUT_KEY)
    by_block = removed_by_block(layout)
    kept = kept_blocks(layout)
    return {
        "format": "finercut-pruned-model/1",
        "base_model_type": layout["base_model_type"],
        "original_num_blocks": layout["original_num_blocks"],
        "num_blocks": len(kept),
        "num_attention_layers": len(kept_attention_blocks(layout)),
        "removed": layout["removed"],
        "replacements": layout.get("replacements") or [],
        "blocks": [
            {
                "dense_block": index,
                "pruned_block": kept.index(index) if index in kept else None,
                "attention": ATTENTION not in by_block.get(index, set()),
                "ffn": FFN not in by_block.get(index, set()),
            }
            for index in range(layout["original_num_blocks"])
        ],
        "size": report.to_dict(),
        "load": {
            "finercut": "finercut.load_pruned(path)",
            "transformers": "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
        },
        "versions": {"finercut": __version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "provenance": provenance or {},
    }


def _write_manifest(folder: Path) -> None:
    """List what this save wrote, so that a later ``overwrite`` replaces the folder only if it still holds nothing
    else."""
    from finercut.folder import Manifest

    manifest = Manifest(folder)
    for entry in sorted(folder.iterdir()):
        manifest.entries[entry.name] = {"for": None}
    manifest.finish(REPORT_FILE, None)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _use_default_permissions(folder: Path) -> None:
    """Give every file the permissions the umask allows: weights written through a private temporary file
    (0600) would otherwise be unreadable to the other users of a shared model folder."""
    umask = os.umask(0)
    os.umask(umask)
    for file in folder.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)


def _move_into_place(staging: Path, path: Path) -> None:
    """Rename the finished folder to ``path``; an existing folder is only removed once the new one is in place."""
    if not path.exists():
        staging.rename(path)
        return
    if not any(path.iterdir()):
        path.rmdir()
        staging.rename(path)
        return
    old = path.parent / f".{path.name}.replaced-{uuid.uuid4().hex[:8]}"
    path.rename(old)
    staging.rename(path)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def read_pruned_config(path: str | os.PathLike) -> Any:
    """The pruned config of a saved folder (finercut's own class, no remote code), or a clear error."""
    from finercut.jsonio import read_json

    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise MissingFileError(f"{path} has no {CONFIG_FILE}; is it a model folder?")
    layout = read_json(config_file, what="model config", expect=dict).get(LAYOUT_KEY)
    if not isinstance(layout, dict):
        raise ConfigError(f"{config_file} has no finercut pruning layout: {path} is not a model saved by finercut")
    config_class, _ = pruned_classes(layout["base_model_type"])
    # finercut's own config class: the folder's auto_map (to its copy of the code) is never consulted. A folder of
    # finercut before weights variants names the model type finercut_<base>; it is the same config.
    values, _ = config_class.get_config_dict(path)
    values["model_type"] = config_class.model_type
    return config_class.from_dict(values)


def check_checkpoint(path: str | os.PathLike, config: Any = None) -> None:
    """Refuse a folder whose weights do not match the pruned model its config describes (before loading them).

    Compares the names and shapes in the safetensors headers with a meta-device skeleton built from the config.

    Raises:
        CheckpointMismatchError: naming the missing, unexpected or reshaped weights.
    """
    path = Path(path)
    config = config if config is not None else read_pruned_config(path)
    _, model_class = pruned_classes(getattr(config, LAYOUT_KEY)["base_model_type"])
    with torch.device("meta"):
        skeleton = model_class(copy.deepcopy(config))
    expected = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    optional = set(getattr(skeleton, "all_tied_weights_keys", None) or {})  # tied copies are saved once
    saved = saved_tensor_shapes(path)
    missing = sorted(set(expected) - set(saved) - optional)
    unexpected = sorted(set(saved) - set(expected))
    reshaped = sorted(f"{n} {saved[n]} (expected {expected[n]})" for n in set(saved) & set(expected)
                      if saved[n] != expected[n])
    if missing or unexpected or reshaped:
        problems = pruned_modeling.loading_problems(
            {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": reshaped}
        )
        removed = ", ".join(str(Unit.from_dict(e)) for e in getattr(config, LAYOUT_KEY)["removed"]) or "nothing"
        raise CheckpointMismatchError(
            f"{path}: the weights do not match the pruned model config.json describes (removed: {removed}): "
            + "; ".join(problems)
        )


def saved_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over all safetensors files of a folder, from their headers only."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointMismatchError(f"{path} holds no .safetensors weight files")
    variant = [file for file in files if pruned_modeling.is_variant_weights_file(file.name)]
    if variant and len(variant) < len(files):
        stale = ", ".join(file.name for file in files if file not in variant)
        raise CheckpointMismatchError(
            f"{path} holds the pruned weights (model.{pruned_modeling.WEIGHTS_VARIANT}*.safetensors) and other weight "
            f"files ({stale}), which transformers' dense class would read: delete them")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        check_safetensors_complete(file)
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def load_pruned(
    path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device_map: Any = None, **kwargs: Any
) -> nn.Module:
    """Load a folder written by :func:`save_pruned` as the pruned model, in eval mode.

    Uses finercut's own copy of the pruned classes (no remote code runs), and checks config against weights
    before reading them.

    Args:
        dtype: as for ``from_pretrained`` (default: the dtype of the saved weights).
        device_map: as for ``from_pretrained``.
        **kwargs: passed on to ``from_pretrained``.

    Raises:
        ValueError: the folder is not a finercut pruned model.
        CheckpointMismatchError: its config and weights disagree.
        ConfigError: a ``trust_remote_code`` argument (finercut's own classes need no code from the folder).
    """
    _refuse_trust_remote_code(kwargs, "load_pruned")
    path = Path(path).expanduser()
    config = read_pruned_config(path)
    check_checkpoint(path, config)
    _, model_class = pruned_classes(getattr(config, LAYOUT_KEY)["base_model_type"])
    options = {"dtype": dtype} if dtype is not None else {}
    if device_map is not None:
        options["device_map"] = device_map
    # False, not unset: it also keeps transformers from loading a custom_generate/ folder's generate function.
    model = model_class.from_pretrained(path, config=config, trust_remote_code=False, **options, **kwargs)
    return model.eval()


def load_pruned_tokenizer(path: str | os.PathLike, **kwargs: Any) -> Any:
    """The tokenizer saved with a pruned model (``kwargs`` go to ``AutoTokenizer.from_pretrained``).

    Raises:
        RemoteCodeError: the folder's tokenizer_config.json names a tokenizer only its own code defines.
    """
    from transformers import AutoTokenizer

    from finercut.jsonio import read_json
    from finercut.modelio import RemoteCodeError, tokenizer_code_refusal

    _refuse_trust_remote_code(kwargs, "load_pruned_tokenizer")
    path = Path(path).expanduser()
    config = read_pruned_config(path)
    tokenizer_file = path / "tokenizer_config.json"
    reason = tokenizer_code_refusal(read_json(tokenizer_file, what="tokenizer config", expect=dict)
                                    if tokenizer_file.exists() else {})
    if reason is not None:
        raise RemoteCodeError(f"cannot load the tokenizer of {path}: {reason}")
    # Handing over the config spares AutoTokenizer reading config.json itself and meeting its auto_map.
    return AutoTokenizer.from_pretrained(path, config=config, trust_remote_code=False, **kwargs)


def _refuse_trust_remote_code(kwargs: dict[str, Any], function: str) -> None:
    if "trust_remote_code" in kwargs:
        raise ConfigError(f"{function} builds finercut's own classes and never runs a folder's code; "
                          "drop the trust_remote_code argument")


__all__ = [
    "CheckpointMismatchError",
    "ParameterStats",
    "SizeReport",
    "apply_removal",
    "check_checkpoint",
    "dense_parameter_stats",
    "is_pruned",
    "load_pruned",
    "load_pruned_tokenizer",
    "parameter_stats",
    "save_pruned",
]
