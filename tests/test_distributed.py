"""Candidates spread over ranks with torchrun: the same record as one process, failures that stop every rank.

The torchrun tests start two CPU processes (gloo) on a tiny model; each takes a few seconds to start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from test_run import prune_args, read, without_timings

from finercut.folder import LOCK_FILE, MANIFEST_FILE
from finercut.cli import main
from finercut.distributed import (
    DistributedScorer,
    RankFailedError,
    World,
    choose_backend,
    merge_shares,
    share_of,
    timeout_from_env,
    world_from_env,
)
from finercut.errors import ConfigError
from finercut.candidates import Unit
from finercut.distances import NonFiniteOutputError
from finercut.search import CandidateScore

UNITS = [Unit(b, kind) for b in range(3) for kind in ("attention", "ffn")]

BOOKKEEPING = (MANIFEST_FILE, LOCK_FILE)
"""finercut's own list of what it wrote, and the lock of the run using the folder."""


def test_candidates_are_dealt_round_robin_and_merged_back_in_order():
    assert share_of(UNITS, 0, 4) == [UNITS[0], UNITS[4]]
    assert share_of(UNITS, 3, 4) == [UNITS[3]]
    assert share_of(UNITS[:1], 1, 2) == []
    shares = [[f"r{rank}-{unit}" for unit in share_of(UNITS, rank, 4)] for rank in range(4)]
    assert merge_shares(UNITS, shares) == ["r0-0.attn", "r1-0.ffn", "r2-1.attn", "r3-1.ffn", "r0-2.attn", "r1-2.ffn"]


def test_merging_refuses_results_that_do_not_fit_the_shares():
    with pytest.raises(RuntimeError, match="rank 1 returned 2 results for 3"):
        merge_shares(UNITS, [["a", "b", "c"], ["d", "e"]])
    wrong = [[CandidateScore(UNITS[1], 0.1)], [CandidateScore(UNITS[0], 0.2)]]
    with pytest.raises(RuntimeError, match="0.ffn in the place of 0.attn"):
        merge_shares(UNITS[:2], wrong)


def test_launcher_environment():
    assert world_from_env({}) == World()
    world = world_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (world.rank, world.size, world.local_rank, world.local_size, world.is_writer) == (3, 8, 1, 4, False)
    with pytest.raises(ConfigError, match="LOCAL_RANK missing"):
        world_from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="inconsistent"):
        world_from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert choose_backend(True) == "nccl" and choose_backend(False) == "gloo"
    assert timeout_from_env({"FINERCUT_DIST_TIMEOUT": "30"}) == timedelta(seconds=30)
    with pytest.raises(ConfigError, match="positive"):
        timeout_from_env({"FINERCUT_DIST_TIMEOUT": "0"})


class GatheringWorld(World):
    """Rank 0 of 2, with rank 1's part of every collective given in advance."""

    def __init__(self, others: list):
        super().__init__(rank=0, size=2)
        object.__setattr__(self, "others", others)

    def all_gather(self, value):
        return [value, self.others.pop(0)]


class ListScorer:
    block_executions = 0

    def score(self, removed, candidates, *, on_candidate=None):
        self.block_executions += 2 * len(candidates)
        results = [CandidateScore(unit, 0.5 + unit.block) for unit in candidates]
        for result in results if on_candidate else ():
            on_candidate(result.unit, result.distance)
        return results

    def restore(self, removed):
        pass


def test_one_process_needs_no_wrapper():
    inner = ListScorer()
    assert DistributedScorer.wrap(inner, World()) is inner


def test_results_and_block_executions_of_all_ranks():
    other = [CandidateScore(unit, 9.0) for unit in share_of(UNITS, 1, 2)]
    scorer = DistributedScorer(ListScorer(), GatheringWorld([(("ok", other), 7)]))
    seen = []
    merged = scorer.score([], UNITS, on_candidate=lambda unit, value: seen.append(unit))
    assert [c.distance for c in merged] == [0.5, 9.0, 1.5, 9.0, 2.5, 9.0]
    assert scorer.block_executions == 6 + 7
    assert sorted(seen, key=UNITS.index) == UNITS  # the progress bar counts every rank's candidates


def test_a_failure_on_another_rank_raises_here():
    scorer = DistributedScorer(ListScorer(), GatheringWorld([(("error", "RuntimeError", "CUDA out of memory",
                                                                False), 0)]))
    with pytest.raises(RankFailedError, match="rank 1 of 2 failed while scoring step 2: RuntimeError: CUDA out"):
        scorer.score([UNITS[0]], UNITS[1:])
    # Float16 overflow is bad input, the same on any number of ranks: it keeps its own (user) error type.
    scorer = DistributedScorer(ListScorer(), GatheringWorld([(("error", "NonFiniteOutputError", "NaN", True), 0)]))
    with pytest.raises(NonFiniteOutputError, match="rank 1 of 2"):
        scorer.score([], UNITS)


# ---------------------------------------------------------------------------------------------------------------
# Two ranks under torchrun


def torchrun(args: list[str], *, script: list[str] | None = None, ranks: int = 2,
             timeout: int = 60) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node ranks -m finercut args`` (or ``script`` instead of the module),
    with the collectives' timeout in seconds."""
    target = script or ["-m", "finercut"]
    env = {**os.environ, "FINERCUT_DIST_TIMEOUT": str(timeout), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *target, *args],
        capture_output=True, text=True, timeout=300, env=env,
    )


def comparable(record: dict) -> dict:
    """A record without timings and without the description of the ranks."""
    return {k: v for k, v in without_timings(record).items() if k != "distributed"}


def complete_distances(step: dict) -> dict:
    return {(c["block"], c["kind"]): c["distance"] for c in step["candidates"] if c["distance"] is not None}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir, word_text):
    """1-process runs of 4 steps with the fast and the naive scorer."""
    runs = {}
    for scorer in ("fast", "naive"):
        output = tmp_path_factory.mktemp("one") / scorer
        extra = ["--no-save-model"] if scorer == "naive" else []
        assert main(prune_args(tiny_model_dir, word_text, output, "--count", "4", "--scorer", scorer, *extra)) == 0
        runs[scorer] = read(output / "record.json")
    return runs


def test_two_ranks_give_the_one_process_record(tmp_path, tiny_model_dir, word_text, one_process):
    result = torchrun(prune_args(tiny_model_dir, word_text, tmp_path / "two", "--count", "4"))
    assert result.returncode == 0, result.stderr
    record, single = read(tmp_path / "two" / "record.json"), one_process["fast"]
    assert record["distributed"]["world_size"] == 2 and record["distributed"]["backend"] == "gloo"
    assert record["removed"] == single["removed"]
    for step, alone in zip(record["steps"], single["steps"]):
        assert step["distance"] == alone["distance"]
        both = complete_distances(step).keys() & complete_distances(alone).keys()
        assert both and all(complete_distances(step)[k] == complete_distances(alone)[k] for k in both)
    # Each rank keeps its own prefix cache and aborts against its own share's best: the work is summed.
    assert sum(s["block_executions"] for s in record["steps"]) == sum(record["timings"]["block_executions_by_rank"])
    assert result.stdout.count("removed 4 units") == 1  # rank 0 alone prints the summary
    assert (tmp_path / "two" / "model" / "config.json").is_file()


def test_two_ranks_with_the_naive_scorer_split_the_work_exactly(tmp_path, tiny_model_dir, word_text, one_process):
    """Full forwards cache nothing, so two ranks run exactly the one process's blocks between them."""
    args = prune_args(tiny_model_dir, word_text, tmp_path / "two", "--count", "4", "--scorer", "naive",
                      "--no-save-model")
    result = torchrun(args)
    assert result.returncode == 0, result.stderr
    record = read(tmp_path / "two" / "record.json")
    single = one_process["naive"]
    assert comparable(record) == comparable(single)
    assert [s["block_executions"] for s in record["steps"]] == [s["block_executions"] for s in single["steps"]]


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_a_rank_failing_mid_step_stops_the_job_and_one_rank_resumes_it(tmp_path, tiny_model_dir, word_text,
                                                                        one_process, mode):
    output = tmp_path / "failed"
    args = prune_args(tiny_model_dir, word_text, output, "--count", "4")
    failed = torchrun(args, script=[str(Path(__file__).with_name("failing_rank.py")), "1", "2", mode])
    assert failed.returncode != 0
    if mode == "raise":  # both ranks stop at the same collective and say why
        message = "rank 1 of 2 failed while scoring step 3: RuntimeError: injected failure: out of device memory"
        assert failed.stderr.count(message) == 2, failed.stderr
        assert "progress.json; run the same command again (with any number of ranks) to resume" in failed.stderr
    progress = read(output / "progress.json")
    assert len(progress["steps"]) == 2
    # no temporary file either
    assert sorted(p.name for p in output.iterdir() if p.name not in BOOKKEEPING) == ["progress.json", "run.json"]

    assert main(args) == 0  # one process takes over the two finished steps
    record, single = read(output / "record.json"), one_process["fast"]
    assert record["removed"] == single["removed"] and record["distributed"]["world_size"] == 1
    assert record["steps"][:2] == progress["steps"]
    assert without_timings(record["steps"][2:]) == without_timings(single["steps"][2:])


def test_a_rank_that_hangs_stops_the_job_at_the_collective_timeout(tmp_path, tiny_model_dir, word_text):
    """What torchrun cannot see (a rank alive but stuck, or a lost node): the others give up after the timeout."""
    output = tmp_path / "hung"
    args = prune_args(tiny_model_dir, word_text, output, "--count", "4", "--no-save-model")
    hung = torchrun(args, script=[str(Path(__file__).with_name("failing_rank.py")), "1", "1", "hang"], timeout=5)
    assert hung.returncode != 0
    assert "rank 0 of 2 could not exchange results while scoring step 2: another rank died or did not answer " \
           "within FINERCUT_DIST_TIMEOUT=5 s" in hung.stderr, hung.stderr
    assert len(read(output / "progress.json")["steps"]) == 1
    assert sorted(p.name for p in output.iterdir() if p.name not in BOOKKEEPING) == ["progress.json", "run.json"]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_follow_rank_0_s_folder(tmp_path, tiny_model_dir, word_text, one_process):
    """``--nnodes 2`` on one machine, each node in its own working directory with a relative ``--output``: the
    second node's folder is not rank 0's. Rank 0's folder holds a finished 2-step run; the 4-step run extends
    it on both nodes, and the second node writes nothing."""
    first, second = tmp_path / "node0", tmp_path / "node1"
    first.mkdir(), second.mkdir()
    assert main(prune_args(tiny_model_dir, word_text, first / "run", "--count", "2")) == 0
    args = prune_args(tiny_model_dir, word_text, Path("run"), "--count", "4")
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "FINERCUT_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    if "FINERCUT_DATA_DIR" in env:  # the nodes run elsewhere
        env["FINERCUT_DATA_DIR"] = str(Path(env["FINERCUT_DATA_DIR"]).resolve())
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
             "--rdzv-backend=static", f"--master-addr={endpoint.split(':')[0]}",
             f"--master-port={endpoint.split(':')[1]}", "-m", "finercut", *args],
            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank, folder in enumerate((first, second))
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    record = read(first / "run" / "record.json")
    assert record["removed"] == one_process["fast"]["removed"] and record["distributed"]["world_size"] == 2
    assert record["distributed"]["local_world_size"] == 1 and record["timings"]["resumed_steps"] == 2
    assert not (second / "run").exists()
