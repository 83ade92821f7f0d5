"""This user's runtime directory: where running machines list themselves and the helper listens.

``$XDG_RUNTIME_DIR/smolvmm/``, else ``smolvmm-UID/`` in ``$TMPDIR`` (default ``/tmp``), private (0700).
Light on purpose: the helper's client, which every ``run`` starts as, finds its socket here.
"""

from __future__ import annotations

import os
import stat

import smolvmm

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing, for the hand-off client
if TYPE_CHECKING:
    from pathlib import Path


def runtime_location() -> str:
    """Where this user's runtime directory is (whether or not it exists)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "smolvmm")
    return os.path.join(os.environ.get("TMPDIR") or "/tmp", f"smolvmm-{os.getuid()}")


def is_private(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory of this user's that no one else may read or write."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077


def runtime_dir() -> Path:
    """This user's runtime directory, created private if absent (SmolvmmError if it is not private)."""
    from pathlib import Path  # the hand-off client, which every ``run`` starts as, does without

    path = Path(runtime_location())
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise smolvmm.SmolvmmError(
            f"cannot make the runtime directory {path}: {exc.strerror}; set XDG_RUNTIME_DIR"
        ) from None
    if not is_private(path):
        raise smolvmm.SmolvmmError(f"{path} is not a private directory of yours: remove it, or set XDG_RUNTIME_DIR")
    return path
