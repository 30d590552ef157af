"""Candidate parallelism with PyTorch's own launcher: ``torchrun --nproc-per-node N -m finercut prune ...``.

Every rank holds the model (or its share of the GPUs, see :mod:`finercut.placement`) and the same calibration
samples. In each step of the greedy search the candidates are dealt out round-robin in search order
(:func:`share_of`); every rank scores its share with the ordinary scorer, the results are all-gathered and put
back in candidate order, and :func:`finercut.search.greedy_search` selects from them exactly as in one process,
so every rank removes the same unit. Block executions are summed over the ranks.

The launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``...)
decides everything; without it (or with ``WORLD_SIZE=1``) nothing here does anything. The backend is ``nccl``
when CUDA is available and ``gloo`` otherwise; the collectives' timeout is ``FINERCUT_DIST_TIMEOUT`` seconds
(default 3600: a collective waits for the slowest rank of a step).
"""

from __future__ import annotations

import atexit
import os
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence

import torch

from finercut.candidates import Unit
from finercut.distances import NonFiniteOutputError
from finercut.errors import ConfigError, UserError

TIMEOUT_ENV = "FINERCUT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 3600.0
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class RankFailedError(RuntimeError):
    """A rank failed during a collective step: every rank raises this, so the whole job stops together."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a job (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str | None = None
    """The process group's backend once initialised (None for one process)."""

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes the run's files."""
        return self.rank == 0

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            # NCCL needs to know this rank's GPU (else it guesses from the rank, which is wrong with shares).
            options = {"device_ids": [torch.cuda.current_device()]} if self.backend == "nccl" else {}
            dist.barrier(**options)

    def local_first(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` on each node's local rank 0 first, then on the others (e.g. a conversion into a cache
        the node's ranks share, done once instead of by every rank at the same time)."""
        if self.size == 1:
            return work()
        result = work() if self.local_rank == 0 else None
        self.barrier()
        return work() if self.local_rank != 0 else result

    def describe(self) -> dict:
        """What the record states about the ranks."""
        return {"world_size": self.size, "local_world_size": self.local_size, "backend": self.backend}


def world_from_env(env: Mapping[str, str] = os.environ) -> World:
    """The launcher's description of this process, not yet connected to the others.

    Raises:
        ConfigError: the launcher variables are partial or inconsistent.
    """
    if not any(name in env for name in LAUNCHER_VARIABLES):
        return World()
    missing = [name for name in LAUNCHER_VARIABLES if name not in env]
    if missing:
        raise ConfigError(f"incomplete launcher environment: {', '.join(LAUNCHER_VARIABLES)} are all needed (as "
                          f"torchrun sets them), {', '.join(missing)} missing")
    try:
        rank, size, local_rank = (int(env[name]) for name in LAUNCHER_VARIABLES)
        local_size = int(env.get("LOCAL_WORLD_SIZE", size))
    except ValueError as error:
        raise ConfigError(f"launcher variables must be integers: {error}") from error
    if not (size >= 1 and 0 <= rank < size and 0 <= local_rank < local_size <= size):
        raise ConfigError(f"inconsistent launcher variables: RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local_rank}, "
                          f"LOCAL_WORLD_SIZE={local_size}")
    return World(rank, size, local_rank, local_size)


def choose_backend(cuda_available: bool) -> str:
    """``nccl`` where the ranks have GPUs, ``gloo`` on CPUs."""
    return "nccl" if cuda_available else "gloo"


def timeout_from_env(env: Mapping[str, str] = os.environ) -> timedelta:
    value = env.get(TIMEOUT_ENV)
    if value is None:
        return timedelta(seconds=DEFAULT_TIMEOUT_SECONDS)
    try:
        seconds = float(value)
    except ValueError as error:
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}") from error
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be positive, got {value!r}")
    return timedelta(seconds=seconds)


def init_world() -> World:
    """Join the job the launcher started (once per process) and return this process's :class:`World`.

    Under ``torchrun`` with more than one process this initialises the default process group (``nccl`` with
    CUDA, on the GPU ``LOCAL_RANK`` names; else ``gloo``); otherwise it returns rank 0 of 1.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return current_world()
    world = world_from_env()
    if world.size == 1:
        return world
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run one process, or install a torch that has it")
    backend = choose_backend(torch.cuda.is_available())
    if backend == "nccl":
        # "cuda" then means this rank's (first) GPU, for the model and for the collectives' buffers.
        torch.cuda.set_device(first_gpu(world, torch.cuda.device_count()))
    dist.init_process_group(backend, timeout=timeout_from_env())
    atexit.register(_leave)
    return current_world()


def first_gpu(world: World, gpu_count: int) -> int:
    """This rank's GPU, or the first of its share when the ranks of a node split its GPUs (``--device-map``)."""
    per_rank = max(1, gpu_count // world.local_size)
    return (world.local_rank * per_rank) % gpu_count


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def current_world() -> World:
    """The job this process belongs to as torch.distributed knows it (rank 0 of 1 if no process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    local = world_from_env() if all(name in os.environ for name in LAUNCHER_VARIABLES) else World()
    size = dist.get_world_size()
    return World(dist.get_rank(), size, local.local_rank, local.local_size if local.size == size else 1,
                 str(dist.get_backend()))


def share_of(candidates: Sequence[Unit], rank: int, size: int) -> list[Unit]:
    """Rank ``rank``'s candidates: every ``size``-th in search order, from the ``rank``-th.

    Round-robin rather than contiguous, because a candidate at block ``p`` costs the replay of blocks
    ``p..L-1``: contiguous slices would give the first rank the most expensive candidates.
    """
    return list(candidates[rank::size])


def merge_shares(candidates: Sequence[Unit], shares: Sequence[Sequence[Any]]) -> list[Any]:
    """Put the ranks' results (each in the order of :func:`share_of`) back in candidate order."""
    size = len(shares)
    for rank, results in enumerate(shares):
        if len(results) != len(share_of(candidates, rank, size)):
            raise RuntimeError(f"rank {rank} returned {len(results)} results for "
                               f"{len(share_of(candidates, rank, size))} candidates")
    merged = [shares[index % size][index // size] for index in range(len(candidates))]
    for unit, result in zip(candidates, merged):
        if getattr(result, "unit", unit) != unit:
            raise RuntimeError(f"a rank returned the result of {result.unit} in the place of {unit}")
    return merged


class DistributedScorer:
    """A scorer whose candidates are spread over the ranks of a job; same interface as the one it wraps.

    Each step, every rank scores :func:`share_of` the candidates with its own ``inner`` scorer (whatever that
    returns per candidate is passed through), and all ranks all-gather the results, so that every rank sees
    every candidate's result in candidate order and selects the same unit with the same tie rule.

    **Why the selection equals the one-process selection, early abort included.** The search selects the
    least ``(distance, unit order)`` pair (:func:`finercut.candidates.select_least`). An inner scorer may stop
    scoring a candidate ``c`` of its share only against a candidate ``b`` of the *same share* that it scored
    completely: when ``c``'s lower bound is greater than ``b``'s distance, or equal to it with ``c`` later in
    unit order. Since the bound is at most ``c``'s distance, ``c``'s pair is then strictly greater than ``b``'s,
    so ``c`` is not the least pair of the step. Hence the least pair ``w`` of the step, over all ranks, is
    scored completely on whichever rank holds it (nothing on that rank is below it), and the least complete
    pair over all ranks is ``w``: the unit the one-process search selects, whose every abort is likewise
    justified by a complete candidate. A rank aborts against the best of its share only, a weaker best than
    one process has, so it may score more than one process would, never inexactly. The complete distances
    themselves are the same numbers as in one process: a candidate's replay starts from the same cached block
    inputs, and its per-sample sums are added with ``math.fsum``, so neither the order nor the rank changes them.

    **Failures.** Every rank all-gathers either its results or an error marker, so a rank whose scoring raises
    makes every rank raise :class:`RankFailedError` at the same collective: the whole job stops with one clear
    message, before anything of that step is written. A rank that dies outright (killed, out of memory) is
    seen by ``torchrun``, which stops the others; across nodes the collective's timeout
    (``FINERCUT_DIST_TIMEOUT``) bounds the wait.
    """

    def __init__(self, inner: Any, world: World) -> None:
        self.inner = inner
        self.world = world
        self.rank_block_executions = [0] * world.size
        """Each rank's inner ``block_executions``, as of the last collective."""

    @classmethod
    def wrap(cls, inner: Any, world: World | None = None) -> Any:
        """``inner`` spread over the ranks of ``world`` (default: the current job); ``inner`` itself for one."""
        world = world or current_world()
        return inner if world.size == 1 else cls(inner, world)

    @property
    def block_executions(self) -> int:
        """Block executions summed over the ranks."""
        return sum(self.rank_block_executions)

    def __getattr__(self, name: str) -> Any:  # distance_path, exhaustive, ... of the inner scorer
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def restore(self, removed: Sequence[Unit]) -> None:
        self._together(lambda: self.inner.restore(removed), f"resuming after {len(removed)} steps")

    def score(
        self, removed: Sequence[Unit], candidates: Sequence[Unit], *,
        on_candidate: Callable[[Unit, float], None] | None = None, **options: Any,
    ) -> list[Any]:
        """Score this rank's share of ``candidates`` with the inner scorer (``options`` passed through) and
        return every rank's results in the order of ``candidates``."""
        mine = share_of(candidates, self.world.rank, self.world.size)
        shares = self._together(
            lambda: self.inner.score(removed, mine, on_candidate=on_candidate, **options),
            f"scoring step {len(removed) + 1}",
        )
        merged = merge_shares(candidates, shares)
        if on_candidate:  # the other ranks' candidates, so that a progress bar counts the whole step
            for index, result in enumerate(merged):
                if index % self.world.size != self.world.rank:
                    on_candidate(candidates[index], _value_of(result))
        return merged

    def _together(self, work: Callable[[], Any], what: str) -> list[Any]:
        """Run ``work`` on every rank and gather the results; if any rank failed, raise on every rank."""
        world = self.world
        try:
            outcome: tuple = ("ok", work())
        except Exception as error:  # KeyboardInterrupt and SystemExit end the process: torchrun stops the rest
            if not isinstance(error, UserError):  # the failing rank keeps the traceback of what may be a bug
                traceback.print_exc(file=sys.stderr)
            outcome = ("error", type(error).__name__, str(error), isinstance(error, NonFiniteOutputError))
        try:
            gathered = world.all_gather((outcome, self.inner.block_executions))
        except RuntimeError as error:  # gloo/NCCL: a rank died or hangs past the timeout
            raise RankFailedError(
                f"rank {world.rank} of {world.size} could not exchange results while {what}: another rank died or "
                f"did not answer within {TIMEOUT_ENV}={timeout_from_env().total_seconds():g} s ({error})"
            ) from error
        self.rank_block_executions = [executions for _, executions in gathered]
        failures = [(rank, outcome) for rank, (outcome, _) in enumerate(gathered) if outcome[0] == "error"]
        if not failures:
            return [outcome[1] for outcome, _ in gathered]
        rank, (_, kind, message, non_finite) = failures[0]
        text = f"rank {rank} of {world.size} failed while {what}: {kind}: {message}"
        if len(failures) > 1:
            text += f" (and {len(failures) - 1} more rank(s): {', '.join(str(r) for r, _ in failures[1:])})"
        if all(failure[1][3] for failure in failures):
            raise NonFiniteOutputError(text)  # bad input (float16 overflow), the same on any number of ranks
        raise RankFailedError(text + "; every rank stopped at this step")


def _value_of(result: Any) -> float:
    value = getattr(result, "value", None)
    if value is None and isinstance(result, tuple):
        value = result[1]
    return float("nan") if value is None else value
