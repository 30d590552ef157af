"""Where finercut keeps what it may recompute: converted GGUF models, offloaded weights (``FINERCUT_CACHE``)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FINERCUT_CACHE"


def cache_root() -> Path:
    """``$FINERCUT_CACHE``, else ``~/.cache/finercut``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "finercut")
