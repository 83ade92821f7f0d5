"""Temporary names that carry the creating process's id, so that a later run removes what a killed one
left behind (a ``kill -9`` runs no cleanup) and never touches what a running one is writing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def owned_prefix(stem: str) -> str:
    """``stem.PID.``: the prefix for this process's temporary names beginning with ``stem``."""
    return f"{stem}.{os.getpid()}."


def remove_stale(directory: str | os.PathLike[str], stem: str) -> list[Path]:
    """Remove the entries ``stem.PID.*`` of ``directory`` whose process no longer runs; returns them."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        pid_text, dot, _ = entry.name.removeprefix(f"{stem}.").partition(".")
        if not entry.name.startswith(f"{stem}.") or not dot or not pid_text.isdigit() or running(int(pid_text)):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def running(pid: int) -> bool:
    """Whether process ``pid`` still runs (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
