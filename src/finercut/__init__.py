"""finercut: fine-grained layer pruning of decoder-only LLMs (FinerCut, arXiv 2405.18218).

Every attention and every FFN sub-layer of every decoder block is a pruning candidate; a greedy search removes,
one at a time, the one whose removal moves the model's next-token distribution least from the original's.

    import finercut
    result = finercut.prune(model, tokenizer, ratio=0.25, data_dir="data")   # find what to remove
    finercut.apply_removal(model, result.removed)                            # physically remove it
    finercut.save_pruned(model, "pruned", tokenizer=tokenizer)               # reloads with load_pruned or
                                                                             # transformers, trust_remote_code=True
"""

from finercut.version import __version__  # noqa: E402, F401

from finercut.adapters import ADAPTERS, adapter_for, supported_model_types  # noqa: E402
from finercut.candidates import Unit  # noqa: E402
from finercut.checkpoint import (  # noqa: E402
    CheckpointMismatchError,
    SizeReport,
    apply_removal,
    load_pruned,
    load_pruned_tokenizer,
    parameter_stats,
    save_pruned,
)
from finercut.distances import METRICS  # noqa: E402
from finercut.masking import masked  # noqa: E402
from finercut.materialize import RecoveryOptions, pruned_from_record, write_pruned_folder  # noqa: E402
from finercut.methods import Method, register, registered  # noqa: E402
from finercut.record import Record, RunConfig, read_record  # noqa: E402
from finercut.recovery import RecoveryResult, recover  # noqa: E402
from finercut.run import PruneResult, prune, run_in_folder  # noqa: E402

__all__ = [
    "ADAPTERS",
    "CheckpointMismatchError",
    "SizeReport",
    "apply_removal",
    "load_pruned",
    "load_pruned_tokenizer",
    "parameter_stats",
    "save_pruned",
    "METRICS",
    "Method",
    "PruneResult",
    "Record",
    "RecoveryOptions",
    "RecoveryResult",
    "RunConfig",
    "Unit",
    "adapter_for",
    "masked",
    "prune",
    "pruned_from_record",
    "read_record",
    "recover",
    "register",
    "registered",
    "run_in_folder",
    "supported_model_types",
    "write_pruned_folder",
]
