"""A task's own objective: the mean negative log-likelihood of the right answers on examples never evaluated.

The depth-pruning study this follows (Shapley values of blocks on a task's objective, which trade performance
between tasks) scores removals by a task's own loss rather than by an output distance. Here a candidate is scored
by the mean, over a few dozen examples of one task (default :data:`DEFAULT_NUM_EXAMPLES`), of the summed NLL
(nats) of the right answer's tokens given its prompt: lm-eval's loglikelihood of the gold choice, negated.

**Examples never evaluated.** The data folder holds one split per zero-shot task, the one lm-eval scores, and an
evaluation with ``limit`` reads its first ``limit`` items; the objective takes the **last** ``num_examples`` items
(:meth:`TaskExamples.overlaps_evaluation` says whether an evaluation limit reaches them). MMLU's are from its dev
split (5 questions per subject, the shots of the 5-shot evaluation, never scored themselves): ``num_examples`` of
its questions evenly spaced over the subjects in order.

**The evaluation's own text.** Prompts are lm-eval's requests from the offline task definitions
(:mod:`finercut.evaluation.tasks`, ``build_all_requests``), the gold request chosen as lm-eval's
``process_results`` chooses it, tokenized as lm-eval's ``HFLM`` tokenizes a pair (:func:`encode_pair`). The zero-
shot tasks are zero-shot; an MMLU dev question gets the 5-shot prompt with its subject's *other* dev questions as
shots (4: a question is never its own shot).

**Scoring.** :class:`TaskObjective` is a :class:`finercut.scoring.replay.Objective` for the fast scorer (replay,
exact early abort: every term is >= 0, so the sum over the examples scored so far bounds the mean from below);
:class:`NaiveTaskScorer` is the plain path (the masked model's own forward per candidate). The context is built
from one batch per example (:meth:`TaskExamples.batches`). :class:`ObjectiveCost` gives Shapley
(:mod:`finercut.importance`) the same objective as a cost.

Reading a task's examples imports ``lm_eval`` (the ``eval`` extra); the scorers do not need it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from finercut.distances import nll_sum
from finercut.calibration import TASK_FILES, resolve_data_dir, task_items_overlap
from finercut.candidates import Unit
from finercut.errors import ConfigError
from finercut.masking import masked
from finercut.placement import input_device
from finercut.scoring.context import ScoringContext, check_finite, run_block

if TYPE_CHECKING:
    from finercut.importance import ShapleyEstimate

DEFAULT_NUM_EXAMPLES = 32
OBJECTIVE_PREFIX = "task:"
MMLU = "mmlu"
TASK_OBJECTIVE_TASKS = (*TASK_FILES, MMLU)
MMLU_OBJECTIVE_FEWSHOT = 4
"""Shots of an MMLU dev question: the subject's other 4 dev questions (the evaluation gives a test question 5)."""


def parse_objective(spec: str | None) -> str | None:
    """The task of an objective spec: ``"task:boolq"`` -> ``"boolq"``; None (the output distance) -> None."""
    if spec is None:
        return None
    name = spec.removeprefix(OBJECTIVE_PREFIX)
    if not spec.startswith(OBJECTIVE_PREFIX) or name not in TASK_OBJECTIVE_TASKS:
        raise ConfigError(f"unknown objective {spec!r}: use task:NAME with NAME one of "
                          f"{', '.join(TASK_OBJECTIVE_TASKS)}")
    return name


# ---------------------------------------------------------------------------------------------------------------------
# The examples: lm-eval's requests for items no evaluation scores


@dataclass(frozen=True)
class TaskRequest:
    """The gold (context, continuation) pair lm-eval scores for one item, and where the item is."""

    index: int
    """The item's index in the scored split's file (MMLU: in the dev questions, subjects in order)."""
    subject: str | None
    """MMLU: the subject; else None."""
    context: str
    continuation: str
    num_fewshot: int = 0
    """Shots in the context."""


@dataclass(frozen=True)
class AnswerExample:
    """One tokenized example: the model reads ``input_ids`` and the answer is predicted at its last positions."""

    context_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.context_ids or not self.continuation_ids:
            raise ValueError("an example needs at least one context and one answer token")

    @property
    def input_ids(self) -> torch.Tensor:
        """``[1, len(context) + len(answer) - 1]``: what lm-eval feeds the model (the last answer token is only
        predicted)."""
        return torch.tensor([self.context_ids + self.continuation_ids[:-1]], dtype=torch.long)

    @property
    def answer_start(self) -> int:
        """The position predicting the first answer token (the last context token)."""
        return len(self.context_ids) - 1

    @property
    def answer_ids(self) -> torch.Tensor:
        """``[len(answer)]`` the answer's token ids, the targets of positions ``answer_start`` on."""
        return torch.tensor(self.continuation_ids, dtype=torch.long)


@dataclass(frozen=True)
class TaskExamples:
    """A task's objective examples: the requests, their tokens and where they come from."""

    task: str
    split: str
    """The split the items are from (MMLU: ``dev``; else the one the evaluation scores)."""
    num_items: int
    """Items in that split."""
    num_fewshot: int
    requests: tuple[TaskRequest, ...]
    examples: tuple[AnswerExample, ...] = ()
    """The requests tokenized (empty until :meth:`tokenized`)."""

    @property
    def indices(self) -> list[int]:
        return [request.index for request in self.requests]

    def tokenized(self, tokenizer: Any, *, max_length: int | None = None) -> "TaskExamples":
        """These requests with their token ids, encoded as lm-eval encodes them (:func:`encode_pair`).

        Args:
            max_length: the model's context length; a longer example is refused (lm-eval would cut its context
                from the left, the objective does not).
        """
        examples = tuple(AnswerExample(*map(tuple, encode_pair(tokenizer, request.context, request.continuation)))
                         for request in self.requests)
        longest = max(example.input_ids.shape[1] for example in examples)
        if max_length is not None and longest > max_length:
            raise ConfigError(f"the longest {self.task} objective example is {longest} tokens, longer than the "
                              f"model's context of {max_length}: use fewer shots")
        return dataclasses.replace(self, examples=examples)

    def overlaps_evaluation(self, limit: int | None) -> bool:
        """Whether an evaluation of the first ``limit`` items (None: all) scores one of these examples; never for
        MMLU, whose evaluation scores the test split."""
        return self.split != "dev" and task_items_overlap(min(self.indices), limit)

    def batches(self) -> list[torch.Tensor]:
        """One ``[1, len_i]`` batch per example, for :meth:`ScoringContext.build`."""
        return [example.input_ids for example in self.examples]

    def info(self) -> dict:
        """What the record says about the objective (token counts and hash once tokenized)."""
        tokenized = bool(self.examples)
        return {
            "objective": f"{OBJECTIVE_PREFIX}{self.task}",
            "description": "mean over the examples of the summed NLL (nats) of the right answer's tokens",
            "task": self.task, "split": self.split, "num_items": self.num_items, "num_fewshot": self.num_fewshot,
            "num_examples": len(self.requests), "indices": self.indices,
            "fewshot_per_example": [request.num_fewshot for request in self.requests],
            "subjects": [request.subject for request in self.requests] if self.task == MMLU else None,
            "answer_tokens": sum(len(e.continuation_ids) for e in self.examples) if tokenized else None,
            "input_tokens": sum(e.input_ids.shape[1] for e in self.examples) if tokenized else None,
            "token_ids_sha256": examples_sha256(self.examples) if tokenized else None,
        }


def examples_sha256(examples: Sequence[AnswerExample]) -> str:
    """sha256 of the examples' ids: per example its two lengths, then context and answer ids, as int64."""
    flat = [value for e in examples
            for value in (len(e.context_ids), len(e.continuation_ids), *e.context_ids, *e.continuation_ids)]
    return hashlib.sha256(torch.tensor(flat, dtype=torch.int64).numpy().tobytes()).hexdigest()


def last_items(num_items: int, count: int) -> list[int]:
    """The indices of the last ``count`` of ``num_items`` items: those an evaluation of the first items reaches
    last."""
    return list(range(num_items - count, num_items))


def evenly_spaced(num_items: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(num_items)``: ``floor(i * num_items / count)``."""
    return [i * num_items // count for i in range(count)]


def task_requests(
    name: str, data_dir: str | Path | None, *, num_examples: int = DEFAULT_NUM_EXAMPLES, num_fewshot: int | None = None,
) -> TaskExamples:
    """The objective's items of task ``name`` with lm-eval's gold requests, not yet tokenized: no tokenizer is
    needed, so a run calls this before loading anything, to fail early (missing files, too few items).

    Args:
        data_dir: the data folder (None: ``$FINERCUT_DATA_DIR``).
        num_fewshot: shots per prompt; None: as the evaluation (0; MMLU :data:`MMLU_OBJECTIVE_FEWSHOT`).
    """
    if name not in TASK_OBJECTIVE_TASKS:
        raise ConfigError(f"no task objective for {name!r}: use one of {', '.join(TASK_OBJECTIVE_TASKS)}")
    if num_examples < 1:
        raise ConfigError(f"a task objective needs at least 1 example, got {num_examples}")
    root = resolve_data_dir(data_dir)
    if root is None:
        raise ConfigError(f"the task objective reads the data folder's task files: pass --data-dir or set "
                          f"FINERCUT_DATA_DIR (task {name})")
    if name == MMLU:
        return _mmlu_requests(root / "tasks" / "mmlu", num_examples=num_examples, num_fewshot=num_fewshot)
    from finercut.evaluation.tasks.commonsense import LOCAL_FIELD_MAPPINGS, commonsense_task

    if num_fewshot:
        raise ConfigError(f"{name} is evaluated zero-shot and has no split to draw shots from: its objective is "
                          "zero-shot too")
    task = commonsense_task(name, root / "tasks")
    num_items = len(task.eval_docs)
    _check_count(name, num_examples, num_items)
    indices = last_items(num_items, num_examples)
    requests = tuple(TaskRequest(index, None, *pair) for index, pair in zip(indices, gold_requests(task, indices)))
    return TaskExamples(name, LOCAL_FIELD_MAPPINGS[name].split, num_items, 0, requests)


def _mmlu_requests(mmlu_dir: Path, *, num_examples: int, num_fewshot: int | None) -> TaskExamples:
    from finercut.evaluation.tasks.builtin import builtin_task_config, task_on_local_docs
    from finercut.evaluation.tasks.mmlu import mmlu_subjects, read_mmlu_csv

    shots = MMLU_OBJECTIVE_FEWSHOT if num_fewshot is None else num_fewshot
    if not 0 <= shots <= MMLU_OBJECTIVE_FEWSHOT:
        raise ConfigError(f"an MMLU dev question can have 0 to {MMLU_OBJECTIVE_FEWSHOT} shots (its subject's other "
                          f"dev questions), got {shots}")
    dev = {subject: read_mmlu_csv(mmlu_dir / "dev" / f"{subject}_dev.csv", subject=subject)
           for subject in mmlu_subjects(mmlu_dir)}
    questions = [(subject, row) for subject, rows in dev.items() for row in range(len(rows))]
    _check_count(MMLU, num_examples, len(questions))
    chosen = evenly_spaced(len(questions), num_examples)
    requests = []
    for subject, docs in dev.items():
        offset = questions.index((subject, 0))
        rows = [questions[i][1] for i in chosen if questions[i][0] == subject]
        # A question's shots are the other dev questions; lm-eval leaves out every copy of it (college_physics'
        # dev split holds one question twice), so a question may have fewer than ``shots`` to draw from.
        by_shots: dict[int, list[int]] = {}
        for row in rows:
            by_shots.setdefault(min(shots, sum(doc != docs[row] for doc in docs)), []).append(row)
        for row_shots, shot_rows in by_shots.items():
            # The dev split in the scored role and as the shot pool: lm-eval then leaves a question out of its
            # shots.
            task = task_on_local_docs(builtin_task_config(f"mmlu_{subject}"), splits={"dev": docs},
                                      eval_split="dev", fewshot_split="dev", num_fewshot=row_shots)
            requests += [TaskRequest(offset + row, subject, *pair, num_fewshot=row_shots)
                         for row, pair in zip(shot_rows, gold_requests(task, shot_rows))]
    return TaskExamples(MMLU, "dev", len(questions), shots,
                        tuple(sorted(requests, key=lambda request: request.index)))


def _check_count(name: str, num_examples: int, num_items: int) -> None:
    if num_examples > num_items:
        raise ConfigError(f"task {name} has {num_items} items for its objective, fewer than the {num_examples} "
                          "examples asked for")


def gold_requests(task: Any, indices: Sequence[int]) -> list[tuple[str, str]]:
    """The gold (context, continuation) of each item ``indices`` (sorted) of an lm-eval multiple-choice task,
    from lm-eval's own ``build_all_requests``; the gold is chosen as lm-eval's ``process_results`` does."""
    task.build_all_requests(samples=list(indices))
    by_doc: dict[int, dict[int, tuple]] = {}
    for instance in task.instances:
        by_doc.setdefault(instance.doc_id, {})[instance.idx] = instance.arguments
    pairs = []
    for position, index in enumerate(indices):  # lm-eval numbers the chosen documents 0, 1, ... in order
        doc = task.eval_docs[index]
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        if isinstance(gold, str):
            gold = task.doc_to_choice(doc).index(gold)
        pairs.append(tuple(by_doc[position][gold]))
    return pairs


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) pair exactly as lm-eval's ``HFLM`` makes them for loglikelihood.

    Trailing spaces of the context move to the continuation; the whole text is encoded, and the continuation's
    tokens are those after the context's own encoding (with the tokenizer's default special tokens, e.g. a
    BOS, unless the text already starts with the BOS string).
    """
    if not context:
        raise ValueError("lm-eval scores an empty context against the prefix token; the task objective has none")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    bos_text = tokenizer.decode(bos) if bos is not None else None

    def encode(text: str) -> list[int]:
        starts_with_bos = bos_text is not None and text.startswith(bos_text)
        return list(tokenizer.encode(text, **({"add_special_tokens": False} if starts_with_bos else {})))

    whole = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids):]


def task_examples(
    name: str, data_dir: str | Path | None, tokenizer: Any, *, num_examples: int = DEFAULT_NUM_EXAMPLES,
    num_fewshot: int | None = None, max_length: int | None = None,
) -> TaskExamples:
    """The objective's examples of task ``name``, tokenized (:func:`task_requests`, then
    :meth:`TaskExamples.tokenized`)."""
    chosen = task_requests(name, data_dir, num_examples=num_examples, num_fewshot=num_fewshot)
    return chosen.tokenized(tokenizer, max_length=max_length)


# ---------------------------------------------------------------------------------------------------------------------
# Scoring: the fast scorer's objective, the plain scorer, a Shapley cost


def mean_answer_nll(mean: float) -> float:
    """The score of the mean answer NLL: itself."""
    return mean


class TaskObjective:
    """The task objective as a :class:`finercut.scoring.replay.Objective`: per batch (one example) the summed
    NLL of its answer tokens; the mean over the examples is the score.

    Args:
        context: built from ``examples`` (:meth:`TaskExamples.batches`), one batch per example, in order.
    """

    score_of = staticmethod(mean_answer_nll)

    def __init__(self, context: ScoringContext, examples: Sequence[AnswerExample]) -> None:
        check_context_holds(context, examples)
        self.context = context
        self.examples = list(examples)
        self.num_positions = len(self.examples)

    def batch_sum(self, batch_index: int, hidden: torch.Tensor) -> float:
        """The answer NLL of example ``batch_index`` from the last block's output ``hidden`` (``[1, seq,
        hidden]``), through the full head on the answer positions only."""
        example, work = self.examples[batch_index], self.context.work
        answer = hidden[0, example.answer_start : example.answer_start + len(example.continuation_ids)]
        with work.timed("head"):
            logits = self.context.adapter.logits(self.context.model, answer)
        with work.timed("distance"):
            total = nll_sum(logits, example.answer_ids)
        work.head_rows += answer.shape[0]
        return total


def check_context_holds(context: ScoringContext, examples: Sequence[AnswerExample]) -> None:
    """The context's batches are the examples' inputs, one each, in order (else the objective reads the wrong
    positions)."""
    if len(context.batches) != len(examples) or any(
            not torch.equal(batch.input_ids.cpu(), example.input_ids) for batch, example in zip(context.batches,
                                                                                             examples)):
        raise ValueError("the scoring context must be built from the examples' batches (TaskExamples.batches())")


class NaiveTaskScorer:
    """The plain path: every candidate scored completely by the masked model's own forward on every example."""

    distance_path = "full_head"
    exhaustive = True

    def __init__(self, context: ScoringContext, examples: Sequence[AnswerExample], *, exhaustive: bool = True) -> None:
        check_context_holds(context, examples)
        self.context = context
        self.examples = list(examples)

    @property
    def block_executions(self) -> int:
        return self.context.block_executions

    def restore(self, removed: Sequence[Unit]) -> None:
        """Nothing is carried between steps: each candidate runs the whole model."""

    @torch.inference_mode()
    def score(self, removed: Sequence[Unit], candidates: Sequence[Unit], *, previous: Sequence = (),
              on_candidate: Callable[[Unit, float], None] | None = None, **_: Any) -> list:
        """Every candidate's mean answer NLL, in the order of ``candidates`` (all scored completely)."""
        from finercut.search import CandidateScore

        scores = []
        for unit in candidates:
            value = check_finite(self.plain_objective([*removed, unit]), unit, self.context.model.dtype)
            scores.append(CandidateScore(unit, value, samples=len(self.examples)))
            if on_candidate:
                on_candidate(unit, value)
        return scores

    @torch.inference_mode()
    def plain_objective(self, removed: Sequence[Unit]) -> float:
        """The mean answer NLL of the model without ``removed``, from its own forward on each example."""
        model, adapter = self.context.model, self.context.adapter
        sums = []
        with masked(model, adapter, list(removed)):
            for example in self.examples:
                with self.context.work.timed("blocks"):
                    logits = model(input_ids=example.input_ids.to(input_device(model)), use_cache=False).logits
                answer = logits[0, example.answer_start : example.answer_start + len(example.continuation_ids)]
                sums.append(nll_sum(answer, example.answer_ids))
        return math.fsum(sums) / len(self.examples)


def task_scorer(context: ScoringContext, examples: Sequence[AnswerExample], *, scorer: str = "fast",
                exhaustive: bool = False, **options: Any) -> Any:
    """The scorer of a task objective: ``fast`` (replay and early abort on the answer NLL) or ``naive``."""
    if scorer == "naive":
        return NaiveTaskScorer(context, examples)
    from finercut.scoring.replay import FastScorer

    return FastScorer(context, exhaustive=exhaustive, objective=TaskObjective(context, examples), **options)


class ObjectiveCost:
    """An :class:`~finercut.scoring.replay.Objective`'s score as a Shapley cost, with the interface of
    :class:`finercut.importance.ModelCost` (``cost``, ``walk``, ``evaluations``) plus ``empty_cost``, the score of
    the unpruned model (the game's ``d({})``, not 0 as for a distance).

    Args:
        objective: the fast form, read from the last block's output along a walk.
        plain: the plain form, removed units -> score from the masked model's own forward (e.g.
            :meth:`NaiveTaskScorer.plain_objective`); :meth:`walk` equals it along every order.
    """

    def __init__(self, context: ScoringContext, objective: Any, plain: Callable[[Sequence[Unit]], float]) -> None:
        self.context, self.objective, self.plain = context, objective, plain
        self.evaluations = 0
        self._empty_cost: float | None = None

    @property
    def empty_cost(self) -> float:
        if self._empty_cost is None:
            self._empty_cost = self.cost(())
        return self._empty_cost

    def cost(self, removed: Sequence[Unit]) -> float:
        """The plain form, for one coalition."""
        self.evaluations += 1
        return self.plain(list(removed))

    def walk(self, order: Sequence[Unit]) -> Iterator[float]:
        """The score after each successive removal along ``order``, replaying only the blocks from the newly
        removed unit on."""
        context = self.context
        blocks = context.adapter.blocks_of(context.model)
        states = [self._dense_states(batch) for batch in context.batches]
        removed: list[Unit] = []
        for unit in order:
            removed.append(unit)
            with torch.inference_mode(), masked(context.model, context.adapter, removed):
                for batch, state in zip(context.batches, states):
                    for index in range(unit.block, len(blocks)):
                        state[index + 1] = run_block(blocks[index], state[index], batch.block_calls[index])
                sums = [self.objective.batch_sum(b, state[-1]) for b, state in enumerate(states)]
            self.evaluations += 1
            yield self.objective.score_of(math.fsum(sums) / self.objective.num_positions)

    @torch.inference_mode()
    def _dense_states(self, batch: Any) -> list[torch.Tensor]:
        """Every block's input on ``batch`` in the original model, then the last block's output (``L + 1``)."""
        states = [batch.first_block_input]
        for index, block in enumerate(self.context.adapter.blocks_of(self.context.model)):
            states.append(run_block(block, states[-1], batch.block_calls[index]))
        return states


def task_shapley(
    context: ScoringContext, examples: Sequence[AnswerExample], units: Sequence[Unit], *, permutations: int,
    seed: int = 0, truncation: float | None = None,
) -> ShapleyEstimate:
    """Shapley values of ``units`` on the task objective: each unit's mean increase of the answer NLL when it is
    removed, over random orders of removal (:func:`finercut.importance.permutation_shapley`)."""
    from finercut.importance import permutation_shapley

    cost = ObjectiveCost(context, TaskObjective(context, examples), NaiveTaskScorer(context, examples).plain_objective)
    full_cost = cost.cost(units) if truncation is not None else None
    return permutation_shapley(units, cost.walk, permutations=permutations, seed=seed, truncation=truncation,
                               empty_cost=cost.empty_cost, full_cost=full_cost)
