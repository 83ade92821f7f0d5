"""The image cache under ``${XDG_CACHE_HOME:-~/.cache}/smolvmm``: keyed by inputs, filled atomically."""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from smolvmm.config import cache_root

_IMAGES_PACKAGE = Path(__file__).parent


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


# What `smolvmm cache` knows of each top-level directory: how its entries are named and when one is stale.
_SUPERSEDED_BY_NAME = {  # one current entry per name: the newest; older ones had other inputs
    "images": r"(?P<name>.+)-[0-9a-f]{16}",
    "debs": r"(?P<name>[^_]+)_.+\.deb",
    "debs-arm64": r"(?P<name>[^_]+)_.+\.deb",
    "ffi": r"(?P<name>_smolvmm_ffi_.+)_[0-9a-f]{16}\.py",
}
_PER_BUNDLE = ("bundle-disks", "bundle-boot")  # keyed by a bundle's digest: stale once unused for a while
UNUSED_DAYS = 7  # `smolvmm cache prune --help` says "a week"
_PARTIAL_HOURS = 1  # dot-named leftovers of an interrupted build or download, once surely not in progress


@dataclass(frozen=True)
class CacheEntry:
    """One thing in the cache: its kind (the directory it sits in), size in bytes, and whether
    ``prune_cache`` removes it (``stale``, with ``why``)."""

    path: Path
    kind: str
    size: int
    stale: bool
    why: str


def cache_entries() -> list[CacheEntry]:
    """Everything in the cache, each judged current or stale."""
    root = cache_root()
    if not root.is_dir():
        return []
    now = time.time()
    entries = []
    for top in sorted(root.iterdir()):
        if not top.is_dir() or top.name.startswith("."):
            entries.append(CacheEntry(top, "other", _size(top), False, ""))
            continue
        pattern = _SUPERSEDED_BY_NAME.get(top.name)
        if pattern is None and top.name not in _PER_BUNDLE:
            entries.append(CacheEntry(top, "other", _size(top), False, ""))
            continue
        newest: dict[str, float] = {}
        children = sorted(top.iterdir())
        for child in children:
            match = re.fullmatch(pattern, child.name) if pattern else None
            if match:
                newest[match["name"]] = max(newest.get(match["name"], 0.0), _mtime(child))
        for child in children:
            entries.append(_judge(child, top.name, pattern, newest, now))
    return entries


def _judge(child: Path, kind: str, pattern: str | None, newest: dict[str, float], now: float) -> CacheEntry:
    size = _size(child)
    if child.name.startswith("."):
        old = now - _mtime(child) > _PARTIAL_HOURS * 3600
        return CacheEntry(child, kind, size, old, "left by an interrupted build" if old else "")
    if pattern is None:  # per bundle
        unused = now - _last_used(child) > UNUSED_DAYS * 86400
        return CacheEntry(child, kind, size, unused, f"unused for {UNUSED_DAYS} days" if unused else "")
    match = re.fullmatch(pattern, child.name)
    superseded = match is not None and _mtime(child) < newest[match["name"]]
    return CacheEntry(child, kind, size, superseded, "superseded by a newer build" if superseded else "")


def prune_cache(entries: Iterable[CacheEntry]) -> int:
    """Remove ``entries`` from the cache; returns the bytes freed."""
    root = cache_root().resolve()
    freed = 0
    for entry in entries:
        if root not in entry.path.resolve().parents:
            raise ValueError(f"{entry.path} is not inside the cache {root}")
        if entry.path.is_dir() and not entry.path.is_symlink():
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            entry.path.unlink(missing_ok=True)
        freed += entry.size
    return freed


def _size(path: Path) -> int:
    """Bytes on disk under ``path`` (sparse files count what they use)."""
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_blocks * 512
        return sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))
    except OSError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _last_used(path: Path) -> float:
    """The latest read or write of a file under ``path`` (directories' access times move whenever
    they are listed, by this very module too)."""
    try:
        stats = [path.stat(), *(p.stat() for p in path.rglob("*") if p.is_file())]
    except OSError:
        return time.time()  # changing under us: in use
    return max(stats[0].st_mtime, *(max(s.st_atime, s.st_mtime) for s in stats[1:]))
