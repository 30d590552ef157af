"""The greedy search as a method's selection: scorer, progress and logging around :func:`finercut.search.greedy_search`.

FinerCut and BlockPruner are the same search with another score and window; both select through
:func:`run_greedy`, which spreads each step's candidates over the ranks of a ``torchrun`` job, reports each step,
and keeps the progress bar's estimate of the work left (:class:`finercut.progress.GreedyPlan`) current.
"""

from __future__ import annotations

from typing import Any

from finercut.candidates import Unit
from finercut.distributed import DistributedScorer, current_world
from finercut.methods.base import Selecting
from finercut.progress import DEFAULT_ABORT_SHARE, GreedyPlan
from finercut.search import Step, greedy_search


def scorer_options(config: Any) -> dict:
    """The fast scorer's memory budget for replay states (the naive scorer takes none)."""
    return {"replay_state_bytes": int(config.replay_memory_gb * 2**30)} if config.scorer == "fast" else {}


def run_greedy(request: Selecting, scorer: Any, *, window_first_block: int) -> list[Step]:
    """Run the greedy search of ``request`` with ``scorer`` (candidates from ``window_first_block`` on while the
    window applies; 0: no window), continuing after ``request.completed``."""
    config, budget, progress = request.config, request.budget, request.progress
    completed = list(request.completed)
    target = request.target
    if budget is not None:  # the bar's guess: the fewest steps that could meet the cost target
        from finercut.budgets import minimal_steps

        removed = [step.unit for step in completed]
        units = [unit for unit in request.units if unit not in removed]
        target = len(completed) + max(1, minimal_steps(budget.cost, units, budget.fraction))
    full_forward = getattr(scorer, "distance_path", None) == "full_head" and config.scorer == "naive"
    no_abort = full_forward or config.exhaustive
    plan = GreedyPlan(request.units, request.num_blocks, target, config.window_until_ratio, window_first_block,
                      full_forward=full_forward, share=1.0 if no_abort else DEFAULT_ABORT_SHARE)
    removed_so_far: list[Unit] = [step.unit for step in completed]
    world = current_world()  # under torchrun, each rank runs its share of the candidates
    progress.plan(plan.remaining(removed_so_far) / world.size)

    def on_candidate(unit: Unit, value: float) -> None:
        progress.note(f"step {len(removed_so_far) + 1}/{target} cand {unit} d={value:.3g}")

    def after_step(step: Step) -> None:
        plan.record(removed_so_far, step.block_executions)
        removed_so_far.append(step.unit)
        progress.plan(plan.remaining(removed_so_far) / world.size)
        if world.is_writer:  # rank 0 reports the steps for the job
            of = f"{target}" if budget is None else f"{budget.cost.measure} <= {budget.fraction:.1%}"
            score = "answer NLL" if config.objective else "distance"  # a task objective scores likelihoods
            progress.write(f"step {step.index + 1}/{of}: removed {step.unit} ({score} {step.distance:.6g}, "
                           f"{step.seconds:.1f} s)")
        if request.on_step:
            request.on_step(step)

    return greedy_search(
        DistributedScorer.wrap(scorer), num_blocks=request.num_blocks, granularity=config.granularity,
        target=None if budget is not None else request.target, window_until_ratio=config.window_until_ratio,
        window_first_block=window_first_block, completed=completed, on_step=after_step, on_candidate=on_candidate,
        only=config.only, budget=budget,
    )
