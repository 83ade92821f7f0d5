"""Applying image layers (tar streams) to a directory, in order, as container runtimes do.

``.wh.NAME`` deletes NAME from the layers below, ``.wh..wh..opq`` empties its directory of them;
modes, owners (numeric), times, symlinks, hard links and xattrs are kept. Layers are untrusted:
a path with ``..`` or an absolute path, a whiteout of ``""``, ``.`` or ``..``, a write through
a symlink that leaves the root, a hard link to outside it, a layer larger than the space allowed:
each raises ImageError naming the layer and the entry. Nothing is ever created outside ``root``: every parent is resolved within
the root by hand (symlinks followed relative to the root, never by the host's kernel).
Device nodes are skipped with a note (the guest's devtmpfs provides them).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import zstandard

from smolvmm.errors import ImageError
from smolvmm.oci.manifest import Layer

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_ENTRIES = 2_000_000
MAX_SYMLINK_HOPS = 40
_CHUNK = 1 << 20


@dataclass
class Budget:
    """How many bytes of file content the layers may still write (a tar bomb stops early)."""

    remaining: int
    notes: list[str] = field(default_factory=list)

    def take(self, where: str, size: int) -> None:
        if size > self.remaining:
            raise ImageError(
                f"{where} declares {size} bytes, more than the {max(self.remaining, 0)} left"
                " for the image (a tar bomb, or raise --disk-size / free space)"
            )
        self.remaining -= size


class _Hashing(io.RawIOBase):
    """A read-through stream that hashes what passes (a layer's uncompressed tar, for its diff_id)."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner, self.digest = inner, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]  # BufferedReader passes a memoryview
        data = self.inner.read(len(buffer))
        buffer[: len(data)] = data
        self.digest.update(data)
        return len(data)


def _decompressed(raw: IO[bytes] | io.RawIOBase) -> IO[bytes]:
    # IO[bytes] declares no readinto, which BufferedReader needs; every stream that reaches here has one.
    buffered = io.BufferedReader(raw, _CHUNK) if not isinstance(raw, io.BufferedReader) else raw  # type: ignore[type-var]
    magic = buffered.peek(4)[:4]
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]  # typed as BufferedIOBase only
    if magic == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(buffered)
    return buffered


def _parts(where: str, name: str) -> list[str]:
    """The components of an entry's path; ImageError for an absolute path or any ``..``."""
    if name.startswith("/"):
        raise ImageError(f"{where}: entry {name[:200]!r} has an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"{where}: entry {name[:200]!r} climbs out of the root with '..'")
    if any("\0" in part or len(part.encode()) > 255 for part in parts):
        raise ImageError(f"{where}: entry {name[:200]!r} has an invalid name")
    return parts


def _resolve_dir(root: Path, where: str, name: str, parts: list[str], create: bool) -> Path:
    """The directory that holds ``parts`` (all but the last), inside ``root``, following symlinks
    as the image would see them (an absolute target is relative to the image's root). Missing
    directories are created when ``create``; leaving the root is an ImageError."""
    resolved: list[str] = []
    pending = list(parts)
    hops = 0
    through = ""  # the first symlink followed: past it, nothing is created
    while pending:
        part = pending.pop(0)
        if part == "..":
            if not resolved:
                raise ImageError(f"{where}: entry {name[:200]!r} goes through a symlink that leaves the root")
            resolved.pop()
            continue
        path = root.joinpath(*resolved, part)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            if not create or through:
                via = f" (through symlink {through})" if through else ""
                missing = "/".join([*resolved, part])
                raise ImageError(f"{where}: entry {name[:200]!r}: {missing}{via} does not exist in the image") from None
            path.mkdir(mode=0o755)
            resolved.append(part)
            continue
        if stat.S_ISLNK(info.st_mode):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise ImageError(f"{where}: entry {name[:200]!r}: too many levels of symlinks")
            target = os.readlink(path)
            through = through or f"{'/'.join([*resolved, part])} -> {target[:200]}"
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p not in ("", ".")] + pending
            continue
        if not stat.S_ISDIR(info.st_mode):
            raise ImageError(f"{where}: entry {name[:200]!r}: {'/'.join([*resolved, part])} is not a directory")
        resolved.append(part)
    return root.joinpath(*resolved)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


class _Applier:
    def __init__(self, root: Path, budget: Budget, as_root: bool) -> None:
        self.root, self.budget, self.as_root = root, budget, as_root
        self.owners: dict[str, tuple[int, int]] = {}  # not as root: path under root -> (uid, gid)

    def apply(self, layer: Layer) -> None:
        where = f"layer {layer.name}"
        raw = layer.open()
        stream = _decompressed(raw)
        hashing = _Hashing(stream) if layer.diff_id else None
        if hashing is not None:  # the diff_id is the uncompressed tar's: hashed as it is read, once
            stream = io.BufferedReader(hashing, _CHUNK)
        created: set[str] = set()
        directories: list[tuple[Path, tarfile.TarInfo]] = []
        try:
            with tarfile.open(fileobj=stream, mode="r|") as archive:
                for count, member in enumerate(archive):
                    if count >= MAX_ENTRIES:
                        raise ImageError(f"{where} holds more than {MAX_ENTRIES} entries")
                    self._entry(where, archive, member, created, directories)
                while stream.read(_CHUNK):  # the rest of the stream counts towards the diff_id
                    pass
        except (tarfile.TarError, EOFError, zstandard.ZstdError, gzip.BadGzipFile) as exc:
            raise ImageError(f"{where} is not a valid (compressed) tar: {exc}") from None
        except OSError as exc:
            raise ImageError(f"{where}: {exc.strerror or exc}: {exc.filename or ''}") from None
        finally:
            raw.close()
        if hashing is not None and "sha256:" + hashing.digest.hexdigest() != layer.diff_id:
            raise ImageError(f"{where} does not match its digest {layer.diff_id}")
        for path, member in reversed(directories):  # after their contents changed
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)

    def _entry(
        self,
        where: str,
        archive: tarfile.TarFile,
        member: tarfile.TarInfo,
        created: set[str],
        directories: list[tuple[Path, tarfile.TarInfo]],
    ) -> None:
        parts = _parts(where, member.name)
        if not parts:
            return  # the root itself ("./")
        leaf = parts[-1]
        parent = _resolve_dir(self.root, where, member.name, parts[:-1], create=True)
        if leaf == OPAQUE:
            for child in list(parent.iterdir()):
                if str(child) not in created:
                    _remove(child)
            return
        if leaf.startswith(WHITEOUT):
            hidden = leaf[len(WHITEOUT) :]
            if hidden in ("", ".", ".."):  # would remove the root itself, or the directory above it
                raise ImageError(f"{where}: entry {member.name[:200]!r} has an invalid name (a whiteout of {hidden!r})")
            _remove(parent / hidden)
            return
        path = parent / leaf
        if member.ischr() or member.isblk():
            self.budget.notes.append(f"{where}: skipped device node {member.name}")
            return
        if member.isdir():
            if os.path.lexists(path) and not (path.is_dir() and not path.is_symlink()):
                path.unlink()
            path.mkdir(mode=0o700, exist_ok=True)
            directories.append((path, member))
        else:
            _remove(path)
            if member.isfile():
                self.budget.take(f"{where}: {member.name}", member.size)
                source = archive.extractfile(member)
                assert source is not None
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
            elif member.issym():
                os.symlink(member.linkname, path)
            elif member.islnk():
                target_parts = _parts(where, member.linkname)
                if not target_parts:
                    raise ImageError(f"{where}: hard link {member.name[:200]!r} to the root")
                target_dir = _resolve_dir(self.root, where, member.linkname, target_parts[:-1], create=False)
                target = target_dir / target_parts[-1]
                if not os.path.lexists(target) or os.path.isdir(target) and not os.path.islink(target):
                    raise ImageError(
                        f"{where}: hard link {member.name[:200]!r} to {member.linkname[:200]!r},"
                        " which is not a file of the image"
                    )
                os.link(target, path, follow_symlinks=False)
                self.owners.pop(str(path.relative_to(self.root)), None)  # not a path removed before
                created.add(str(path))
                return  # a hard link shares its target's metadata
            elif member.isfifo():
                os.mkfifo(path, 0o600)
            else:
                self.budget.notes.append(f"{where}: skipped {member.name} of unknown type {member.type!r}")
                return
        created.add(str(path))
        self._metadata(where, path, member)

    def _metadata(self, where: str, path: Path, member: tarfile.TarInfo) -> None:
        if self.as_root:
            os.lchown(path, member.uid, member.gid)
        else:
            self.owners[str(path.relative_to(self.root))] = (member.uid, member.gid)
        if not member.issym():
            os.chmod(path, member.mode & 0o7777)
        for key, value in member.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                name = key.removeprefix("SCHILY.xattr.")
                try:
                    os.setxattr(path, name, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
                except OSError as exc:
                    self.budget.notes.append(f"{where}: {member.name}: xattr {name} not kept ({exc.strerror})")
        if not member.isdir():
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


def apply_layers(
    root: Path,
    layers: tuple[Layer, ...] | list[Layer],
    budget: Budget,
    progress: Callable[[str], None] | None = None,
    owners: dict[str, tuple[int, int]] | None = None,
) -> list[str]:
    """Apply ``layers`` in order to the directory ``root``; returns notes on what was skipped.

    Owners are set when run as root; otherwise every file is the caller's, and ``owners`` receives
    the ones the layers give (path under ``root`` -> (uid, gid)) to be set on the disk instead."""
    applier = _Applier(root, budget, os.geteuid() == 0)
    for number, layer in enumerate(layers):
        if progress:
            progress(f"unpacking layer {number + 1}/{len(layers)}")
        applier.apply(layer)
    if owners is not None:
        owners.update(applier.owners)
    elif any(any(owner) for owner in applier.owners.values()):
        budget.notes.append("owners other than root were not kept: unpacking needs root (run as root)")
    return budget.notes
