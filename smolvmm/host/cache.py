"""Where smolvmm keeps what it builds and fetches: ``${XDG_CACHE_HOME:-~/.cache}/smolvmm``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/smolvmm`` (``~/.cache/smolvmm`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "smolvmm"
