"""A pruning method has one home: a toy method written here, in one module of the test suite, registered once,
runs end to end through the command line (``prune``, ``show``, ``apply``) and ``compare`` with no other file
changed. And what the registry declares is what the run pipeline, the CLI and compare do."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from finercut import cli
from finercut.candidates import Unit
from finercut.errors import ConfigError
from finercut.methods import (
    GREEDY, ONE_SHOT, PER_TARGET, SEARCH, CompareEntry, OneShotMethod, Ranking, Selecting, compare_entries,
    method_named,
    option, register, registered, unregister,
)
from finercut.record import RunConfig, read_record


@dataclass(frozen=True)
class LastFirstOptions:
    offset: int = option(0, flag="--toy-offset", minimum=0, help="start this many units before the last one")


class LastFirst(OneShotMethod):
    """A toy method: removes the units from the last one backwards, starting ``offset`` units earlier."""

    name = "toy_last_first"
    label = "Toy (last first)"
    description = "a toy: the last units first"
    objective = None
    options = LastFirstOptions
    compare_entries = (CompareEntry("toy_last_first", "Toy (last first)", "sublayer"),)

    def rank(self, request: Selecting) -> Ranking:
        backwards = sorted(request.units, key=lambda unit: unit.sort_key, reverse=True)
        order = backwards[request.options.offset:] + backwards[: request.options.offset]
        return Ranking(tuple(order), {unit: float(i) for i, unit in enumerate(order)}, 0.0, 0)

    def describe(self, record) -> list[str]:
        return [f"toy ranking, offset {record.config.options.offset}"]


@pytest.fixture
def toy():
    method = register(LastFirst())
    yield method
    unregister(method.name)


def prune_args(model_dir, text, output, *extra: str) -> list[str]:
    return ["prune", "--model", str(model_dir), "--calibration", str(text), "--samples", "2", "--seq-len", "12",
            "--threads", "1", "--no-progress", "--output", str(output), *extra]


def test_a_toy_method_in_one_module_runs_through_prune_show_apply_and_compare(
        toy, tmp_path, tiny_model_dir, word_text, data_dir, capsys, one_thread):
    from finercut.checkpoint import load_pruned
    from finercut.study.compare import CompareConfig, run_compare

    run = tmp_path / "run"
    assert cli.main(prune_args(tiny_model_dir, word_text, run, "--method", "toy_last_first", "--toy-offset", "1",
                               "--count", "3")) == 0
    record = read_record(run)
    # 4 blocks: 3.ffn 3.attn 2.ffn 2.attn ...; offset 1 starts at 3.attn
    assert record.removed == [Unit(3, "attention"), Unit(2, "ffn"), Unit(2, "attention")]
    assert record.method == "toy_last_first" and record.config.options.offset == 1 and record.metric is None
    capsys.readouterr()

    assert cli.main(["show", str(run)]) == 0
    shown = capsys.readouterr().out
    assert "method: toy_last_first" in shown and "toy ranking, offset 1" in shown

    model_dir = tmp_path / "pruned"
    assert cli.main(["apply", str(run), "--count", "2", "--output", str(model_dir)]) == 0
    pruned = load_pruned(model_dir)
    assert {Unit.from_dict(u) for u in pruned.config.finercut["removed"]} == {Unit(3, "attention"), Unit(2, "ffn")}

    # another method's option is refused before anything runs
    assert cli.main(prune_args(tiny_model_dir, word_text, tmp_path / "other", "--toy-offset", "1")) == 2
    assert "--toy-offset is an option of method toy_last_first, not finercut" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()

    config = CompareConfig(
        model=str(tiny_model_dir), methods=("toy_last_first",), ratios=(0.0, 0.25), data_dir=str(data_dir),
        calibration=str(word_text), num_samples=2, seq_len=12, threads=1, tasks=("arc_easy",), limit=2,
        mmlu_limit_per_subject=None, ppl_window=32, ppl_max_windows=1, lm_eval_wikitext_docs=1, eval_batch_size=2,
        stats_context=16, prompts=("w1 w2",), method_options={"toy_last_first": {"offset": 2}})
    report = run_compare(config, tmp_path / "compare", report=tmp_path / "results.md", log=lambda m: None,
                         progress=False).read_text()
    assert "| Toy (last first) | 25% | 25.0% | 2 |" in report
    compared = read_record(tmp_path / "compare" / "runs" / "toy_last_first")
    assert compared.config.options.offset == 2 and compared.removed == [Unit(2, "ffn"), Unit(2, "attention")]


def test_the_registry_declares_what_each_builtin_method_is():
    facts = {name: (m.selection, m.objective, m.granularities, m.supports_only, m.cost_targets, m.window)
             for name, m in registered().items()}
    assert facts == {
        "finercut": (GREEDY, "distance", ("sublayer", "block"), True, True, True),
        "shortgpt": (ONE_SHOT, None, ("block",), False, False, False),
        "deeper_layers": (PER_TARGET, None, ("block",), False, False, False),
        "random": (ONE_SHOT, None, ("sublayer", "block"), True, False, False),
        "shapley": (ONE_SHOT, "distance", ("sublayer", "block"), True, False, False),
        "blockpruner": (GREEDY, "perplexity", ("sublayer", "block"), True, False, False),
        "beam": (SEARCH, "distance", ("sublayer", "block"), True, False, True),
        "swap": (SEARCH, "distance", ("sublayer", "block"), True, False, True),
        "evopress": (SEARCH, "distance", ("sublayer", "block"), True, False, True),
    }
    assert set(compare_entries()) == {"finercut", "finercut_block", "finercut_attention", "finercut_ffn", "shortgpt",
                                      "deeper_layers", "random", "shapley", "shapley_block", "blockpruner", "beam",
                                      "swap", "evopress"}
    assert [e.name for _, e in compare_entries().values() if e.primary] == ["finercut"]


def test_run_config_checks_follow_the_declarations(toy):
    with pytest.raises(ConfigError, match="method shortgpt removes whole blocks"):
        RunConfig(method="shortgpt", granularity="sublayer", ratio=0.25)
    with pytest.raises(ConfigError, match="only=attention needs .* not deeper_layers"):
        RunConfig(method="deeper_layers", only="attention", ratio=0.25)
    with pytest.raises(ConfigError, match="needs method finercut .* not toy_last_first"):
        RunConfig(method="toy_last_first", cost_target="params", cost_fraction=0.5)
    with pytest.raises(ConfigError, match="--toy-offset must be at least 0"):
        RunConfig(method="toy_last_first", ratio=0.25, options={"offset": -1})
    with pytest.raises(ConfigError, match="has no option"):
        RunConfig(method="toy_last_first", ratio=0.25, options={"permutations": 3})
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        RunConfig(method="nope", ratio=0.25)
    assert RunConfig(method="toy_last_first", ratio=0.25).options == LastFirstOptions(0)
    # a run file of an older finercut: Shapley's settings were fields of the config
    old = {**RunConfig(method="shapley", ratio=0.25).to_dict(), "shapley_permutations": 4, "shapley_truncation": 0.1}
    del old["options"]
    assert RunConfig.from_dict(old).options == method_named("shapley").options(4, 0.1)
    finercut_old = {**RunConfig(ratio=0.25).to_dict(), "shapley_permutations": 10, "shapley_truncation": None}
    del finercut_old["options"]
    assert RunConfig.from_dict(finercut_old) == RunConfig(ratio=0.25)


@pytest.mark.parametrize("bad, message", [
    ({"ratio": "0.25"}, "ratio must be float or null"),
    ({"seed": 1.5}, "seed must be int"),
    ({"exhaustive": "yes"}, "exhaustive must be bool"),
    ({"num_samples": True}, "num_samples must be int"),
    ({"seed": 10**30}, "seed must be at most"),
    ({"replay_memory_gb": float("nan")}, "replay_memory_gb must be >= 0"),
])
def test_run_config_refuses_wrongly_typed_settings(bad, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({**RunConfig(ratio=0.25).to_dict(), **bad})
