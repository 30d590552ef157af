"""BlockPruner baseline: the greedy search scored by calibration perplexity; its fast path (replay, replay states,
exact early abort on the NLL bound) selects what the plain forward per candidate selects."""

from __future__ import annotations

import json
import math

import pytest
import torch

from finercut import prune
from finercut.adapters import adapter_for
from finercut.methods.blockpruner import NaivePerplexityScorer, mean_next_token_nll, perplexity_scorer
from finercut.candidates import BLOCK, Unit, all_units
from finercut.distances import metric_named
from finercut.pruned_modeling import ATTENTION, FFN
from finercut.scoring import ScoringContext
from finercut.search import greedy_search
from tiny_models import tiny_input_ids, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_next_token_nll_by_hand():
    # Two positions of a 2-token vocabulary: position 0 predicts token 1 with p = e / (1 + e), the last position
    # predicts nothing.
    logits = torch.tensor([[[0.0, 1.0], [5.0, 0.0]]])
    total, count = mean_next_token_nll(logits, torch.tensor([[0, 1]]))
    assert count == 1 and total == pytest.approx(-math.log(math.e / (1 + math.e)))


def context_of(model, samples: int = 3, batch_size: int = 1) -> ScoringContext:
    return ScoringContext.build(model, adapter_for(model), metric_named("js"), tiny_input_ids(samples=samples),
                                batch_size=batch_size)


def test_replayed_candidates_equal_the_plain_forward():
    context = context_of(tiny_model("llama", dtype=torch.float64), batch_size=2)
    removed = [Unit(1, FFN)]
    candidates = [Unit(0, ATTENTION), Unit(2, FFN), Unit(3, ATTENTION)]
    scored = perplexity_scorer(context, exhaustive=True).score(removed, candidates)
    plain = NaivePerplexityScorer(context)
    for score, candidate in zip(scored, candidates):
        assert score.unit == candidate and score.samples == 3
        assert score.distance == pytest.approx(plain.plain_perplexity([*removed, candidate]), rel=1e-10)


def blockpruner_search(model, *, scorer: str, exhaustive: bool = False, target: int = 4, samples: int = 5):
    context = context_of(model, samples=samples)
    try:
        return greedy_search(perplexity_scorer(context, scorer=scorer, exhaustive=exhaustive), num_blocks=4,
                             granularity="sublayer", target=target, window_until_ratio=0.0, window_first_block=0)
    finally:
        context.close()


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt_neox"])
def test_early_abort_selects_what_the_plain_forward_selects(name):
    model = tiny_model(name, dtype=torch.float64, seed=3)
    fast = blockpruner_search(model, scorer="fast")
    full = blockpruner_search(model, scorer="fast", exhaustive=True)
    naive = blockpruner_search(model, scorer="naive")
    assert [s.unit for s in fast] == [s.unit for s in full] == [s.unit for s in naive]
    assert [s.distance for s in fast] == [s.distance for s in full]  # the same sums, fsum-ed, exp-ed
    assert [s.distance for s in fast] == pytest.approx([s.distance for s in naive], rel=1e-10)
    for fast_step, full_step in zip(fast, full):
        for a, b in zip(fast_step.candidates, full_step.candidates):
            if a.aborted:  # a bound of the perplexity, above the step's winner
                assert fast_step.distance < a.lower_bound <= b.distance
            else:
                assert a.distance == b.distance
    assert sum(s.samples_evaluated for s in fast) <= sum(s.samples_evaluated for s in full)


def test_prune_with_blockpruner_removes_the_lowest_perplexity_candidate_first():
    model = tiny_model("llama")
    result = prune(model, input_ids=tiny_input_ids(), method="blockpruner", count=2, progress=False)
    first = result.steps[0]
    assert first.window_first_block == 0 and len(first.candidates) == 8  # every sub-layer, no window
    best_unit, _ = min((tuple(c) for c in first.candidates), key=lambda c: (c[1], c[0].sort_key))
    assert first.unit == best_unit and result.record.method == "blockpruner"
    blocks = prune(model, input_ids=tiny_input_ids(), method="blockpruner", granularity="block", count=1,
                   progress=False)
    assert blocks.removed[0].kind == BLOCK
    assert len(all_units(4, "sublayer")) == 8


def test_metric_ppl_is_blockpruner():
    from finercut.errors import ConfigError
    from finercut.record import RunConfig

    alias = RunConfig(metric="ppl", ratio=0.25)
    assert (alias.method, alias.metric, alias.granularity) == ("blockpruner", "ppl", "sublayer")
    assert RunConfig(method="blockpruner", ratio=0.25) == alias
    # A run saved before the alias existed holds BlockPruner with the default js: it reads back as the same run.
    assert RunConfig.from_dict({**alias.to_dict(), "metric": "js"}) == alias
    with pytest.raises(ConfigError, match="method blockpruner .* not .* angular"):
        RunConfig(method="blockpruner", metric="angular", ratio=0.25)
    with pytest.raises(ConfigError, match="works with method blockpruner .* not shapley"):
        RunConfig(method="shapley", metric="ppl", ratio=0.25)


def test_cli_metric_ppl_runs_the_blockpruner_search(tmp_path, tiny_model_dir, word_text):
    from finercut.cli import main

    records = {}
    for name, option in (("alias", ["--metric", "ppl"]), ("method", ["--method", "blockpruner"])):
        output = tmp_path / name
        assert main(["prune", "--model", str(tiny_model_dir), "--calibration", str(word_text), "--samples", "2",
                     "--seq-len", "12", "--threads", "1", "--no-progress", "--no-save-model", "--count", "2",
                     "--output", str(output), *option]) == 0
        records[name] = json.loads((output / "record.json").read_text())
    alias, method = records["alias"], records["method"]
    assert (alias["method"], alias["metric"]) == ("blockpruner", "ppl")
    assert alias["removed"] == method["removed"]
    assert [s["distance"] for s in alias["steps"]] == [s["distance"] for s in method["steps"]]
