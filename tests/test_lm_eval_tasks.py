"""Specification of the offline lm-eval tasks and of evaluate_tasks.

The prompt tests are the contract of the offline definitions: for each benchmark, documents in the built-in
dataset's own format are written by hand from the local rows, run through lm-eval 0.4.13's built-in task config
(its YAML, loaded here straight from the installed lm_eval package), and the requests lm-eval would send to the
model -- context and continuation strings, few-shot examples and description included -- must equal those of the
offline task, character for character.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import lm_eval.tasks
import pytest
import torch
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from finercut.calibration import DataError
from finercut.evaluation.lm_eval_bridge import AVERAGE_METRIC, PAPER_TASKS, evaluate_tasks, format_results_table
from finercut.evaluation.tasks.commonsense import capitalize_hellaswag_ctx_b, commonsense_task
from finercut.evaluation.tasks.mmlu import mmlu_subject_task, mmlu_subjects


def _data_dir() -> Path | None:
    path = Path(os.environ.get("FINERCUT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    return path if (path / "tasks").is_dir() else None


DATA_DIR = _data_dir()
pytestmark = pytest.mark.skipif(
    DATA_DIR is None, reason="offline data not found: set FINERCUT_DATA_DIR to the folder holding tasks/"
)
TASKS_DIR = DATA_DIR / "tasks" if DATA_DIR else None
NUM_COMPARED = 20  # documents per task whose prompts are compared


def local_rows(file: str) -> list[dict[str, Any]]:
    with (TASKS_DIR / file).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle][:NUM_COMPARED]


def builtin_task(yaml_path: str, docs: list[dict], *, fewshot_docs: list[dict] | None = None) -> ConfigurableTask:
    """lm-eval's built-in task from its YAML, with every split it names holding the hand-written ``docs``."""
    config = load_yaml(Path(lm_eval.tasks.__file__).parent / yaml_path, resolve_func=True)
    config.pop("tag", None)
    splits = {config.get(role) for role in ("training_split", "validation_split", "test_split")} - {None}
    dataset = datasets.DatasetDict({split: datasets.Dataset.from_list(docs) for split in splits})
    if fewshot_docs is not None:
        dataset[config["fewshot_split"]] = datasets.Dataset.from_list(fewshot_docs)
    return ConfigurableTask(config={**config, "custom_dataset": lambda **_: dataset})


def requests(task: ConfigurableTask, *, num_fewshot: int = 0, count: int = NUM_COMPARED) -> list[tuple]:
    """What lm-eval sends and scores for the first ``count`` documents: the (context, continuation) pairs, and
    each document's gold answer (``doc_to_target``; for winogrande the gold context index from ``doc_to_text``)."""
    task.set_config(key="num_fewshot", value=num_fewshot)
    task.build_all_requests(limit=count)
    docs = [task.eval_docs[i] for i in range(count)]
    golds = [(task.doc_to_text(doc) if task.multiple_input else None, task.doc_to_target(doc)) for doc in docs]
    return [instance.args for instance in task.instances] + golds


# ------------------------------------------------------------------------------------------- built-in docs by hand

LABELS = "ABCDE"


def arc_doc(row: dict) -> dict:
    labels = list(LABELS[: len(row["choices"])])
    return {
        "id": "x",
        "question": row["query"].removeprefix("Question: "),
        "choices": {"text": row["choices"], "label": labels},
        "answerKey": labels[row["gold"]],
    }


def openbookqa_doc(row: dict) -> dict:
    labels = list(LABELS[: len(row["choices"])])
    return {
        "id": "x",
        "question_stem": row["query"],
        "choices": {"text": row["choices"], "label": labels},
        "answerKey": labels[row["gold"]],
    }


def piqa_doc(row: dict) -> dict:
    goal = row["query"].removeprefix("Question: ").removesuffix("\n")
    return {"goal": goal, "sol1": row["choices"][0], "sol2": row["choices"][1], "label": row["gold"]}


def boolq_doc(row: dict) -> dict:
    passage, question = row["query"].removeprefix("Passage: ").rsplit("\nQuestion: ", 1)
    return {"passage": passage, "question": question.removesuffix("?"), "label": row["gold"], "idx": 0}


def winogrande_doc(row: dict) -> dict:
    first, second = row["context_options"]
    shared = os.path.commonprefix([first, second])
    return {
        "sentence": f"{shared}_ {row['continuation']}",
        "option1": first[len(shared) :],
        "option2": second[len(shared) :],
        "answer": str(row["gold"] + 1),
    }


# The first rows of HellaSwag's validation split (rowanz/hellaswag data/hellaswag_val.jsonl): the local export
# keeps only activity_label + ctx, so ctx_a/ctx_b cannot be recovered from it and are written out here.
HELLASWAG_VAL_HEAD = [
    ("Roof shingle removal", "A man is sitting on a roof.", "he", 3),
    ("Clean and jerk", "A lady walks to a barbell. She bends down and grabs the pole.", "the lady", 3),
    ("Canoeing", "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the "
     "water, with other individuals visible in the background.", "the child and a different man", 2),
    ("High jump", "A boy is running down a track.", "the boy", 2),
    ("High jump", "The boy lifts his body above the height of a pole. The boy lands on his back on to a red mat.",
     "the boy", 1),
    ("High jump", "The boy lands on his back on to a red mat. The boy gets up from the mat.", "the boy", 1),
    ("Playing harmonica", "A man is standing in front of a camera. He starts playing a harmonica for the camera.",
     "he", 2),
    ("Sumo", "A cartoon animation video is shown with people wandering around and rockets being shot.", "two men", 0),
    ("Sharpening knives", "A man is holding a pocket knife while sitting on some rocks in the wilderness.",
     "then he", 1),
    ("Sharpening knives", "Then he takes a small stone from the flowing river and smashes it on another stone. He "
     "starts to crush the small stone to smaller pieces.", "he", 1),
]


def hellaswag_docs() -> list[dict]:
    rows = local_rows("hellaswag.jsonl")
    return [
        {"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}",
         "endings": row["choices"], "label": str(gold)}
        for (label, ctx_a, ctx_b, gold), row in zip(HELLASWAG_VAL_HEAD, rows)
    ]


COMMONSENSE_CASES = {
    # offline task: (built-in YAML, local file, local row -> built-in doc)
    "arc_easy": ("arc/arc_easy.yaml", "arc_easy.jsonl", arc_doc),
    "arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge.jsonl", arc_doc),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbook_qa.jsonl", openbookqa_doc),
    "piqa": ("piqa/piqa.yaml", "piqa.jsonl", piqa_doc),
    "boolq": ("super_glue/boolq/default.yaml", "boolq.jsonl", boolq_doc),
    "winogrande": ("winogrande/default.yaml", "winogrande.jsonl", winogrande_doc),
}


# ------------------------------------------------------------------------------------------- prompt parity


@pytest.mark.parametrize("name", sorted(COMMONSENSE_CASES))
def test_offline_task_sends_the_builtin_tasks_requests(name):
    yaml_path, file, to_builtin_doc = COMMONSENSE_CASES[name]
    builtin = builtin_task(yaml_path, [to_builtin_doc(row) for row in local_rows(file)])
    offline = commonsense_task(name, TASKS_DIR)
    assert requests(offline) == requests(builtin)


def test_offline_hellaswag_sends_the_builtin_requests_for_the_rows_of_known_origin():
    builtin = builtin_task("hellaswag/hellaswag.yaml", hellaswag_docs())
    offline = commonsense_task("hellaswag", TASKS_DIR)
    count = len(HELLASWAG_VAL_HEAD)
    assert requests(offline, count=count) == requests(builtin, count=count)
    assert requests(offline, count=1)[0][0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert [gold for _, gold in requests(offline, count=count)[-count:]] == [row[-1] for row in HELLASWAG_VAL_HEAD]


def test_hellaswag_ctx_b_is_capitalized_like_lm_evals_process_docs():
    assert capitalize_hellaswag_ctx_b("Sharpening knives: A man is on rocks. then he") == (
        "Sharpening knives: A man is on rocks. Then he"
    )
    # WikiHow items end in a full sentence (empty ctx_b); ctx_b starting with a digit stays as it is.
    wikihow = "Home and Garden: How to clean a grill. Scrub the grates with a brush."
    assert capitalize_hellaswag_ctx_b(wikihow) == wikihow
    digit_first = "Piercing: 4 the guy cleans up. 5 the guy"
    assert capitalize_hellaswag_ctx_b(digit_first) == digit_first


def read_csv_as_builtin_docs(path: Path, subject: str) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as handle:
        return [
            {"question": row["question"], "subject": subject,
             "choices": [row[f"choice{i}"] for i in range(4)], "answer": int(row["answer"])}
            for row in csv.DictReader(handle)
        ]


def test_offline_mmlu_subjects_send_the_builtin_5_shot_requests():
    mmlu_dir = TASKS_DIR / "mmlu"
    subjects = mmlu_subjects(mmlu_dir)
    assert len(subjects) == 57
    for subject in subjects:
        builtin = builtin_task(
            f"mmlu/default/mmlu_{subject}.yaml",
            read_csv_as_builtin_docs(mmlu_dir / "test" / f"{subject}_test.csv", subject),
            fewshot_docs=read_csv_as_builtin_docs(mmlu_dir / "dev" / f"{subject}_dev.csv", subject),
        )
        offline = mmlu_subject_task(subject, mmlu_dir)
        assert requests(offline, num_fewshot=5, count=2) == requests(builtin, num_fewshot=5, count=2), subject
    context = requests(mmlu_subject_task("anatomy", mmlu_dir), num_fewshot=5, count=1)[0][0]
    assert context.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert context.count("\nAnswer:") == 6  # five solved examples and the question


def test_mmlu_answers_that_look_like_numbers_or_null_stay_strings():
    from finercut.evaluation.tasks.mmlu import read_mmlu_csv

    docs = read_mmlu_csv(TASKS_DIR / "mmlu" / "test" / "high_school_mathematics_test.csv", subject="x")
    choices = [choice for doc in docs for choice in doc["choices"]]
    assert all(isinstance(choice, str) for choice in choices)
    assert any(choice.replace(".", "").isdigit() for choice in choices)


# ------------------------------------------------------------------------------------------- evaluate_tasks


def tiny_model_and_tokenizer() -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [row["query"] for row in local_rows("arc_easy.jsonl") + local_rows("boolq.jsonl")] * 5
    backend.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=1024, special_tokens=["</s>"],
                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    config = LlamaConfig(
        vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def test_evaluate_tasks_scores_every_paper_task_offline_with_stderrs_and_versions():
    model, tokenizer = tiny_model_and_tokenizer()
    results = evaluate_tasks(model, tokenizer, data_dir=DATA_DIR, limit=2, mmlu_limit_per_subject=1, batch_size=8)

    assert list(results.scores) == list(PAPER_TASKS)
    assert results.definitions == "offline"
    assert (results.limit, results.mmlu_limit_per_subject, results.lm_eval_version) == (2, 1, "0.4.13")
    normalized = {"arc_easy", "arc_challenge", "hellaswag", "openbookqa", "piqa"}
    for name, score in results.scores.items():
        assert 0.0 <= score.acc <= 1.0
        assert (score.acc_norm is not None) == (name in normalized), name
        assert score.headline_metric == ("acc_norm" if name in normalized else "acc")
        assert score.version
        if name != "mmlu":
            assert (score.num_samples, score.num_fewshot) == (2, 0)
            assert score.acc_stderr is not None
            assert (score.acc_norm_stderr is not None) == (name in normalized)
    mmlu = results.scores["mmlu"]
    assert (mmlu.num_samples, mmlu.num_fewshot, mmlu.version) == (57, 5, "2")
    assert len(results.mmlu_subjects) == 57
    assert mmlu.acc == pytest.approx(sum(s.acc for s in results.mmlu_subjects.values()) / 57)  # equal sizes
    assert results.average == pytest.approx(sum(s.headline for s in results.scores.values()) / 8)
    assert results.average_acc == pytest.approx(sum(s.acc for s in results.scores.values()) / 8)

    table = format_results_table(results)
    for name in PAPER_TASKS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert row.count("±") == (2 if name in normalized else 1), row
    assert AVERAGE_METRIC in table and "offline" in table


def test_mmlu_limit_defaults_to_the_per_task_limit():
    model, tokenizer = tiny_model_and_tokenizer()
    results = evaluate_tasks(model, tokenizer, tasks=["winogrande", "mmlu"], data_dir=DATA_DIR, limit=1, batch_size=8)
    assert results.scores["winogrande"].num_samples == 1
    assert results.scores["mmlu"].num_samples == 57
    assert results.mmlu_limit_per_subject == 1


def test_unknown_task_names_fail_early_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown task.*'mmlu_pro'.*known tasks: boolq, piqa"):
        evaluate_tasks(torch.nn.Linear(1, 1), None, tasks=["boolq", "mmlu_pro"], data_dir=DATA_DIR)


def test_missing_task_files_say_what_to_pass(tmp_path):
    (tmp_path / "tasks").mkdir()
    model, tokenizer = tiny_model_and_tokenizer()
    with pytest.raises(FileNotFoundError, match="boolq.jsonl.*data_dir=.*FINERCUT_DATA_DIR"):
        evaluate_tasks(model, tokenizer, tasks=["boolq"], data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="MMLU.*57 subjects.*data_dir="):
        evaluate_tasks(model, tokenizer, tasks=["mmlu"], data_dir=tmp_path)


def test_without_a_data_dir_the_builtin_tasks_are_used_and_never_replaced_by_local_files(monkeypatch, offline_hub):
    monkeypatch.delenv("FINERCUT_DATA_DIR", raising=False)
    model, tokenizer = tiny_model_and_tokenizer()
    # Offline (offline_hub), so lm-eval's built-in boolq cannot fetch its hub dataset.
    with pytest.raises(DataError, match="built-in tasks.*hub.*data_dir="):
        evaluate_tasks(model, tokenizer, tasks=["boolq"], limit=1)
