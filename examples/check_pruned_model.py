"""Check a finished run's pruned model the way a user would: reload it both ways, compare, generate, measure.

    python examples/check_pruned_model.py runs/smollm2-25 --data-dir ../shared/data

1. loads ``RUN/model`` with ``finercut.load_pruned`` and with ``transformers`` (``trust_remote_code=True``) and
   checks both give the same logits; shows that a plain ``from_pretrained`` refuses the folder;
2. prints parameters and weight bytes before / after;
3. greedy generations of the dense and the pruned model side by side;
4. WikiText-2 test perplexity (first 40 windows of 256 tokens) of the dense and the pruned model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import finercut
from finercut.evaluation import windowed_perplexity
from finercut.evaluation.stats import greedy_samples
from finercut.modelio import load_model, load_tokenizer, resolve_model_source
from finercut.record import read_run_config

PROMPTS = (
    "The capital of France is",
    "In 1969, the first humans to walk on the Moon",
    "The best way to learn a new programming language is",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run folder written by `finercut prune`")
    parser.add_argument("--data-dir", help="local data folder for the perplexity (default: FINERCUT_DATA_DIR / hub)")
    parser.add_argument("--windows", type=int, default=40, help="perplexity windows of 256 tokens")
    args = parser.parse_args()
    folder = args.run / "model"
    config = read_run_config(args.run / "run.json")
    torch.set_num_threads(config.threads)

    print(f"== reloading {folder}")
    pruned = finercut.load_pruned(folder)
    tokenizer = finercut.load_pruned_tokenizer(folder)
    remote = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = tokenizer("Pruning removes whole sub-layers of a language model.", return_tensors="pt").input_ids
    with torch.inference_mode():
        same = torch.equal(pruned(ids).logits, remote(ids).logits)
    print(f"finercut.load_pruned and from_pretrained(trust_remote_code=True) give identical logits: {same}")
    try:
        # Without trust_remote_code transformers builds the dense class, which finds no model.safetensors (the
        # pruned weights are the finercut variant) and refuses rather than fill the removed sub-layers at random.
        AutoModelForCausalLM.from_pretrained(folder)
        print("plain from_pretrained loaded the folder (unexpected)")
    except (OSError, ValueError) as error:  # ValueError: a folder of finercut before weights variants
        print(f"plain from_pretrained refuses the folder: {type(error).__name__}: {str(error).splitlines()[0][:150]}")

    summary = json.loads((folder / "pruning.json").read_text())
    sizes = summary["size"]
    before, after = sizes["before"]["parameters"], sizes["after"]["parameters"]
    print(f"\n== sizes\nparameters {sum(before.values()):,} -> {sum(after.values()):,} "
          f"(removed {sizes['removed_parameters']:,}); weight bytes removed {sizes['removed_bytes']:,}; "
          f"saved weight files {sizes['weight_file_bytes']:,} bytes")

    dense, _ = load_model(resolve_model_source(config.model, config.revision), dtype=config.dtype, device="cpu")
    dense_tokenizer = load_tokenizer(resolve_model_source(config.model, config.revision))
    print("\n== greedy generations (dense | pruned)")
    for prompt, dense_text, pruned_text in zip(PROMPTS, greedy_samples(dense, dense_tokenizer, PROMPTS),
                                               greedy_samples(pruned, tokenizer, PROMPTS)):
        print(f"prompt: {prompt!r}\n  dense : {dense_text.strip()!r}\n  pruned: {pruned_text.strip()!r}")

    print(f"\n== WikiText-2 test perplexity, first {args.windows} windows of 256 tokens")
    for name, model in (("dense", dense), ("pruned", pruned)):
        result = windowed_perplexity(model, tokenizer, data_dir=args.data_dir, window_length=256,
                                     max_windows=args.windows)
        print(f"{name:7s} {result.ppl:.3f}")


if __name__ == "__main__":
    main()
