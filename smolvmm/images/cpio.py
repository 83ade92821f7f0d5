"""A cpio "newc" archive writer: the format the Linux kernel unpacks as an initramfs."""

from __future__ import annotations

import gzip
import io
import stat
from pathlib import Path, PurePosixPath

_TRAILER = "TRAILER!!!"


class Initramfs:
    """Entries in the order the kernel will create them; parent directories are added implicitly."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, bytes, int]] = {}

    def _parents(self, path: str) -> None:
        for parent in reversed(PurePosixPath(path).parents):
            name = str(parent)
            if name not in (".", "/") and name not in self._entries:
                self._entries[name] = (stat.S_IFDIR | 0o755, b"", 0)

    def _add(self, path: str, mode: int, data: bytes = b"", rdev: int = 0) -> None:
        path = path.strip("/")
        self._parents(path)
        self._entries[path] = (mode, data, rdev)

    def directory(self, path: str, perm: int = 0o755) -> None:
        """Add an empty directory."""
        self._add(path, stat.S_IFDIR | perm)

    def file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        """Add a regular file holding ``data``."""
        self._add(path, stat.S_IFREG | perm, data)

    def symlink(self, path: str, target: str) -> None:
        """Add a symbolic link to ``target``."""
        self._add(path, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        """Add a character device node (e.g. /dev/console, needed before devtmpfs is mounted)."""
        self._add(path, stat.S_IFCHR | perm, rdev=(major << 8) | minor)

    def tree(self, source: Path, dest: str) -> None:
        """Add the files, directories and symlinks under ``source`` at ``dest``."""
        for item in sorted(source.rglob("*")):
            path = f"{dest.rstrip('/')}/{item.relative_to(source).as_posix()}"
            if item.is_symlink():
                self.symlink(path, str(item.readlink()))
            elif item.is_dir():
                self.directory(path, item.stat().st_mode & 0o7777)
            else:
                self.file(path, item.read_bytes(), item.stat().st_mode & 0o7777)

    def write(self, out: io.BufferedIOBase) -> None:
        """Write the archive, trailer included."""
        for ino, (path, (mode, data, rdev)) in enumerate(self._entries.items(), start=1):
            nlink = 2 if stat.S_ISDIR(mode) else 1
            _entry(out, path, ino, mode, nlink, data, rdev)
        _entry(out, _TRAILER, 0, 0, 1, b"", 0)

    def save(self, path: Path, compress: bool = False) -> None:
        """Write the archive to ``path``, gzip-compressed if asked (fast level: the kernel inflates it)."""
        with open(path, "wb") as raw:
            if compress:
                with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
                    self.write(gz)
            else:
                self.write(raw)


def _pad(out: io.BufferedIOBase, length: int) -> None:
    out.write(b"\0" * (-length % 4))


def _entry(out: io.BufferedIOBase, name: str, ino: int, mode: int, nlink: int, data: bytes, rdev: int) -> None:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    out.write(header + encoded)
    _pad(out, len(header) + len(encoded))
    out.write(data)
    _pad(out, len(data))
