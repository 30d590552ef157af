"""Models bigger than one device: ``--device-map auto|balanced|balanced_low_0|sequential|FILE.json`` via accelerate.

``transformers`` hands the map to accelerate, which places every module on a GPU, the CPU or the disk and moves
each module's inputs to where it runs. The search needs nothing else: a cached block input stays where the
block before it produced it and is moved (once per call, only at a device boundary) into its block; the output
head and the distance run where the head lives.

With ``torchrun``, the ranks of one node share its GPUs: rank ``LOCAL_RANK`` of ``LOCAL_WORLD_SIZE`` gets the
contiguous share ``[LOCAL_RANK * G / LOCAL_WORLD_SIZE, ...)`` of the node's ``G`` GPUs through accelerate's
``max_memory`` (:func:`gpu_share`), and ``1 / LOCAL_WORLD_SIZE`` of the free CPU memory for CPU offload. GPU
numbers in a FILE.json map count within the rank's share (``0`` is the rank's first GPU), so one file serves
every rank. Example, 8 x 80 GB GPUs and a 70B model in bfloat16 (140 GB): two ranks of four GPUs each::

    torchrun --nproc-per-node 2 -m finercut prune --model meta-llama/Meta-Llama-3-70B --device-map balanced \\
        --ratio 0.25 --samples 32 --seq-len 1024 --output runs/llama3-70b-25
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from finercut.distributed import World
from finercut.errors import ConfigError, MissingFileError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's own placement strategies."""
PLACES = ("cpu", "disk", "mps")


def resolve_device_map(value: str | None) -> str | None:
    """A strategy as given, or a map file as an absolute path (what ``run.json`` records); checks the file."""
    if value is None or value in STRATEGIES:
        return value
    path = Path(value).expanduser().resolve()
    read_device_map_file(path)
    return str(path)


def read_device_map_file(path: Path) -> dict[str, int | str]:
    """A JSON object ``{"module.name": device}`` with devices ``0``, ``"cuda:1"``, ``"cpu"``, ``"disk"``, ``"mps"``.

    Raises:
        MissingFileError: no such file.
        ConfigError: not a JSON object of module names to devices.
    """
    if not path.is_file():
        raise MissingFileError(f"--device-map {path}: neither one of {', '.join(STRATEGIES)} nor an existing "
                               "JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"device map {path} is not readable JSON: {error}") from error
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"device map {path} must be a JSON object of module names to devices")
    for module, device in data.items():
        if isinstance(device, bool) or not (isinstance(device, int) and device >= 0 or device in PLACES
                                            or _cuda_index(device) is not None):
            raise ConfigError(f"device map {path}: {module!r} -> {device!r} is not a device (0, 'cuda:1', "
                              f"{', '.join(repr(p) for p in PLACES)})")
    return data


def _cuda_index(device: Any) -> int | None:
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    return None


def gpu_share(world: World, gpu_count: int) -> list[int]:
    """The GPUs of this node that rank ``world.local_rank`` may use: an equal contiguous share.

    Raises:
        ConfigError: more ranks on the node than GPUs.
    """
    if world.local_size == 1:
        return list(range(gpu_count))
    if gpu_count < world.local_size:
        raise ConfigError(f"{world.local_size} ranks on a node with {gpu_count} GPUs cannot each have a share for "
                          f"--device-map: use --nproc-per-node {max(gpu_count, 1)} or fewer")
    per_rank = gpu_count // world.local_size
    return list(range(world.local_rank * per_rank, (world.local_rank + 1) * per_rank))


def rank_max_memory(world: World, gpu_bytes: list[int], cpu_bytes: int) -> dict[int | str, int] | None:
    """accelerate's ``max_memory`` for this rank: its GPU share in full and its part of the CPU memory.

    None (accelerate's own default: every device) when the rank is alone on its node.
    """
    if world.local_size == 1:
        return None
    return {**{gpu: gpu_bytes[gpu] for gpu in gpu_share(world, len(gpu_bytes))}, "cpu": cpu_bytes // world.local_size}


def remap_to_share(device_map: dict[str, int | str], share: list[int]) -> dict[str, int | str]:
    """A map file's GPU numbers (counted within the rank's share) as this node's GPU numbers."""
    def place(module: str, device: int | str) -> int | str:
        index = device if isinstance(device, int) else _cuda_index(device)
        if index is None:
            return device
        if index >= len(share):
            raise ConfigError(f"device map: {module!r} -> {device!r}, but this rank has {len(share)} GPU(s) "
                              f"({share}); GPU numbers count within each rank's share")
        return share[index]

    return {module: place(module, device) for module, device in device_map.items()}


def placement_options(device_map: str | None, world: World) -> dict[str, Any]:
    """The keyword arguments of ``from_pretrained`` that place the model as ``device_map`` says, for this rank."""
    if device_map is None:
        return {}
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    share = gpu_share(world, gpus) if gpus else []
    if device_map in STRATEGIES:
        options: dict[str, Any] = {"device_map": device_map}
        if gpus:
            gpu_bytes = [torch.cuda.get_device_properties(i).total_memory for i in range(gpus)]
            max_memory = rank_max_memory(world, gpu_bytes, _free_cpu_bytes())
            if max_memory is not None:
                options["max_memory"] = max_memory
    else:
        options = {"device_map": remap_to_share(read_device_map_file(Path(device_map)), share)}
    # accelerate writes weights it offloads to disk here (safetensors checkpoints are read in place instead).
    options["offload_folder"] = _offload_folder()
    return options


def _free_cpu_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def _offload_folder() -> str:
    from finercut.paths import cache_root

    root = cache_root() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="run-", dir=root)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def input_device(model: Any) -> torch.device:
    """Where token ids must go: the device the input embedding runs on.

    ``model.device`` is the device of the first parameter, which is ``meta`` when accelerate offloaded the
    embedding (to the CPU of a GPU machine, or to disk); the embedding's hook then names the device it runs on.
    """
    embedding = model.get_input_embeddings()
    device = getattr(getattr(embedding, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(device)
    weight = next(embedding.parameters(), None)
    return weight.device if weight is not None else model.device
