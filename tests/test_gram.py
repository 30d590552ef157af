"""Which distance path the fast scorer takes: the vocabulary-free Gram form where the head allows it, the full
head otherwise (bias, Gemma 2 final soft-capping), and both equal the naive scorer's plain distances."""

import pytest
import torch
from tiny_models import LAYERS, VOCAB, tiny_input_ids, tiny_model

import finercut
from finercut.adapters import adapter_for
from finercut.distances import metric_named
from finercut.scoring import FastScorer, NaiveScorer, ScoringContext, gram_applies
from finercut.search import greedy_search


def with_biased_head(model):
    model.lm_head.bias = torch.nn.Parameter(0.1 * torch.randn(VOCAB, dtype=model.dtype))
    return model


def scored(model, scorer_class, metric):
    context = ScoringContext.build(model, adapter_for(model), metric_named(metric), tiny_input_ids(), batch_size=1)
    try:
        scorer = scorer_class(context, exhaustive=True)
        steps = greedy_search(scorer, num_blocks=LAYERS, granularity="sublayer", target=3, window_until_ratio=0.4,
                              window_first_block=2)
        return steps, getattr(scorer, "distance_path", None)
    finally:
        context.close()


@pytest.mark.parametrize("name, biased, path", [
    ("llama", False, "gram"),
    ("gpt2", False, "gram"),  # tied embeddings: the head's weight is the embedding matrix
    ("qwen2", True, "full_head"),  # a head with a bias
    ("gemma2", False, "full_head"),  # final-logit soft-capping
])
@pytest.mark.parametrize("metric", ["angular", "euclidean"])
def test_fast_takes_the_right_path_and_equals_the_plain_distances(name, biased, path, metric):
    model = tiny_model(name, dtype=torch.float64)
    if biased:
        with_biased_head(model)
    fast, fast_path = scored(model, FastScorer, metric)
    naive, _ = scored(model, NaiveScorer, metric)
    assert fast_path == path
    assert [s.unit for s in fast] == [s.unit for s in naive]
    for fast_step, naive_step in zip(fast, naive):
        got = torch.tensor([c.distance for c in fast_step.candidates], dtype=torch.float64)
        expected = torch.tensor([c.distance for c in naive_step.candidates], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=0.0)


def test_js_never_takes_the_gram_path():
    model = tiny_model("llama", dtype=torch.float64)
    context = ScoringContext.build(model, adapter_for(model), metric_named("js"), tiny_input_ids(), batch_size=1)
    assert not gram_applies(context) and FastScorer(context).distance_path == "full_head"
    context.close()


def test_the_adapter_gives_the_head_weight_only_for_a_plain_linear_head():
    llama = tiny_model("llama")
    assert adapter_for(llama).linear_head_weight(llama) is llama.lm_head.weight
    gpt2 = tiny_model("gpt2")
    assert adapter_for(gpt2).linear_head_weight(gpt2) is gpt2.transformer.wte.weight  # tied
    assert adapter_for(tiny_model("gemma2")).linear_head_weight(tiny_model("gemma2")) is None
    biased = with_biased_head(tiny_model("qwen2"))
    assert adapter_for(biased).linear_head_weight(biased) is None


def test_the_record_says_which_path_ran():
    gpt2 = tiny_model("gpt2")
    record = finercut.prune(gpt2, input_ids=tiny_input_ids(), ratio=0.25, metric="angular",
                            progress=False).record.to_dict()
    assert record["scoring"]["distance_path"] == "gram" and record["scoring"]["early_abort"]
    gemma2 = tiny_model("gemma2")
    record = finercut.prune(gemma2, input_ids=tiny_input_ids(), ratio=0.25, metric="angular", exhaustive=True,
                            progress=False).record.to_dict()
    assert record["scoring"]["distance_path"] == "full_head" and not record["scoring"]["early_abort"]
    assert all(c["distance"] is not None and c["samples"] == 3 for s in record["steps"] for c in s["candidates"])
