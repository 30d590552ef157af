"""Masking: run a dense model as if some sub-layers were removed, and put everything back afterwards."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

from torch import nn

from finercut.adapters import ArchitectureAdapter
from finercut.candidates import Unit, removed_sublayers
from finercut.pruned_modeling import is_removed, restore_modules, stub_sublayer


@contextmanager
def masked(model: nn.Module, adapter: ArchitectureAdapter, units: Iterable[Unit]) -> Iterator[nn.Module]:
    """Within the context, ``model`` behaves as if ``units`` were removed (their residual term is zero).

    The removed sub-layers are swapped for the same parameter-free stand-ins a physically pruned model holds,
    so a masked model and the pruned model run identical code. Sub-layers already masked are left alone, so
    contexts nest.
    """
    blocks = adapter.blocks_of(model)
    names = adapter.module_names()
    replaced = []
    try:
        for sublayer in removed_sublayers(units):
            block = blocks[sublayer.block]
            if not is_removed(block, sublayer.kind, names):
                replaced.append((block, stub_sublayer(block, sublayer.kind, names)))
        yield model
    finally:
        for block, originals in reversed(replaced):
            restore_modules(block, originals)
