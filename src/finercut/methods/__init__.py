"""Pruning methods: one module per method, and the registry that maps names to them.

Everything that differs between methods is declared by the method (:class:`finercut.methods.base.Method`); the
run pipeline, the command line, ``compare`` and ``show`` read those declarations from here and never test a
method's name. Adding a method is one new module and one line in :data:`BUILTIN` (or, from outside the package,
one call of :func:`register`).
"""

from __future__ import annotations

from finercut.errors import ConfigError
from finercut.methods.base import (
    DISTANCE,
    GREEDY,
    ONE_SHOT,
    PER_TARGET,
    PERPLEXITY,
    PERPLEXITY_METRIC,
    SEARCH,
    CompareEntry,
    Method,
    NoOptions,
    OneShotMethod,
    Ranking,
    Selecting,
    option,
)
from finercut.methods.beam import Beam
from finercut.methods.blockpruner import BlockPruner
from finercut.methods.deeper_layers import DeeperLayers
from finercut.methods.evopress import EvoPress
from finercut.methods.finercut import FinerCut
from finercut.methods.random_removal import RandomRemoval
from finercut.methods.shapley import Shapley
from finercut.methods.shortgpt import ShortGPT
from finercut.methods.swap import Swap

BUILTIN: tuple[Method, ...] = (FinerCut(), ShortGPT(), DeeperLayers(), RandomRemoval(), Shapley(), BlockPruner(),
                               Beam(), Swap(), EvoPress())
"""The methods finercut ships, in the order the command line lists them (the first is the default)."""

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` available by its name to the library, the command line and ``compare``."""
    if not getattr(method, "name", None):
        raise ValueError("a method needs a name")
    taken = {entry.name for known in _REGISTRY.values() for entry in known.compare_entries if known is not method}
    clash = [entry.name for entry in method.compare_entries if entry.name in taken]
    if clash:
        raise ValueError(f"compare entries {clash} of method {method.name} are another method's")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method registered with :func:`register` (the built-in ones stay)."""
    if name in {method.name for method in BUILTIN}:
        raise ValueError(f"{name} is a built-in method")
    _REGISTRY.pop(name, None)


def registered() -> dict[str, Method]:
    """Name -> method, in registration order."""
    return dict(_REGISTRY)


def method_named(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def method_for_metric(metric: str) -> Method | None:
    """The method a ``metric`` value selects by itself (``ppl``: BlockPruner), if any."""
    return next((method for method in _REGISTRY.values() if method.metric_alias == metric), None)


def compare_entries() -> dict[str, tuple[Method, CompareEntry]]:
    """Every ``finercut compare --methods`` entry: name -> (method, entry)."""
    return {entry.name: (method, entry) for method in _REGISTRY.values() for entry in method.compare_entries}


for _method in BUILTIN:
    register(_method)

__all__ = [
    "BUILTIN", "DISTANCE", "GREEDY", "ONE_SHOT", "PER_TARGET", "PERPLEXITY", "PERPLEXITY_METRIC", "SEARCH",
    "CompareEntry", "Method", "NoOptions", "OneShotMethod", "Ranking", "Selecting", "compare_entries",
    "method_for_metric", "method_named", "option", "register", "registered", "unregister",
]
