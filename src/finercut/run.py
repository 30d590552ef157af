"""Pruning runs: the in-memory API (:func:`prune`) and resumable runs in an output folder (:func:`run_in_folder`).

A folder run validates everything it can before any expensive work or any write, records its progress after
every step (atomically), resumes from the last finished step when run again, and ends with ``record.json``,
``layer_map.png`` and the pruned model in ``model/``.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from finercut import baselines
from finercut.adapters import adapter_for, adapter_for_config
from finercut.calibration import calibration_samples, resolve_data_dir, resolve_source, samples_info
from finercut.candidates import Unit, all_units, count_units, window_applies
from finercut.distances import METRICS, Metric, metric_named
from finercut.distributed import DistributedScorer, current_world, init_world
from finercut.errors import UserError
from finercut.modelio import (
    identity_differences,
    load_config,
    load_model,
    load_tokenizer,
    model_identity,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
)
from finercut.evaluation.stats import kv_cache_summary
from finercut.placement import resolve_device_map
from finercut.plots import plot_layer_map, plot_step_scores
from finercut.record import (
    PERPLEXITY_METRIC,
    PROGRESS_FORMAT,
    RUN_FORMAT,
    ConfigError,
    RunConfig,
    build_record,
    config_differences,
    environment_info,
    read_json,
    write_json_atomic,
)
from finercut.scoring import DEFAULT_BATCH_SIZE, SCORERS, ScoringContext, describe_scoring
from finercut.search import Budget, Step, greedy_search

RUN_FILE = "run.json"
PROGRESS_FILE = "progress.json"
RECORD_FILE = "record.json"
LAYER_MAP_FILE = "layer_map.png"
STEP_SCORES_FILE = "step_scores.png"
MODEL_DIR = "model"
OWN_ENTRIES = (RUN_FILE, PROGRESS_FILE, RECORD_FILE, LAYER_MAP_FILE, STEP_SCORES_FILE, MODEL_DIR)

Log = Callable[[str], None]


class OutputFolderError(UserError, ValueError):
    """The output folder holds something other than a matching run."""


@dataclass
class PruneResult:
    """What a pruning run found: the steps in order and the record describing them."""

    steps: list[Step]
    record: dict
    output_dir: Path | None = None
    model: nn.Module | None = None
    tokenizer: Any = None
    resumed_steps: int = 0
    notes: list[str] = field(default_factory=list)
    writer: bool = True
    """False on the ranks other than 0 of a torchrun job, which write nothing and leave the summary to rank 0."""

    @property
    def removed(self) -> list[Unit]:
        return [step.unit for step in self.steps]


def planned_evaluations(*, num_blocks: int, config: RunConfig, done: int, target: int) -> int:
    """Candidate evaluations left, assuming removals come from the window while it applies (for the ETA)."""
    units = count_units(num_blocks, config.granularity, config.only)
    first = config.first_candidate_block(num_blocks)
    window_units = units - (first * (units // num_blocks))
    return sum(
        (window_units if window_applies(k, units, config.window_until_ratio) else units) - k
        for k in range(done, target)
    )


def find_steps(
    context: ScoringContext, config: RunConfig, *, num_blocks: int, target: int | None,
    completed: Sequence[Step] = (), on_step: Callable[[Step], None] | None = None, progress: bool = False,
    extras: dict | None = None, budget: Budget | None = None,
) -> list[Step]:
    """Run ``config.method`` on a scoring context: the greedy search for FinerCut, one shot for baselines.

    With a cost target, ``budget`` replaces ``target`` (FinerCut only); the progress bar then counts the
    fewest steps that could meet it.
    Baselines select everything at once from the original model, so they ignore ``completed`` and ``on_step``.
    ``extras`` receives what a method adds to the record (Shapley: ``importance``, the values and their errors).
    """
    if config.method == "shapley":
        from finercut.importance import shapley_steps

        steps, estimate = shapley_steps(
            context, all_units(num_blocks, config.granularity, config.only), count=target,
            permutations=config.shapley_permutations, seed=config.seed, truncation=config.shapley_truncation,
        )
        if extras is not None:
            extras["importance"] = estimate.to_dict()
        return steps
    if config.method == "shortgpt":
        return baselines.shortgpt_steps(context, count=target)
    if config.method == "deeper_layers":
        return baselines.deeper_layers_steps(context, count=target)
    if config.method == "random":
        return baselines.random_steps(num_blocks, granularity=config.granularity, count=target, seed=config.seed,
                                      only=config.only)
    options = {"replay_state_bytes": int(config.replay_memory_gb * 2**30)} if config.scorer == "fast" else {}
    if config.method == "blockpruner":  # perplexity as the score, over every block (no window)
        from finercut.baselines.blockpruner import perplexity_scorer

        scorer = perplexity_scorer(context, scorer=config.scorer, exhaustive=config.exhaustive, **options)
        window_first_block = 0
    else:
        scorer = SCORERS[config.scorer](context, exhaustive=config.exhaustive, **options)
        window_first_block = config.first_candidate_block(num_blocks)
    if extras is not None:
        extras["scoring"] = describe_scoring(context, scorer=config.scorer, exhaustive=config.exhaustive,
                                             objective=PERPLEXITY_METRIC if config.method == "blockpruner" else None,
                                             **options)
    search_target = target
    if budget is not None:
        from finercut.budgets import minimal_steps

        units = [u for u in all_units(num_blocks, config.granularity, config.only) if u not in
                 [step.unit for step in completed]]
        target = len(completed) + max(1, minimal_steps(budget.cost, units, budget.fraction))  # the bar's guess
    bar = _progress_bar(num_blocks=num_blocks, config=config, done=len(completed), target=target, enabled=progress)
    state = {"step": len(completed)}

    def on_candidate(unit: Unit, distance: float) -> None:
        bar.update(1)
        bar.set_postfix_str(f"step {state['step'] + 1}/{target} cand {unit} d={distance:.3g}", refresh=False)

    speaks = current_world().is_writer  # under torchrun, rank 0 reports the steps for the job

    def after_step(step: Step) -> None:
        state["step"] = step.index + 1
        if speaks:
            of = f"{target}" if budget is None else f"{budget.cost.measure} <= {budget.fraction:.1%}"
            bar.write(f"step {step.index + 1}/{of}: removed {step.unit} (distance {step.distance:.6g}, "
                      f"{step.seconds:.1f} s)")
        if on_step:
            on_step(step)

    try:
        return greedy_search(
            DistributedScorer.wrap(scorer), num_blocks=num_blocks, granularity=config.granularity,
            target=search_target, window_until_ratio=config.window_until_ratio, window_first_block=window_first_block,
            completed=completed, on_step=after_step, on_candidate=on_candidate, only=config.only, budget=budget,
        )
    finally:
        bar.close()


def context_distance(config: RunConfig) -> Metric:
    """The output distance a scoring context prepares its reference for. BlockPruner (metric ``ppl``) scores by
    perplexity and never reads the reference, so the default distance stands in (prepared lazily: no cost)."""
    return metric_named(config.metric if config.metric in METRICS else RunConfig.metric)


def _progress_bar(*, num_blocks: int, config: RunConfig, done: int, target: int, enabled: bool):
    from tqdm.auto import tqdm

    total = planned_evaluations(num_blocks=num_blocks, config=config, done=done, target=target)
    return tqdm(total=total, desc="finercut", unit="cand", disable=not enabled, dynamic_ncols=True)


def prune(
    model: nn.Module, tokenizer: Any = None, *, ratio: float | None = None, count: int | None = None,
    method: str = "finercut", metric: str = "js", granularity: str | None = None, only: str | None = None,
    input_ids: torch.Tensor | None = None,
    calibration: str = "wikitext2", data_dir: str | os.PathLike | None = None, num_samples: int = 10,
    seq_len: int = 256, seed: int = 0, batch_size: int | None = None, scorer: str = "fast", exhaustive: bool = False,
    window_until_ratio: float = 0.4, window_fraction: float = 0.4, window_first_block: int | None = None,
    progress: bool = True, shapley_permutations: int = 10, shapley_truncation: float | None = None,
    cost_target: str | None = None, cost_fraction: float | None = None, cost_context: int | None = None,
) -> PruneResult:
    """Find which sub-layers of an in-memory model to remove; the model is left unchanged.

    Args:
        model: a ``transformers`` causal LM of a supported architecture (run in eval mode, then restored).
        tokenizer: needed unless ``input_ids`` is given.
        ratio: layer pruning ratio r: removes round(r * 2L) sub-layers (round(r * L) blocks). Default 0.25
            when ``count`` is not given either.
        only: ``"attention"`` or ``"ffn"``: only sub-layers of that kind are candidates (ratio counts them).
        cost_target: ``"params"``, ``"macs"`` (with ``cost_context`` tokens), ``"kv_cache"`` or ``"latency"``
            (measured here first): instead of a ratio, remove the least distance per cost saved until the model
            costs at most ``cost_fraction`` of the dense model (:mod:`finercut.budgets`).
        input_ids: ``[samples, seq]`` ready calibration token ids (instead of sampling ``calibration``).
        calibration: ``"wikitext2"`` or a ``.txt``/``.jsonl`` file, sampled into ``num_samples`` windows of
            ``seq_len`` tokens with ``seed``.

    Returns:
        A :class:`PruneResult`; apply it with :func:`finercut.apply_removal` for a physically smaller model.
    """
    if ratio is None and count is None and cost_target is None:
        ratio = 0.25
    data_folder = resolve_data_dir(data_dir)
    config = RunConfig(
        method=method, granularity=granularity, only=only, metric=metric, ratio=ratio, count=count,
        window_until_ratio=window_until_ratio, window_fraction=window_fraction,
        window_first_block=window_first_block, calibration=calibration,
        data_dir=str(data_folder) if data_folder else None, num_samples=num_samples, seq_len=seq_len, seed=seed,
        batch_size=batch_size, scorer=scorer, exhaustive=exhaustive, threads=torch.get_num_threads(),
        save_model=False, shapley_permutations=shapley_permutations, shapley_truncation=shapley_truncation,
        cost_target=cost_target, cost_fraction=cost_fraction, cost_context=cost_context,
    )
    adapter = adapter_for(model)
    num_blocks = adapter.num_blocks(model)
    target = None if config.cost_target else config.target(num_blocks)
    window_first = config.first_candidate_block(num_blocks)
    if input_ids is None:
        if tokenizer is None:
            raise ValueError("pass a tokenizer, or calibration token ids as input_ids")
        source = resolve_source(calibration, config.data_dir)
        check_context_length(model.config, seq_len)
        input_ids, calibration_info = calibration_samples(
            tokenizer, source, num_samples=num_samples, seq_len=seq_len, seed=seed
        )
    else:
        check_context_length(model.config, input_ids.shape[1])
        calibration_info = {"source": "tensor", "description": "token ids passed through the API",
                            **samples_info(input_ids, seed=None)}
    was_training = model.training
    model.eval()  # dropout would make every score random
    extras: dict = {}
    costs, budget = None, None
    try:
        if config.cost_target:
            costs, budget = _run_budget(model, config, input_ids, FolderState(), num_blocks, current_world())
        started = time.perf_counter()
        context = ScoringContext.build(model, adapter, context_distance(config), input_ids,
                                       batch_size=batch_size)
        reference_seconds = time.perf_counter() - started
        try:
            steps = find_steps(context, config, num_blocks=num_blocks, target=target, progress=progress,
                               extras=extras, budget=budget)
        finally:
            context.close()
    finally:
        model.train(was_training)
    record = build_record(
        config=config, model_info=_model_info(model), calibration_info=calibration_info,
        environment=environment_info(threads=torch.get_num_threads(), device=str(model.device)), steps=steps,
        num_blocks=num_blocks, target=len(steps) if budget else target, window_first_block=window_first,
        timings={"reference_seconds": reference_seconds,
                 "search_seconds": time.perf_counter() - started - reference_seconds},
        extra={"kv_cache": kv_cache_summary(model, [step.unit for step in steps]), **extras,
               **(cost_record(costs, config, [step.unit for step in steps]) if costs else {})},
    )
    return PruneResult(steps=steps, record=record)


def _model_info(model: nn.Module) -> dict:
    return {
        "id": getattr(model.config, "_name_or_path", None) or type(model).__name__,
        "revision": getattr(model.config, "_commit_hash", None),
        "architecture": model.config.model_type,
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def check_context_length(model_config: Any, seq_len: int) -> None:
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(
            f"sequence length {seq_len} is longer than the model's context ({limit} positions); "
            f"use --seq-len {limit} or less"
        )


# ---------------------------------------------------------------------------------------------------------------
# Runs in an output folder


@dataclass
class FolderState:
    """What an output folder holds before a run starts."""

    saved_config: RunConfig | None = None
    completed: list[Step] = field(default_factory=list)
    calibration_sha256: str | None = None
    model_identity: dict | None = None
    holds_files: bool = False
    cost_model: dict | None = None
    """A cost-target run: the costs counted (and latency measured) before its first step."""


def inspect_output(output_dir: Path, *, parse: bool = True) -> FolderState:
    """What the output folder holds: nothing, a finercut run (to resume or extend), or files of some other kind.

    Refuses folders with files finercut did not write, so that not even ``--overwrite`` can delete them.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputFolderError(f"output {output_dir} exists and is not a folder")
    visible = sorted(p.name for p in output_dir.iterdir() if not p.name.startswith(".")) if output_dir.exists() else []
    foreign = [name for name in visible if name not in OWN_ENTRIES]
    if foreign:
        raise OutputFolderError(
            f"output folder {output_dir} holds files finercut did not write ({', '.join(foreign[:5])}"
            f"{'...' if len(foreign) > 5 else ''}); choose a new or empty folder"
        )
    if RUN_FILE not in visible or not parse:
        return FolderState(holds_files=bool(visible))
    try:
        saved_config = RunConfig.from_dict(read_json(output_dir / RUN_FILE)["config"])
        progress = read_json(output_dir / PROGRESS_FILE) if (output_dir / PROGRESS_FILE).exists() else None
        completed = [Step.from_dict(step) for step in progress["steps"]] if progress else []
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise OutputFolderError(
            f"{output_dir / RUN_FILE} or its progress file is unreadable ({error}); pass --overwrite to start over"
        ) from error
    return FolderState(saved_config, completed, progress.get("calibration_sha256") if progress else None,
                       progress.get("model_identity") if progress else None, True,
                       progress.get("cost_model") if progress else None)


def discard_run_files(output_dir: Path) -> None:
    """Delete what an earlier run wrote (and only that)."""
    if not output_dir.exists():
        return
    for path in output_dir.iterdir():
        if path.name in OWN_ENTRIES or path.name.startswith("."):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def resolve_run_config(config: RunConfig, saved: RunConfig | None) -> RunConfig:
    """Fill in what "auto"/None mean on this machine (or, resuming, what the saved run used)."""
    device = resolve_device(config.device) if not config.device_map else config.device
    # With a device map, accelerate places the model: on GPUs when there are any.
    placement = device if not config.device_map else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(config.dtype, placement)
    source = resolve_model_source(config.model, config.revision)
    model = config.model if config.model is None or source.kind == "hub" else source.location
    data_dir = resolve_data_dir(config.data_dir)
    calibration = config.calibration
    if calibration != "wikitext2":
        calibration = str(Path(calibration).expanduser().resolve())
    threads = config.threads or (saved.threads if saved else None) or torch.get_num_threads()
    return config.replace(
        model=model, device=device, dtype=dtype, data_dir=str(data_dir) if data_dir else None,
        device_map=resolve_device_map(config.device_map),
        calibration=calibration, threads=threads,
        # Resuming keeps the saved run's batch size (older runs used all samples in one batch).
        batch_size=config.batch_size or (saved.batch_size if saved else None) or DEFAULT_BATCH_SIZE,
    )


def run_in_folder(
    config: RunConfig, output_dir: str | os.PathLike, *, overwrite: bool = False, progress: bool = True,
    log: Log = print,
) -> PruneResult:
    """Run (or resume, or extend) a pruning run whose files live in ``output_dir``.

    Raises before writing anything if any setting, file or the folder is unusable.
    """
    output_dir = Path(output_dir).expanduser().resolve()
    world = init_world()  # under torchrun: this rank's place in the job; rank 0 alone writes and logs
    if not world.is_writer:
        log, progress = _silent, False
    state = inspect_output(output_dir, parse=not overwrite)
    state = world.all_gather(state)[0]  # rank 0's view of the folder: other nodes need not share it
    if overwrite:
        state = FolderState()  # the old files are deleted once the new run has passed validation
    elif state.holds_files and state.saved_config is None:
        raise OutputFolderError(
            f"output folder {output_dir} holds files of an unfinished or foreign run but no {RUN_FILE}; "
            "choose a new folder, or pass --overwrite to discard them"
        )
    config = resolve_run_config(config, state.saved_config)
    if state.saved_config is not None:
        differences = config_differences(state.saved_config, config)
        if differences:
            raise ConfigError(
                f"{output_dir} holds a run with different settings:\n  " + "\n  ".join(differences)
                + "\nUse the same settings to resume it, another --output, or --overwrite to discard it"
            )

    source = resolve_model_source(config.model, config.revision)
    model_config = load_config(source)
    adapter = adapter_for_config(model_config)
    num_blocks = int(getattr(model_config, adapter.num_layers))
    target = None if config.cost_target else config.target(num_blocks)
    if config.cost_target and state.cost_model is not None and state.completed:
        target = _steps_meeting(state, config, output_dir)  # None: not met yet, the search goes on
    config.first_candidate_block(num_blocks)
    check_context_length(model_config, config.seq_len)
    identity = model_identity(source, model_config)
    check_same_model(state, identity, output_dir, log)
    if target is not None and len(state.completed) > target:
        raise ConfigError(
            f"{output_dir} already removed {len(state.completed)} units; a smaller target ({target}) needs a new "
            "--output folder (a shorter greedy run is a prefix of this one: see 'finercut apply --count')"
        )
    calibration_source = resolve_source(config.calibration, config.data_dir)
    finished = world.all_gather(_finished_record(output_dir, state, target, config) if world.is_writer else None)[0]
    if finished is not None:
        log(f"finercut: {output_dir} already holds this finished run ({target} units removed); nothing to do")
        return PruneResult(steps=state.completed, record=finished, output_dir=output_dir,
                           resumed_steps=len(state.completed))

    # Cheap checks passed; load the tokenizer and draw the calibration samples (may still fail: too short).
    torch.set_num_threads(config.threads)
    tokenizer = world.local_first(lambda: load_tokenizer(source))  # a GGUF is converted once per node
    input_ids, calibration_info = calibration_samples(
        tokenizer, calibration_source, num_samples=config.num_samples, seq_len=config.seq_len, seed=config.seed
    )
    if state.calibration_sha256 and state.calibration_sha256 != calibration_info["token_ids_sha256"]:
        raise ConfigError(
            f"the calibration samples differ from those of the saved run in {output_dir} (the source text "
            "changed?); resume with the same data or start over with --overwrite"
        )
    model, model_info = load_model(source, dtype=config.dtype, device=config.device, device_map=config.device_map)
    model_info["identity"] = identity
    cost_model, budget = None, None
    if config.cost_target:  # counted and measured before the search; a resumed run keeps its saved figures
        cost_model, budget = _run_budget(model, config, input_ids, state, num_blocks, world)

    world.barrier()  # every rank has read the folder and passed validation before rank 0 changes it
    if world.is_writer:
        if overwrite:
            discard_run_files(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / RUN_FILE, {"format": RUN_FORMAT, "config": config.to_dict()})
    what = 'blocks' if config.granularity == 'block' else 'sub-layers'
    amount = (f"{what} until {config.cost_target} <= {config.cost_fraction:.1%} of the dense model" if budget
              else f"{target} {what}")
    log(f"finercut: {config.method} on {model_info['id']} ({adapter.name}, {num_blocks} blocks), removing "
        f"{amount}; output in {output_dir}")
    # Baselines select everything at once from the original model: nothing of an earlier run carries over.
    one_shot = config.method != "finercut"
    completed = [] if one_shot else list(state.completed)
    if completed:
        log(f"resuming after {len(completed)} finished steps")

    def write_progress(steps: Sequence[Step]) -> None:
        if not world.is_writer:
            return
        write_json_atomic(output_dir / PROGRESS_FILE, {
            "format": PROGRESS_FORMAT, "calibration_sha256": calibration_info["token_ids_sha256"],
            "model_identity": identity,
            "steps": [step.to_dict() for step in steps],
            **({"cost_model": cost_model} if cost_model else {}),
        })

    steps_so_far = list(completed)

    def save_progress(step: Step) -> None:
        steps_so_far.append(step)
        write_progress(steps_so_far)

    extras: dict = {}
    started = time.perf_counter()
    reference_seconds = 0.0
    rank_block_executions = None  # this invocation's work per rank, like its timings
    if len(completed) == target or (budget is not None and budget.met([step.unit for step in completed])):
        steps = completed  # the search finished earlier; only its outputs are missing
    else:
        context = ScoringContext.build(model, adapter, context_distance(config), input_ids,
                                       batch_size=config.batch_size)
        reference_seconds = time.perf_counter() - started
        try:
            steps = find_steps(context, config, num_blocks=num_blocks, target=None if budget else target,
                               completed=completed, on_step=save_progress, progress=progress, extras=extras,
                               budget=budget)
            rank_block_executions = world.all_gather(context.block_executions)
        finally:
            context.close()
        if one_shot:
            write_progress(steps)

    if cost_model:
        extras.update(cost_record(cost_model, config, [step.unit for step in steps]))
    record = build_record(
        config=config, model_info=model_info, calibration_info=calibration_info,
        environment=environment_info(threads=config.threads, device=config.device), steps=steps,
        num_blocks=num_blocks, target=len(steps) if budget else target,
        window_first_block=config.first_candidate_block(num_blocks),
        timings={"reference_seconds": reference_seconds,
                 "search_seconds": time.perf_counter() - started - reference_seconds,
                 "resumed_steps": len(completed), "block_executions_by_rank": rank_block_executions},
        extra={"kv_cache": kv_cache_summary(model, [step.unit for step in steps]),
               "distributed": world.describe(), **extras},
    )
    if not world.is_writer:
        world.barrier()  # until rank 0 has written the outputs
        return PruneResult(steps=steps, record=record, output_dir=output_dir, resumed_steps=len(completed),
                           writer=False)
    write_json_atomic(output_dir / RECORD_FILE, record)
    plot_layer_map([s.unit for s in steps], num_blocks, output_dir / LAYER_MAP_FILE,
                   title=layer_map_title(record))
    plot_step_scores(record["steps"], output_dir / STEP_SCORES_FILE, title=layer_map_title(record))
    result = PruneResult(steps=steps, record=record, output_dir=output_dir, model=model, tokenizer=tokenizer,
                         resumed_steps=len(completed))
    if config.save_model:
        result.notes.append(save_pruned_model(result, num_blocks=num_blocks).format())
    world.barrier()
    return result


def _steps_meeting(state: FolderState, config: RunConfig, output_dir: Path) -> int | None:
    """Resuming or extending a cost-target run: how many of its finished steps the target needs (None: more).

    A larger fraction than the run reached first is refused like a smaller ``--ratio``: its run is a prefix."""
    from finercut.budgets import cost_models_of

    budget = Budget(cost_models_of(state.cost_model)[config.cost_target], config.cost_fraction)
    needed = budget.steps_to_meet([step.unit for step in state.completed])
    if needed is not None and needed < len(state.completed):
        raise ConfigError(
            f"{output_dir} already removed {len(state.completed)} units; a {config.cost_target} target of "
            f"{config.cost_fraction:.1%} was met after {needed} of them and needs a new --output folder (a shorter "
            f"greedy run is a prefix of this one: see 'finercut apply --count {needed}')"
        )
    return needed


def _run_budget(model: nn.Module, config: RunConfig, input_ids: torch.Tensor, state: FolderState,
                num_blocks: int, world: Any) -> tuple[dict, Budget]:
    """The run's costs (saved ones when resuming) and its budget; refuses an unreachable target before scoring.

    Under torchrun every rank uses rank 0's figures: measured latencies differ between ranks, and the ranks
    must select the same units."""
    from finercut.budgets import cost_models_of, count_run_costs

    costs = state.cost_model
    if costs is None:
        costs = count_run_costs(model, input_ids[:1], macs_context=config.cost_context or config.seq_len)
        costs = world.all_gather(costs)[0]
    budget = Budget(cost_models_of(costs)[config.cost_target], config.cost_fraction)
    try:
        budget.check_reachable(all_units(num_blocks, config.granularity, config.only))
    except ConfigError as error:
        raise ConfigError(f"{error}; choose a larger fraction" + (" or drop --only" if config.only else "")) from error
    return costs, budget


def cost_record(costs: dict, config: RunConfig, removed: Sequence[Unit]) -> dict:
    """What a cost-target run adds to its record: the target, the counted costs, the trajectory per step."""
    from finercut.budgets import cost_trajectory

    trajectory = cost_trajectory(costs, removed)
    return {
        "cost_target": {"measure": config.cost_target, "fraction": config.cost_fraction,
                        "context": config.cost_context,
                        "reached": trajectory[-1][config.cost_target] if trajectory else 1.0},
        "cost_model": costs,
        "cost_trajectory": trajectory,
    }


def _silent(message: str) -> None:
    """The log of ranks other than 0: one rank speaks for the job."""


def check_same_model(state: FolderState, identity: dict, output_dir: Path, log: Log) -> None:
    """Refuse to continue a run's steps on a model other than the one they were searched on."""
    if not state.completed:
        return
    if state.model_identity is None:
        log(f"finercut: the run in {output_dir} does not record which model it searched (made by an older "
            "finercut); resuming without checking that the model is unchanged")
        return
    differences = identity_differences(state.model_identity, identity)
    if differences:
        raise ConfigError(
            f"{output_dir} holds steps searched on a different model:\n  " + "\n  ".join(differences)
            + "\nResume with the model the run used, or start over with --overwrite"
        )


def save_pruned_model(result: PruneResult, *, num_blocks: int):
    """Physically remove the found units from the run's model and save it to ``<output>/model``."""
    from finercut.checkpoint import apply_removal, parameter_stats, save_pruned

    for stale in result.output_dir.glob(f".{MODEL_DIR}.partial-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    dense_stats = parameter_stats(result.model)
    apply_removal(result.model, result.removed, num_blocks=num_blocks)
    return save_pruned(
        result.model, result.output_dir / MODEL_DIR, tokenizer=result.tokenizer, dense_stats=dense_stats,
        overwrite=True, provenance={"run": str(result.output_dir), "source_model": result.record["model"]},
    )


def _finished_record(output_dir: Path, state: FolderState, target: int, config: RunConfig) -> dict | None:
    """The saved record if the folder already holds exactly this run, finished with all its outputs."""
    record_file = output_dir / RECORD_FILE
    if state.saved_config is None or len(state.completed) != target or not record_file.exists():
        return None
    if config.save_model and not (output_dir / MODEL_DIR).is_dir():
        return None
    record = read_json(record_file)
    return record if len(record["steps"]) == target else None


def layer_map_title(record: dict) -> str:
    reached = record["reached"]
    method = record["method"] + (f" ({record['metric']})" if record.get("metric") else "")
    return (f"{record['model']['id']}: {method}, {reached['sublayers']}/{2 * record['model']['num_blocks']} "
            f"sub-layers removed (ratio {reached['sublayer_ratio']:.1%})")
