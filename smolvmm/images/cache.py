"""The image cache under ``${XDG_CACHE_HOME:-~/.cache}/smolvmm``: keyed by inputs, filled atomically."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

_IMAGES_PACKAGE = Path(__file__).parent


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/smolvmm`` (``~/.cache/smolvmm`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "smolvmm"


def cache_key(inputs: Iterable[str], sources: Iterable[Path]) -> str:
    """A short hash of ``inputs`` (e.g. package versions) and the builder's source files.

    The images package's own sources always count, so editing the builder rebuilds.
    """
    digest = hashlib.sha256()
    for item in inputs:
        digest.update(item.encode() + b"\0")
    for path in sorted({*_IMAGES_PACKAGE.glob("*.py"), *sources}):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cached_build(name: str, key: str, build: Callable[[Path], None]) -> Path:
    """The directory ``images/<name>-<key>``, made by ``build(tmpdir)`` and renamed into place if absent.

    A crash leaves only a dot-prefixed temp dir behind, never a half-built entry.
    """
    images = cache_root() / "images"
    final = images / f"{name}-{key}"
    if final.is_dir():
        return final
    import shutil
    import tempfile
    images.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=images, prefix=f".{name}-"))
    try:
        build(tmp)
        tmp.chmod(0o755)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def cached_file(path: Path, write: Callable[[Path], None]) -> Path:
    """The read-only file ``path``, made by ``write(tmp)`` and renamed into place if absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            write(partial)
            os.chmod(partial, 0o444)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return path
