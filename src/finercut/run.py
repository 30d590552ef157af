"""Pruning runs: one pipeline for the in-memory API (:func:`prune`) and runs in an output folder
(:func:`run_in_folder`).

Both end in :func:`search_model`: count a cost target's costs, run the original model once over the calibration
samples, let the method select (:func:`find_steps`, a lookup in :mod:`finercut.methods`) and build the
:class:`~finercut.record.Record`. A folder run adds what a folder needs around that core: every check before any
expensive work or any write, the lock, progress saved after every step (atomically), resume and extension from
what the folder holds, and the outputs (``record.json``, ``layer_map.png``, ``step_scores.png``, ``model/``),
each listed in the folder's manifest and tagged with the removals it was made for (:mod:`finercut.folder`).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from finercut.adapters import adapter_for, adapter_for_config
from finercut.calibration import (
    AUTO, DATA_DIR_ENV, SELF_GENERATED, calibration_samples, canonical_calibration, choose_default_calibration,
    resolve_data_dir, resolve_source, samples_info,
)
from finercut.candidates import Unit, all_units
from finercut.distances import METRICS, Metric, metric_named
from finercut.distributed import current_world, init_world
from finercut.errors import UserError
from finercut.evaluation.stats import kv_cache_summary
from finercut.folder import (
    CALIBRATION_IDS_FILE,
    LAYER_MAP_FILE,
    MODEL_DIR,
    PROGRESS_FILE,
    RECORD_FILE,
    RUN_FILE,
    STEP_SCORES_FILE,
    FolderLock,
    Manifest,
    OutputFolderError,
    discard_own_entries,
    foreign_entries,
)
from finercut.jsonio import read_json, write_json_atomic
from finercut.methods import GREEDY, ONE_SHOT, SEARCH, Selecting
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
from finercut.placement import resolve_device_map
from finercut.plots import plot_layer_map, plot_step_scores
from finercut.progress import WorkProgress
from finercut.record import (
    PROGRESS_FORMAT,
    RUN_FORMAT,
    ConfigError,
    Record,
    RecordError,
    RunConfig,
    config_differences,
    environment_info,
    read_run_config,
)
from finercut.scoring import DEFAULT_BATCH_SIZE, ScoringContext
from finercut.search import Budget, Step

Log = Callable[[str], None]

__all__ = ["OutputFolderError", "PruneResult", "find_steps", "prune", "run_in_folder", "search_model"]


@dataclass
class PruneResult:
    """What a pruning run found: the steps in order and the record describing them."""

    steps: list[Step]
    record: Record
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


@dataclass
class FolderState:
    """What an output folder holds before a run starts (nothing, for an in-memory run)."""

    saved_config: RunConfig | None = None
    completed: list[Step] = field(default_factory=list)
    calibration_sha256: str | None = None
    model_identity: dict | None = None
    holds_files: bool = False
    cost_model: dict | None = None
    """A cost-target run: the costs counted (and latency measured) before its first step."""
    method_state: dict | None = None
    """What the method saved (a one-shot method's ranking of every unit)."""


# ---------------------------------------------------------------------------------------------------------------------
# The core: select on a loaded model


def find_steps(
    context: ScoringContext | None, config: RunConfig, *, num_blocks: int, target: int | None,
    completed: Sequence[Step] = (), on_step: Callable[[Step], None] | None = None,
    progress: WorkProgress | None = None, extras: dict | None = None, budget: Budget | None = None,
    saved: dict | None = None, save_state: Callable[[dict], None] | None = None, log: Log | None = None,
    objective: Any = None,
) -> list[Step]:
    """Run the config's method on a scoring context (``context`` may be None only when the method reuses a saved
    ranking). Greedy methods continue after ``completed``; the others select everything at once and get none.

    ``extras`` receives what a method adds to the record (Shapley: ``importance``), ``save_state`` what it wants
    kept for a resume (a one-shot method's ranking).
    """
    method = config.method_spec
    request = Selecting(
        context=context, config=config, num_blocks=num_blocks, target=target, budget=budget,
        completed=list(completed) if method.selection == GREEDY else [], saved=saved, on_step=on_step,
        save_state=save_state or (lambda state: None), progress=progress or WorkProgress(enabled=False),
        extras=extras if extras is not None else {}, log=log or (lambda message: None), objective=objective,
    )
    if context is not None and method.selection != GREEDY:  # greedy methods plan their bar step by step
        request.progress.plan(method.plan_work(request))
    return method.select(request)


def context_distance(config: RunConfig) -> Metric:
    """The output distance a scoring context prepares its reference for. A method that scores by something else
    never reads the reference, so the default distance stands in (prepared lazily: no cost)."""
    return metric_named(config.metric if config.metric in METRICS else RunConfig.metric)


def search_model(
    model: nn.Module, config: RunConfig, input_ids: torch.Tensor, *, calibration_info: dict, model_info: dict,
    state: FolderState | None = None, progress: bool = True, log: Log | None = None,
    on_steps: Callable[[list[Step], dict | None], None] | None = None, timings: dict | None = None,
    measure_gains: bool = True, objective: Any = None,
) -> tuple[list[Step], Record]:
    """Select on a loaded model and describe the result: the core of every run.

    Args:
        input_ids: ``[samples, seq]`` calibration token ids.
        state: what an output folder holds (finished steps, saved costs and method state); None: nothing.
        on_steps: called with all steps so far (and the method's saved state) whenever they change, to persist
            them.
        measure_gains: count parameters, MACs and KV cache before and after, and time the forward pass of the
            dense and the pruned model side by side (the record's ``gains``).
        objective: a task objective's tokenized examples (:class:`finercut.scoring.task.TaskExamples`): the
            scoring context runs over them instead of ``input_ids``, which still measure costs and latency.
    """
    state = state or FolderState()
    log = log or (lambda message: None)
    world = current_world()
    adapter = adapter_for(model)
    num_blocks = adapter.num_blocks(model)
    method = config.method_spec
    target = None if config.cost_target else config.target(num_blocks)
    costs, budget = None, None
    if config.cost_target:  # counted and measured before the search; a resumed run keeps its saved figures
        costs, budget = _run_budget(model, config, input_ids, state, num_blocks, world)
    completed = list(state.completed) if method.selection == GREEDY else []
    saved = state.method_state if method.selection in (ONE_SHOT, SEARCH) else None
    if completed:
        log(f"resuming after {len(completed)} finished steps")
    elif state.completed and not saved:
        log(f"finercut: {method.label} selects its units as a whole; the selection restarts (nothing of the earlier "
            "run is reused)")
    extras: dict = {}
    method_state = dict(saved) if saved else None
    steps_so_far = list(completed)

    def save_progress(step: Step) -> None:
        steps_so_far.append(step)
        if on_steps:
            on_steps(list(steps_so_far), method_state)

    def save_state(new_state: dict) -> None:
        nonlocal method_state
        method_state = new_state
        if on_steps:
            on_steps(list(steps_so_far), method_state)

    started = time.perf_counter()
    reference_seconds = 0.0
    rank_block_executions = None  # this invocation's work per rank, like its timings
    finished = completed and (len(completed) == target or (budget is not None and budget.met(
        [step.unit for step in completed])))
    was_training = model.training
    model.eval()  # dropout would make every score random
    try:
        if finished:
            steps = completed  # the search finished earlier; only its outputs are missing
        else:
            reuse = method.selection == ONE_SHOT and saved is not None and bool(saved.get("ranking"))
            scored_ids = objective.batches() if objective is not None else input_ids
            context = None if reuse else ScoringContext.build(model, adapter, context_distance(config), scored_ids,
                                                              batch_size=config.batch_size)
            reference_seconds = time.perf_counter() - started
            bar = WorkProgress(enabled=progress and world.is_writer)
            if context is not None:
                bar.attach(context)
            try:
                steps = find_steps(context, config, num_blocks=num_blocks, target=None if budget else target,
                                   completed=completed, on_step=save_progress, progress=bar, extras=extras,
                                   budget=budget, saved=saved, save_state=save_state, log=log,
                                   objective=objective)
                if context is not None:
                    rank_block_executions = world.all_gather(context.block_executions)
            finally:
                bar.close()
                if context is not None:
                    context.close()
            if method.selection != GREEDY and on_steps:
                on_steps(list(steps), method_state)
    finally:
        model.train(was_training)
    if costs:
        extras.update(cost_record(costs, config, [step.unit for step in steps]))
    if objective is not None:
        extras["objective"] = objective.info()
    if measure_gains:
        from finercut.budgets import GAINS_CONTEXT, run_gains

        limit = getattr(model.config, "max_position_embeddings", None) or GAINS_CONTEXT
        extras["gains"] = run_gains(model, [step.unit for step in steps], input_ids,
                                    context_length=min(GAINS_CONTEXT, limit))
    search = extras.pop("search", None)
    record = Record(
        config=config, search=search, model={**model_info, "num_blocks": num_blocks}, calibration=calibration_info,
        environment=environment_info(threads=config.threads or torch.get_num_threads(),
                                     device=str(config.device if config.device != "auto" else model.device)),
        steps=tuple(steps), target_count=len(steps) if budget else target,
        window_first_block=config.first_candidate_block(num_blocks),
        timings={"reference_seconds": reference_seconds,
                 "search_seconds": time.perf_counter() - started - reference_seconds,
                 "resumed_steps": len(completed), "block_executions_by_rank": rank_block_executions,
                 **(timings or {})},
        extras={"kv_cache": kv_cache_summary(model, [step.unit for step in steps]), "distributed": world.describe(),
                **extras},
    )
    return steps, record


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


# ---------------------------------------------------------------------------------------------------------------------
# In memory


def prune(
    model: nn.Module, tokenizer: Any = None, *, ratio: float | None = None, count: int | None = None,
    method: str = "finercut", metric: str = "js", granularity: str | None = None, only: str | None = None,
    input_ids: torch.Tensor | None = None,
    calibration: str = AUTO, data_dir: str | os.PathLike | None = None, num_samples: int = 10,
    seq_len: int = 256, seed: int = 0, batch_size: int | None = None, scorer: str = "fast", exhaustive: bool = False,
    window_until_ratio: float = 0.4, window_fraction: float = 0.4, window_first_block: int | None = None,
    progress: bool = True, measure_gains: bool = True, options: dict | Any = None,
    shapley_permutations: int | None = None,
    shapley_truncation: float | None = None,
    cost_target: str | None = None, cost_fraction: float | None = None, cost_context: int | None = None,
    objective: str | None = None, objective_examples: int = 32, objective_fewshot: int | None = None,
    generation: dict | None = None,
) -> PruneResult:
    """Find which sub-layers of an in-memory model to remove; the model is left unchanged.

    Args:
        model: a ``transformers`` causal LM of a supported architecture (run in eval mode, then restored).
        tokenizer: needed unless ``input_ids`` is given.
        ratio: layer pruning ratio r: removes round(r * 2L) sub-layers (round(r * L) blocks). Default 0.25
            when ``count`` is not given either.
        method: a registered method (:func:`finercut.methods.registered`); ``options`` are its own (a dict or
            its options dataclass; Shapley's also as ``shapley_permutations`` / ``shapley_truncation``).
        only: ``"attention"`` or ``"ffn"``: only sub-layers of that kind are candidates (ratio counts them).
        cost_target: ``"params"``, ``"macs"`` (with ``cost_context`` tokens), ``"kv_cache"`` or ``"latency"``
            (measured here first): instead of a ratio, remove the least distance per cost saved until the model
            costs at most ``cost_fraction`` of the dense model (:mod:`finercut.budgets`).
        input_ids: ``[samples, seq]`` ready calibration token ids (instead of sampling ``calibration``).
        calibration: ``"auto"`` (default: WikiText-2 from ``data_dir`` or the hub, else ``"self"``, with a
            warning), ``"wikitext2"``, ``"tasks"`` (the task files' passages no evaluation reads) or a
            ``.txt``/``.jsonl`` file, sampled into ``num_samples`` windows of ``seq_len`` tokens with ``seed``; or
            ``"self"``: samples generated by the model itself (``generation``: ``temperature``, ``top_p``,
            ``filter``, ``batch_size``, ``prompt``; :func:`finercut.synthetic.generate_calibration`).
        objective: ``"task:NAME"``: score by the mean answer NLL of ``objective_examples`` examples of that task
            that no evaluation reads (:mod:`finercut.scoring.task`), instead of the output distance.

    Returns:
        A :class:`PruneResult`; apply it with :func:`finercut.apply_removal` for a physically smaller model.
    """
    if ratio is None and count is None and cost_target is None:
        ratio = 0.25
    legacy = {name: value for name, value in (("permutations", shapley_permutations),
                                               ("truncation", shapley_truncation)) if value is not None}
    if legacy:
        options = {**(options or {}), **legacy}
    data_folder = resolve_data_dir(data_dir)
    if calibration == AUTO and input_ids is None:
        calibration, missing = choose_default_calibration(data_folder)
        if missing:
            warnings.warn(f"no WikiText-2 here ({missing}): calibrating on samples the model generates itself "
                          "(calibration='self'); pass data_dir=, or calibration= a text file", stacklevel=2)
    config = RunConfig(
        method=method, granularity=granularity, only=only, metric=metric, ratio=ratio, count=count,
        window_until_ratio=window_until_ratio, window_fraction=window_fraction,
        window_first_block=window_first_block, calibration=calibration,
        data_dir=str(data_folder) if data_folder else None, num_samples=num_samples, seq_len=seq_len, seed=seed,
        batch_size=batch_size, scorer=scorer, exhaustive=exhaustive, threads=torch.get_num_threads(),
        save_model=False, options=options, cost_target=cost_target, cost_fraction=cost_fraction,
        cost_context=cost_context, objective=objective, objective_examples=objective_examples,
        objective_fewshot=objective_fewshot,
        **{f"gen_{name}": value for name, value in (generation or {}).items()},
    )
    adapter_for(model)  # an unknown architecture fails here, before any calibration work
    chosen = _task_requests(config)
    if input_ids is None:
        if tokenizer is None:
            raise ValueError("pass a tokenizer, or calibration token ids as input_ids")
        source = resolve_source(calibration, config.data_dir)
        check_context_length(model.config, seq_len)
        if config.calibration == SELF_GENERATED:
            from finercut.synthetic import generate_calibration

            input_ids, calibration_info = generate_calibration(model, tokenizer, progress=progress,
                                                               **generation_settings(config))
        else:
            input_ids, calibration_info = calibration_samples(
                tokenizer, source, num_samples=num_samples, seq_len=seq_len, seed=seed
            )
    else:
        check_context_length(model.config, input_ids.shape[1])
        calibration_info = {"source": "tensor", "description": "token ids passed through the API",
                            **samples_info(input_ids, seed=None)}
    examples = None
    if chosen is not None:
        if tokenizer is None:
            raise ValueError("a task objective needs the tokenizer (its examples are text)")
        examples = chosen.tokenized(tokenizer, max_length=getattr(model.config, "max_position_embeddings", None))
    steps, record = search_model(model, config, input_ids, calibration_info=calibration_info,
                                 model_info=_model_info(model), progress=progress, measure_gains=measure_gains,
                                 objective=examples)
    return PruneResult(steps=steps, record=record)


# ---------------------------------------------------------------------------------------------------------------------
# In an output folder


def inspect_output(output_dir: Path, *, parse: bool = True) -> FolderState:
    """What the output folder holds: nothing, a finercut run (to resume or extend), or files of some other kind.

    Refuses folders with files finercut did not write, so that not even ``--overwrite`` can delete them.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputFolderError(f"output {output_dir} exists and is not a folder")
    foreign = foreign_entries(output_dir)
    if foreign:
        raise OutputFolderError(
            f"output folder {output_dir} holds files finercut did not write ({', '.join(foreign[:5])}"
            f"{'...' if len(foreign) > 5 else ''}); choose a new or empty folder"
        )
    visible = sorted(p.name for p in output_dir.iterdir() if not p.name.startswith(".")) if output_dir.exists() else []
    if RUN_FILE not in visible or not parse:
        return FolderState(holds_files=bool(visible))
    saved_config = read_run_config(output_dir / RUN_FILE)
    progress_file = output_dir / PROGRESS_FILE
    progress = read_json(progress_file, expect=dict, what="progress file") if progress_file.exists() else None
    if progress is None:
        return FolderState(saved_config, holds_files=True)
    try:
        if progress.get("format") != PROGRESS_FORMAT or not isinstance(progress.get("steps"), list):
            raise ValueError(f"format {progress.get('format')!r}, expected {PROGRESS_FORMAT} with steps")
        completed = [Step.from_dict(step) for step in progress["steps"]]
        method_state = progress.get("method_state")
        if method_state is not None and not isinstance(method_state, dict):
            raise ValueError("method_state is not an object")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise OutputFolderError(
            f"{progress_file} is not a finercut progress file ({error}); pass --overwrite to start over"
        ) from None
    return FolderState(saved_config, completed, progress.get("calibration_sha256"), progress.get("model_identity"),
                       True, progress.get("cost_model"), method_state)


def resolve_run_config(config: RunConfig, saved: RunConfig | None) -> RunConfig:
    """Fill in what "auto"/None mean on this machine (or, resuming, what the saved run used)."""
    device = resolve_device(config.device) if not config.device_map else config.device
    # With a device map, accelerate places the model: on GPUs when there are any.
    placement = device if not config.device_map else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(config.dtype, placement)
    source = resolve_model_source(config.model, config.revision)
    model = config.model if config.model is None or source.kind == "hub" else source.location
    data_dir = resolve_data_dir(config.data_dir)
    calibration = canonical_calibration(config.calibration)
    if calibration == AUTO:  # resuming keeps the source the run started with, whatever this machine can reach
        calibration = saved.calibration if saved else choose_default_calibration(data_dir)[0]
    threads = config.threads or (saved.threads if saved else None) or torch.get_num_threads()
    return config.replace(
        model=model, device=device, dtype=dtype, data_dir=str(data_dir) if data_dir else None,
        device_map=resolve_device_map(config.device_map),
        calibration=calibration, threads=threads,
        # Resuming keeps the saved run's batch size (older runs used all samples in one batch).
        batch_size=config.batch_size or (saved.batch_size if saved else None) or DEFAULT_BATCH_SIZE,
    )


def check_output_location(output_dir: Path) -> None:
    """Refuse, before any work, an output folder that could not be created or written."""
    for part in output_dir.parts:
        if len(part.encode()) > 255:
            raise OutputFolderError(f"--output {str(output_dir)[:80]}...: the name {part[:40]}... is longer than "
                                    "255 bytes, the limit of a file name")
    existing = output_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != output_dir and not existing.is_dir():
        raise OutputFolderError(f"--output {output_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(f"--output {output_dir}: {existing} is not writable")


def run_in_folder(
    config: RunConfig, output_dir: str | os.PathLike, *, overwrite: bool = False, progress: bool = True,
    log: Log = print, recovery: Any = None,
) -> PruneResult:
    """Run (or resume, or extend) a pruning run whose files live in ``output_dir``.

    Raises before writing anything if any setting, file or the folder is unusable. With ``recovery`` (a
    :class:`finercut.materialize.RecoveryOptions`, checked against the model's shape before it loads) the saved
    ``model/`` is the recovered one; a finished run asked for another recovery saves its model again.
    """
    output_dir = Path(output_dir).expanduser().resolve()
    check_output_location(output_dir)
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
    defaulted = config.calibration == AUTO and state.saved_config is None
    config = resolve_run_config(config, state.saved_config)
    if defaulted and config.calibration == SELF_GENERATED:
        log(f"finercut: no WikiText-2 here (no --data-dir or {DATA_DIR_ENV}, and the Hugging Face hub did not serve "
            f"it): calibrating on {config.num_samples} samples the model generates itself (--calibration self). "
            "Pass --data-dir, or --calibration FILE for your own text")
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
            "--output folder (a shorter run is a prefix of this one: see 'finercut apply --count')"
        )
    calibration_source = resolve_source(config.calibration, config.data_dir)
    chosen = _task_requests(config)  # the objective's examples, read (and checked) before anything loads
    if recovery is not None:
        if not config.save_model:
            raise ConfigError("--recover saves a recovered model: it cannot be combined with --no-save-model")
        recovery.check_model(model_config)
    model_key = model_output_key if recovery is None else (lambda key: f"{key}+{_short_hash(recovery.signature)}")
    finished = world.all_gather(finished_record(output_dir, state, target, config, model_key=model_key)
                                if world.is_writer else None)[0]
    if finished is not None:
        log(f"finercut: {output_dir} already holds this finished run ({target} units removed); nothing to do")
        return PruneResult(steps=state.completed, record=finished, output_dir=output_dir,
                           resumed_steps=len(state.completed))

    # Cheap checks passed; load the tokenizer and draw the calibration samples (may still fail: too short).
    torch.set_num_threads(config.threads)
    tokenizer = world.local_first(lambda: load_tokenizer(source))  # a GGUF is converted once per node
    generated = config.calibration == SELF_GENERATED  # the samples need the model: drawn once it is loaded
    if generated:
        from finercut.synthetic import generation_start

        generation_start(tokenizer, config.gen_prompt)  # a prompt the tokenizer cannot encode is refused now
    input_ids, calibration_info = (None, None) if generated else calibration_samples(
        tokenizer, calibration_source, num_samples=config.num_samples, seq_len=config.seq_len, seed=config.seed
    )
    examples = chosen.tokenized(tokenizer, max_length=getattr(model_config, "max_position_embeddings", None)) \
        if chosen is not None else None
    changed = not generated and state.calibration_sha256 not in (None, calibration_info["token_ids_sha256"])
    if changed:
        raise ConfigError(
            f"the calibration samples differ from those of the saved run in {output_dir} (the source text "
            "changed?); resume with the same data or start over with --overwrite"
        )
    model, model_info = load_model(source, dtype=config.dtype, device=config.device, device_map=config.device_map)
    model_info["identity"] = identity
    if generated and (output_dir / CALIBRATION_IDS_FILE).exists():  # a resumed run reads the samples it drew
        from finercut.synthetic import load_calibration_ids

        input_ids, calibration_info = load_calibration_ids(output_dir / CALIBRATION_IDS_FILE,
                                                           state.calibration_sha256)
    if config.cost_target and input_ids is not None:  # counted now: an unreachable target is refused before any write
        _run_budget(model, config, input_ids, state, num_blocks, world)
    world.barrier()  # every rank has read the folder and passed validation before rank 0 changes it
    lock = FolderLock(output_dir)
    if world.is_writer:
        lock.acquire()  # the first write: a second run on this folder is refused here, before it changes anything
    try:
        manifest = None
        if world.is_writer:
            if overwrite:
                discard_own_entries(output_dir)
            manifest = Manifest.read(output_dir)
            _write_own(manifest, RUN_FILE, {"format": RUN_FORMAT, "config": config.to_dict()})
        if generated and input_ids is None:
            input_ids, calibration_info = _generate_calibration(config, model, tokenizer, output_dir, manifest,
                                                                state, world, progress=progress, log=log)
            if config.cost_target:
                _run_budget(model, config, input_ids, state, num_blocks, world)
        what = 'blocks' if config.granularity == 'block' else 'sub-layers'
        amount = (f"{what} until {config.cost_target} <= {config.cost_fraction:.1%} of the dense model"
                  if config.cost_target else f"{target} {what}")
        log(f"finercut: {config.method} on {model_info['id']} ({adapter.name}, {num_blocks} blocks), removing "
            f"{amount}; output in {output_dir}")

        def write_progress(steps: Sequence[Step], method_state: dict | None) -> None:
            if not world.is_writer:
                return
            _write_own(manifest, PROGRESS_FILE, {
                "format": PROGRESS_FORMAT, "calibration_sha256": calibration_info["token_ids_sha256"],
                "model_identity": identity, "steps": [step.to_dict() for step in steps],
                **({"cost_model": state.cost_model} if state.cost_model else {}),
                **({"method_state": method_state} if method_state else {}),
            })

        steps, record = search_model(model, config, input_ids, calibration_info=calibration_info,
                                     model_info=model_info, state=state, progress=progress, log=log,
                                     on_steps=write_progress, objective=examples)
        if not world.is_writer:
            world.barrier()  # until rank 0 has written the outputs
            return PruneResult(steps=steps, record=record, output_dir=output_dir,
                               resumed_steps=record.timings["resumed_steps"], writer=False)
        result = PruneResult(steps=steps, record=record, output_dir=output_dir, model=model, tokenizer=tokenizer,
                             resumed_steps=record.timings["resumed_steps"])
        result.record = write_outputs(result, manifest, recovery=recovery, model_key=model_key, log=log)
        world.barrier()
        return result
    finally:
        lock.release()


def _task_requests(config: RunConfig) -> Any:
    """The task objective's examples (not yet tokenized), or None without one."""
    if config.objective is None:
        return None
    from finercut.scoring.task import parse_objective, task_requests

    return task_requests(parse_objective(config.objective), config.data_dir, num_examples=config.objective_examples,
                         num_fewshot=config.objective_fewshot)


def generation_settings(config: RunConfig) -> dict:
    """The keyword arguments of :func:`finercut.synthetic.generate_calibration` a run's config gives."""
    return {"num_samples": config.num_samples, "seq_len": config.seq_len, "seed": config.seed,
            "temperature": config.gen_temperature, "top_p": config.gen_top_p, "perplexity_filter": config.gen_filter,
            "batch_size": config.gen_batch_size, "prompt": config.gen_prompt}


def _generate_calibration(config: RunConfig, model: nn.Module, tokenizer: Any, output_dir: Path, manifest: Any,
                          state: FolderState, world: Any, *, progress: bool, log: Log) -> tuple[torch.Tensor, dict]:
    """Self-generated calibration samples, generated once (rank 0) and cached in the run folder."""
    from finercut.synthetic import cached_calibration, load_calibration_ids

    path = output_dir / CALIBRATION_IDS_FILE
    if world.is_writer:
        log(f"finercut: generating {config.num_samples} calibration samples of {config.seq_len} tokens with the model "
            "itself (--calibration self)")
        manifest.claim(CALIBRATION_IDS_FILE)
        ids, info = cached_calibration(path, model, tokenizer, expected_sha256=state.calibration_sha256,
                                       progress=progress, **generation_settings(config))
        manifest.finish(CALIBRATION_IDS_FILE, None)
    world.barrier()
    if not world.is_writer:
        ids, info = load_calibration_ids(path, state.calibration_sha256)
    return ids, info


def model_output_key(removal_key: str) -> str:
    """The manifest tag of a run's ``model/``: its removals (and, recovered, the recovery's settings)."""
    return removal_key


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_outputs(result: PruneResult, manifest: Manifest, *, recovery: Any = None,
                  model_key: Callable[[str], str] = model_output_key, log: Log | None = None) -> Record:
    """The run's outputs, each claimed in the manifest before it is written and tagged with the record's removals
    once complete; ``record.json`` last, listing them. Returns the record as written."""
    from finercut.materialize import save_record_model

    record, output_dir = result.record, result.output_dir
    key = record.removal_key
    outputs = [LAYER_MAP_FILE, STEP_SCORES_FILE]
    manifest.claim(LAYER_MAP_FILE)
    plot_layer_map(record.removed, record.num_blocks, output_dir / LAYER_MAP_FILE, title=record.title())
    manifest.finish(LAYER_MAP_FILE, key)
    manifest.claim(STEP_SCORES_FILE)
    plot_step_scores([step.to_dict() for step in record.steps], output_dir / STEP_SCORES_FILE, title=record.title())
    manifest.finish(STEP_SCORES_FILE, key)
    if record.config.save_model:
        manifest.claim(MODEL_DIR)
        report = save_record_model(result.model, record, output_dir / MODEL_DIR, tokenizer=result.tokenizer,
                                   provenance={"run": str(output_dir)}, recovery=recovery, log=log)
        result.notes.append(report.format())
        manifest.finish(MODEL_DIR, model_key(key))
        outputs.append(MODEL_DIR)
    record = dataclasses.replace(record, outputs=tuple(outputs))
    _write_own(manifest, RECORD_FILE, record.to_dict(), for_key=key)
    return record


def _write_own(manifest: Manifest, name: str, data: Any, *, for_key: str | None = None) -> None:
    """A JSON file of the run, listed in the manifest before it is written."""
    if name not in manifest.entries:
        manifest.claim(name)
    write_json_atomic(manifest.folder / name, data)
    if for_key is not None or manifest.made_for(name) is not None:
        manifest.finish(name, for_key)


def finished_record(output_dir: Path, state: FolderState, target: int | None, config: RunConfig, *,
                    model_key: Callable[[str], str] = model_output_key) -> Record | None:
    """The saved record if the folder already holds exactly this run, finished with every output it lists
    present and made for its removals (a run killed while its outputs were being rewritten is not finished)."""
    record_file = output_dir / RECORD_FILE
    if state.saved_config is None or target is None or len(state.completed) != target or not record_file.exists():
        return None
    try:
        record = Record.from_dict(read_json(record_file), source=record_file)
    except (RecordError, UserError):
        return None  # truncated or foreign: the outputs are written again from the finished steps
    if len(record.steps) != target or record.removed != [step.unit for step in state.completed]:
        return None
    manifest = Manifest.read(output_dir)
    if model_key is not model_output_key and not manifest.present:
        return None  # a folder of an older finercut cannot say whether its model is the recovered one
    wanted = list(record.outputs) or ([LAYER_MAP_FILE, STEP_SCORES_FILE] + ([MODEL_DIR] if config.save_model else []))
    if config.save_model and MODEL_DIR not in wanted:
        return None
    for name in wanted:
        if not (output_dir / name).exists():
            return None
        made_for = model_key(record.removal_key) if name == MODEL_DIR else record.removal_key
        if manifest.present and manifest.made_for(name) != made_for:
            return None
    if MODEL_DIR in wanted and not _model_matches(output_dir / MODEL_DIR, record):
        return None
    if manifest.present and manifest.made_for(RECORD_FILE) != record.removal_key:
        return None
    return record


def _model_matches(folder: Path, record: Record) -> bool:
    """Whether a saved pruned model removed exactly the record's sub-layers (by its config's layout)."""
    from finercut.candidates import removed_sublayers
    from finercut.pruned_modeling import LAYOUT_KEY

    try:
        layout = read_json(folder / "config.json", expect=dict).get(LAYOUT_KEY) or {}
        saved = {Unit.from_dict(entry) for entry in layout.get("removed", [])}
    except (UserError, ValueError, KeyError, TypeError):
        return False
    return saved == set(removed_sublayers(record.removed))


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
        state.cost_model = costs
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
