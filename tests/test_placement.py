"""``--device-map``: each rank's share of the GPUs, map files, and a search with blocks offloaded to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_run import model_tensors, prune_args, read

from finercut.cli import main
from finercut.distributed import World, first_gpu
from finercut.errors import ConfigError, MissingFileError
from finercut.placement import (
    gpu_share,
    input_device,
    placement_options,
    rank_max_memory,
    read_device_map_file,
    remap_to_share,
    resolve_device_map,
)

GB = 2**30


def local(rank: int, size: int) -> World:
    return World(rank=rank, size=size, local_rank=rank, local_size=size)


def test_each_rank_of_a_node_gets_an_equal_contiguous_share_of_its_gpus():
    assert gpu_share(World(), 8) == list(range(8))
    assert [gpu_share(local(r, 2), 8) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [gpu_share(local(r, 8), 8) for r in range(8)] == [[r] for r in range(8)]
    assert [gpu_share(local(r, 2), 3) for r in range(2)] == [[0], [1]]  # the odd GPU is left out
    with pytest.raises(ConfigError, match="4 ranks on a node with 2 GPUs.*--nproc-per-node 2"):
        gpu_share(local(0, 4), 2)
    assert [first_gpu(local(r, 2), 8) for r in range(2)] == [0, 4]
    assert [first_gpu(local(r, 8), 8) for r in range(8)] == list(range(8))


def test_max_memory_names_the_rank_s_gpus_and_its_part_of_the_cpu():
    assert rank_max_memory(World(), [80 * GB] * 8, 1000 * GB) is None  # alone: accelerate uses everything
    assert rank_max_memory(local(1, 2), [80 * GB] * 4, 1000 * GB) == {2: 80 * GB, 3: 80 * GB, "cpu": 500 * GB}


def test_map_file_gpu_numbers_count_within_the_share(tmp_path):
    device_map = {"model.layers.0": 0, "model.layers.1": "cuda:1", "model.norm": "cpu", "lm_head": "disk"}
    assert remap_to_share(device_map, [4, 5, 6, 7]) == {"model.layers.0": 4, "model.layers.1": 5, "model.norm": "cpu",
                                                         "lm_head": "disk"}
    with pytest.raises(ConfigError, match="this rank has 1 GPU"):
        remap_to_share(device_map, [3])


def test_map_files_are_checked_before_anything_is_loaded(tmp_path):
    assert resolve_device_map(None) is None and resolve_device_map("balanced") == "balanced"
    with pytest.raises(MissingFileError, match="neither one of auto"):
        resolve_device_map(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    for content, message in (("[1]", "JSON object"), ("{", "not readable JSON"),
                             ('{"lm_head": "gpu"}', "'lm_head' -> 'gpu' is not a device"),
                             ('{"lm_head": true}', "is not a device")):
        bad.write_text(content)
        with pytest.raises(ConfigError, match=message):
            read_device_map_file(bad)
    good = tmp_path / "good.json"
    good.write_text('{"model": 0}')
    assert resolve_device_map(str(good)) == str(good.resolve())


def test_cpu_placement_options(tmp_path):
    good = tmp_path / "map.json"
    good.write_text('{"model": "cpu", "lm_head": "disk"}')
    options = placement_options(str(good), World())
    assert options["device_map"] == {"model": "cpu", "lm_head": "disk"} and Path(options["offload_folder"]).is_dir()
    assert placement_options(None, World()) == {}


OFFLOADED = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
             "lm_head": "disk"}
"""Blocks 1 and 3 and the output head read from disk at every call (accelerate's disk offload)."""


@pytest.fixture
def offload_map(tmp_path) -> Path:
    path = tmp_path / "device_map.json"
    path.write_text(json.dumps(OFFLOADED))
    return path


def test_a_search_with_blocks_offloaded_to_disk_gives_the_in_memory_result(tmp_path, tiny_model_dir, word_text,
                                                                          offload_map):
    in_memory, offloaded = tmp_path / "in-memory", tmp_path / "offloaded"
    assert main(prune_args(tiny_model_dir, word_text, in_memory, "--count", "4")) == 0
    assert main(prune_args(tiny_model_dir, word_text, offloaded, "--count", "4", "--device-map", str(offload_map))) == 0
    plain, placed = read(in_memory / "record.json"), read(offloaded / "record.json")
    assert placed["config"]["device_map"] == str(offload_map.resolve())
    assert placed["removed"] == plain["removed"]
    assert [s["candidates"] for s in placed["steps"]] == [s["candidates"] for s in plain["steps"]]
    assert [s["block_executions"] for s in placed["steps"]] == [s["block_executions"] for s in plain["steps"]]
    original, again = model_tensors(in_memory), model_tensors(offloaded)
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


def test_the_gram_distance_with_an_offloaded_head(tmp_path, tiny_model_dir, word_text, offload_map):
    args = ("--count", "2", "--metric", "euclidean", "--no-save-model")
    assert main(prune_args(tiny_model_dir, word_text, tmp_path / "plain", *args)) == 0
    assert main(prune_args(tiny_model_dir, word_text, tmp_path / "placed", *args, "--device-map",
                           str(offload_map))) == 0
    plain, placed = read(tmp_path / "plain" / "record.json"), read(tmp_path / "placed" / "record.json")
    assert placed["scoring"] == plain["scoring"] and "gram" in str(placed["scoring"])  # the vocabulary-free path ran
    assert placed["removed"] == plain["removed"]
    assert [s["candidates"] for s in placed["steps"]] == [s["candidates"] for s in plain["steps"]]


EMBEDDING_OFFLOADED = {**OFFLOADED, "model.embed_tokens": "disk", "model.layers.0": "disk", "model.layers.3": "cpu"}


def test_token_ids_go_where_the_embedding_runs(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, device_map=EMBEDDING_OFFLOADED,
                                                 offload_folder=str(tmp_path), dtype=torch.float32)
    assert model.device == torch.device("meta")  # the first parameter's device: no place for token ids
    assert input_device(model) == torch.device("cpu")
    assert input_device(AutoModelForCausalLM.from_pretrained(tiny_model_dir)) == torch.device("cpu")


def test_a_search_with_the_embedding_offloaded(tmp_path, tiny_model_dir, word_text):
    device_map = tmp_path / "device_map.json"
    device_map.write_text(json.dumps(EMBEDDING_OFFLOADED))
    args = ("--count", "2", "--no-save-model")
    assert main(prune_args(tiny_model_dir, word_text, tmp_path / "plain", *args)) == 0
    assert main(prune_args(tiny_model_dir, word_text, tmp_path / "placed", *args, "--device-map", str(device_map))) == 0
    plain, placed = read(tmp_path / "plain" / "record.json"), read(tmp_path / "placed" / "record.json")
    assert [s["candidates"] for s in placed["steps"]] == [s["candidates"] for s in plain["steps"]]
