"""BlockPruner baseline: the greedy search scored by calibration perplexity (its fast replay == plain forward)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from finercut import prune
from finercut.adapters import adapter_for
from finercut.baselines.blockpruner import PerplexityScorer, mean_next_token_nll
from finercut.candidates import BLOCK, Unit, all_units
from finercut.distances import metric_named
from finercut.pruned_modeling import ATTENTION, FFN
from finercut.scoring import ScoringContext
from tiny_models import tiny_input_ids, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_next_token_nll_by_hand():
    # Two positions of a 2-token vocabulary: position 0 predicts token 1 with p = e / (1 + e), the last position
    # predicts nothing.
    logits = torch.tensor([[[0.0, 1.0], [5.0, 0.0]]])
    total, count = mean_next_token_nll(logits, torch.tensor([[0, 1]]))
    assert count == 1 and total == pytest.approx(-math.log(math.e / (1 + math.e)))


@pytest.fixture(scope="module")
def scorer():
    model = tiny_model("llama", dtype=torch.float64)
    context = ScoringContext.build(model, adapter_for(model), metric_named("js"), tiny_input_ids(), batch_size=2)
    return PerplexityScorer(context)


def test_replayed_candidates_equal_the_plain_forward(scorer):
    removed = [Unit(1, FFN)]
    candidates = [Unit(0, ATTENTION), Unit(2, FFN), Unit(3, ATTENTION)]
    scored = scorer.score(removed, candidates)
    for (unit, value), candidate in zip(scored, candidates):
        assert unit == candidate
        assert value == pytest.approx(scorer.plain_perplexity([*removed, candidate]), rel=1e-10)


def test_prune_with_blockpruner_removes_the_lowest_perplexity_candidate_first():
    model = tiny_model("llama")
    result = prune(model, input_ids=tiny_input_ids(), method="blockpruner", count=2, progress=False)
    first = result.steps[0]
    assert first.window_first_block == 0 and len(first.candidates) == 8  # every sub-layer, no window
    best_unit, _ = min((tuple(c) for c in first.candidates), key=lambda c: (c[1], c[0].sort_key))
    assert first.unit == best_unit and result.record["method"] == "blockpruner"
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
