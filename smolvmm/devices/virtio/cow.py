"""A copy-on-write disk: a read-only base image plus an overlay file that takes every write.

Overlay file layout (all little endian; design and crash guarantees in docs/devices.md):

    0        header (4 KiB): magic, version, cluster size, disk size, base fingerprint
    4096     cluster bitmap, one bit per cluster (1 = the cluster lives in the overlay),
             padded to a multiple of 4 KiB
    data     a sparse copy of the disk: disk offset X is at file offset data + X

The bitmap on disk is only ever updated after the data it points at was made durable, so after
a crash the overlay shows the disk as of the last FLUSH plus, possibly, later writes to clusters
that were already in the overlay at that FLUSH.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
from collections.abc import Iterator, Sequence
from typing import BinaryIO, NamedTuple

from smolvmm.devices.virtio.buffers import slice_views, total_length
from smolvmm.errors import ImageError

MAGIC = b"SMOLCOW\0"
VERSION = 1
CLUSTER_SIZE = 4096
HEADER_SIZE = 4096
FINGERPRINT_BYTES = 64 * 1024
EXPORT_CHUNK = 1 << 20
_HEADER = struct.Struct("<8sIIQ32s")


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _fingerprint(base_fd: int, size: int) -> bytes:
    """Identifies the base an overlay belongs to: its size and a hash of its first 64 KiB."""
    head = os.pread(base_fd, FINGERPRINT_BYTES, 0)
    return hashlib.sha256(size.to_bytes(8, "little") + head).digest()


def _preadv_all(fd: int, views: Sequence[memoryview], offset: int) -> None:
    left = total_length(views)
    while left:
        done = os.preadv(fd, views, offset)
        if done == 0:
            raise OSError(f"unexpected end of file at {offset}")
        offset, left = offset + done, left - done
        if left:
            views = slice_views(views, done, left)


def _pwritev_all(fd: int, views: Sequence[memoryview], offset: int) -> None:
    left = total_length(views)
    while left:
        done = os.pwritev(fd, views, offset)
        if done == 0:
            raise OSError(f"nothing written at {offset}")
        offset, left = offset + done, left - done
        if left:
            views = slice_views(views, done, left)


class CowLayout(NamedTuple):
    """A ``CowDisk`` as ``layout`` hands it out: file descriptors (overlay -1 when there is none), where
    the overlay's copy of the disk starts, the disk's size, and the cluster map and its dirty pages."""

    base: int
    overlay: int
    data_offset: int
    size: int
    bitmap: bytearray
    dirty_pages: bytearray


class CowDisk:
    """Reads and writes a disk of ``size`` bytes made of a base image and an overlay.

    ``overlay`` None gives a temporary overlay that disappears when the disk is closed. A
    read-only disk with no overlay reads the base alone; with one, it reads through it.
    """

    def __init__(self, base: str | os.PathLike[str], overlay: str | os.PathLike[str] | None, read_only: bool) -> None:
        try:
            self._base = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"cannot open disk image {os.fspath(base)}: {exc.strerror}") from exc
        self.size = os.lseek(self._base, 0, os.SEEK_END)  # also right for block devices
        self.read_only = read_only
        self._bitmap = bytearray(_round_up(_round_up(self.size, CLUSTER_SIZE) // CLUSTER_SIZE, 8 * 4096) // 8)
        self._data_offset = HEADER_SIZE + len(self._bitmap)
        self._dirty_pages = bytearray(len(self._bitmap) // 4096)  # 1: that page of the bitmap changed since a flush
        self._overlay: int | None = None
        try:
            self._overlay = self._open_overlay(overlay, _fingerprint(self._base, self.size))
        except BaseException:
            os.close(self._base)
            raise

    def _open_overlay(self, path: str | os.PathLike[str] | None, fingerprint: bytes) -> int | None:
        if path is None:
            if self.read_only:
                return None
            import tempfile  # here: a restore without a writable disk does not wait for it

            with tempfile.TemporaryFile() as unnamed:
                fd = os.dup(unnamed.fileno())
            self._format(fd, fingerprint)
            return fd
        flags = os.O_RDONLY if self.read_only else os.O_RDWR | os.O_CREAT
        try:
            fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ImageError(f"cannot open overlay {os.fspath(path)}: {exc.strerror}") from exc
        try:
            self._lock(fd, os.fspath(path))
            if os.fstat(fd).st_size == 0 and not self.read_only:
                self._format(fd, fingerprint)
                os.fdatasync(fd)
            else:
                self._load(fd, os.fspath(path), fingerprint)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _lock(self, fd: int, path: str) -> None:
        """One writer per overlay, or any number of readers: two machines must not share it."""
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ImageError(f"overlay {path} is in use by another machine") from exc

    def _format(self, fd: int, fingerprint: bytes) -> None:
        header = _HEADER.pack(MAGIC, VERSION, CLUSTER_SIZE, self.size, fingerprint)
        os.pwrite(fd, header.ljust(HEADER_SIZE, b"\0") + self._bitmap, 0)
        os.ftruncate(fd, self._data_offset + self.size)

    def _load(self, fd: int, path: str, fingerprint: bytes) -> None:
        raw = os.pread(fd, _HEADER.size, 0)
        if len(raw) < _HEADER.size or raw[:8] != MAGIC:
            raise ImageError(f"{path} is not a smolvmm overlay")
        _, version, cluster, size, saved_fingerprint = _HEADER.unpack(raw)
        if version != VERSION or cluster != CLUSTER_SIZE:
            raise ImageError(f"{path}: unsupported overlay version {version} / cluster size {cluster}")
        if size != self.size or saved_fingerprint != fingerprint:
            raise ImageError(f"{path} is an overlay of a different base image")
        bitmap = os.pread(fd, len(self._bitmap), HEADER_SIZE)
        if len(bitmap) != len(self._bitmap):
            raise ImageError(f"{path}: overlay cluster map is truncated")
        self._bitmap[:] = bitmap

    def _mapped(self, cluster: int) -> bool:
        return bool(self._bitmap[cluster >> 3] >> (cluster & 7) & 1)

    def _uniform(self, first: int, last: int) -> bool | None:
        """Whether clusters ``first..last`` all are (True) or all are not (False) in the overlay;
        None when they are mixed. One big-integer test instead of a loop over the clusters."""
        count = last - first + 1
        bits = int.from_bytes(self._bitmap[first >> 3 : (last >> 3) + 1], "little") >> (first & 7)
        bits &= (1 << count) - 1
        if bits == 0:
            return False
        if bits == (1 << count) - 1:
            return True
        return None

    def _runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """Split ``offset .. offset+length`` into (start, length, in_overlay) runs of clusters."""
        if self._overlay is None:
            yield offset, length, False
            return
        if length <= 0:
            return
        uniform = self._uniform(offset // CLUSTER_SIZE, (offset + length - 1) // CLUSTER_SIZE)
        if uniform is not None:
            yield offset, length, uniform
            return
        end = offset + length
        start = offset
        while start < end:
            mapped = self._mapped(start // CLUSTER_SIZE)
            stop = (start // CLUSTER_SIZE + 1) * CLUSTER_SIZE
            while stop < end and self._mapped(stop // CLUSTER_SIZE) == mapped:
                stop += CLUSTER_SIZE
            stop = min(stop, end)
            yield start, stop - start, mapped
            start = stop

    def read_into(self, offset: int, views: Sequence[memoryview]) -> None:
        """Fill ``views`` with the disk bytes at ``offset``; the caller checked the bounds."""
        overlay = self._overlay
        total = total_length(views)
        for start, length, mapped in self._runs(offset, total):
            fd, at = (overlay, self._data_offset + start) if mapped and overlay is not None else (self._base, start)
            _preadv_all(fd, views if length == total else slice_views(views, start - offset, length), at)

    def write_from(self, offset: int, views: Sequence[memoryview]) -> None:
        """Write ``views`` at ``offset`` into the overlay, copying up partial clusters from the base."""
        if self.read_only or self._overlay is None:
            raise OSError("write to a read-only disk")
        for start, length, mapped in self._runs(offset, total_length(views)):
            data = slice_views(views, start - offset, length)
            if mapped:
                _pwritev_all(self._overlay, data, self._data_offset + start)
                continue
            first = start // CLUSTER_SIZE * CLUSTER_SIZE
            last = min(_round_up(start + length, CLUSTER_SIZE), self.size)
            head = memoryview(bytearray(start - first))
            tail = memoryview(bytearray(last - start - length))
            _preadv_all(self._base, [head], first)  # a base cut short under us fails, never shifts the data
            _preadv_all(self._base, [tail], start + length)
            _pwritev_all(self._overlay, [head, *data, tail], self._data_offset + first)
            self._map(first // CLUSTER_SIZE, _round_up(last, CLUSTER_SIZE) // CLUSTER_SIZE)

    def _map(self, first: int, end: int) -> None:
        for cluster in range(first, end):
            self._bitmap[cluster >> 3] |= 1 << (cluster & 7)
            self._dirty_pages[(cluster >> 3) // 4096] = 1

    def flush(self) -> None:
        """Make every completed write durable: data first, then the cluster map that points at it."""
        if self._overlay is None or self.read_only:
            return
        os.fdatasync(self._overlay)
        dirty = [page for page, changed in enumerate(self._dirty_pages) if changed]
        if dirty:
            for page in dirty:
                chunk = self._bitmap[page * 4096 : (page + 1) * 4096]
                os.pwrite(self._overlay, chunk, HEADER_SIZE + page * 4096)
                self._dirty_pages[page] = 0
            os.fdatasync(self._overlay)

    def layout(self) -> CowLayout:
        """The files and cluster map, for a request path outside Python that reads and writes
        them as ``read_into`` and ``write_from`` do (``blk_native``); valid until ``close``."""
        overlay = -1 if self._overlay is None else self._overlay
        return CowLayout(self._base, overlay, self._data_offset, self.size, self._bitmap, self._dirty_pages)

    def export(self, dest: str | os.PathLike[str] | BinaryIO) -> None:
        """Write the current disk contents as a flat image, leaving holes where it is zero.

        ``dest`` is a path (created or truncated) or a binary file object written from its
        current position; a non-seekable one gets the zeros written out.
        """
        if isinstance(dest, (str, os.PathLike)):
            with open(dest, "wb") as f:
                self.export(f)
            return
        seekable = dest.seekable()
        origin = dest.tell() if seekable else 0
        chunk = bytearray(EXPORT_CHUNK)
        zeros = bytes(EXPORT_CHUNK)
        for offset in range(0, self.size, EXPORT_CHUNK):
            view = memoryview(chunk)[: min(EXPORT_CHUNK, self.size - offset)]
            self.read_into(offset, [view])
            if seekable and view == zeros[: len(view)]:
                if offset + len(view) < self.size:
                    continue
                # The final byte is written even when zero, so the image has its full length.
                offset, view = self.size - 1, view[-1:]
            if seekable:
                dest.seek(origin + offset)
            dest.write(view)

    def close(self) -> None:
        """Persist the overlay's cluster map and close both files."""
        if self._overlay is not None:
            self.flush()
            os.close(self._overlay)
            self._overlay = None
        os.close(self._base)
