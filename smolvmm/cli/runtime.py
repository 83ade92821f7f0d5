"""This user's runtime directory: where running machines list themselves and the helper listens.

``$XDG_RUNTIME_DIR/smolvmm/``, else ``smolvmm-UID/`` in ``$TMPDIR`` (default ``/tmp``), private (0700).
Light on purpose: the helper's client, which every ``run`` starts as, finds its socket here.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import smolvmm


def runtime_path() -> Path:
    """Where this user's runtime directory is (whether or not it exists)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "smolvmm"
    return Path(os.environ.get("TMPDIR") or "/tmp") / f"smolvmm-{os.getuid()}"


def is_private(path: Path) -> bool:
    """Whether ``path`` is a directory of this user's that no one else may read or write."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077


def runtime_dir() -> Path:
    """This user's runtime directory, created private if absent (SmolvmmError if it is not private)."""
    path = runtime_path()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not is_private(path):
        raise smolvmm.SmolvmmError(f"{path} is not a private directory of yours: remove it, or set XDG_RUNTIME_DIR")
    return path
