"""Where kvblend keeps its caches on disk (models, index, chunk KV store): one root, moved by KVBLEND_CACHE_DIR."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of kvblend's caches: $KVBLEND_CACHE_DIR, else $XDG_CACHE_HOME/kvblend, else ~/.cache/kvblend."""
    root = os.environ.get("KVBLEND_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvblend"
