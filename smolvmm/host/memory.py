"""Guest RAM: host mappings per region, and bounds-checked guest-physical access.

Every address and length here may come from the guest, so each access is checked
against the regions before any host memory is touched; an access that is out of
bounds, or that straddles two regions, raises GuestMemoryError.

RAM is either fresh anonymous memory (a cold boot) or a bundle's pages mapped
copy-on-write (``MAP_PRIVATE``) over an anonymous reservation (a restore): untouched
pages are read from the bundle file's page cache, shared by every instance, and a
guest write copies just that page.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from smolvmm.errors import BundleError, GuestMemoryError
from smolvmm.host.ffi import declare

PAGE_SIZE = 4096

_ffi = declare(
    "mmap",
    """
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int munmap(void *addr, size_t length);
    int madvise(void *addr, size_t length, int advice);
    """,
)
_libc = _ffi.dlopen(None)
_MAP_FAILED = 2**64 - 1
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MADV_RANDOM = 1
_MADV_WILLNEED = 3
_MADV_POPULATE_READ = 22  # Linux 5.14
_PAGEMAP_MAPPED = 3 << 62  # a pagemap entry's "present" and "swapped" bits


def _map(address: int, length: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    result = int(_ffi.cast("uintptr_t", _libc.mmap(_ffi.cast("void *", address), length, _PROT_RW, flags, fd, offset)))
    if result == _MAP_FAILED:
        err = _ffi.errno
        raise OSError(err, f"mmap of {length} bytes failed: {os.strerror(err)}")
    return result


@dataclass(frozen=True)
class Region:
    """One contiguous range of guest-physical memory backed by a host mapping."""

    gpa: int
    size: int
    host_address: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """The guest's physical memory as a set of non-overlapping regions; ``close()`` unmaps them."""

    def __init__(self, layout: list[tuple[int, int]]) -> None:
        """Reserve zeroed anonymous memory for each (gpa, size) pair of ``layout``."""
        ordered = sorted(layout)
        for (gpa, size), (next_gpa, _) in zip(ordered, ordered[1:]):
            if gpa + size > next_gpa:
                raise ValueError(f"guest memory regions overlap at {next_gpa:#x}")
        self.regions: list[Region] = []
        self._spans: list[tuple[int, int, memoryview]] = []  # (gpa, end, view) per region, for ``view``
        try:
            for gpa, size in ordered:
                if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
                    raise ValueError(f"region {gpa:#x}+{size:#x} is not page aligned")
                address = _map(0, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
                self.regions.append(Region(gpa, size, address))
                self._spans.append((gpa, gpa + size, memoryview(_ffi.buffer(_ffi.cast("char *", address), size))))
        except BaseException:
            self.close()
            raise

    @classmethod
    def anonymous(cls, layout: list[tuple[int, int]]) -> GuestMemory:
        """Fresh zeroed memory for each (gpa, size) pair in ``layout``."""
        return cls(layout)

    def map_file(self, fd: int, extents: Iterable[tuple[int, int, int]]) -> None:
        """Map (gpa, length, file_offset) extents of bundle file ``fd`` copy-on-write over guest RAM.

        The extents are the bundle's: one that is not page aligned or not inside one region is
        refused with a BundleError before anything is mapped for it.
        """
        for gpa, length, offset in extents:
            if gpa % PAGE_SIZE or length % PAGE_SIZE or offset % PAGE_SIZE:
                raise BundleError(f"memory extent {gpa:#x}+{length:#x} at file offset {offset:#x} is not page aligned")
            try:
                address = self.host_address(gpa, length)
            except GuestMemoryError:
                raise BundleError(f"memory extent {gpa:#x}+{length:#x} lies outside guest RAM") from None
            _map(address, length, mmap.MAP_PRIVATE | _MAP_FIXED, fd, offset)

    @property
    def size(self) -> int:
        """Total bytes of guest RAM."""
        return sum(r.size for r in self.regions)

    def _region(self, gpa: int, length: int) -> Region:
        if gpa >= 0 and length >= 0:
            for region in self.regions:
                if region.gpa <= gpa and gpa + length <= region.end:
                    return region
        raise GuestMemoryError(f"guest access {gpa:#x}+{length:#x} is outside guest RAM")

    def region_view(self, index: int) -> memoryview:
        """The whole of region ``index`` as a writable view."""
        return self._spans[index][2]

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``length`` bytes at ``gpa``, which must lie inside one region."""
        for start, end, view in self._spans:
            if start <= gpa < end or (length == 0 and gpa == end):
                if length < 0 or gpa + length > end:
                    break
                return view[gpa - start : gpa - start + length]
        raise GuestMemoryError(f"guest access {gpa:#x}+{length:#x} is outside guest RAM")

    def host_address(self, gpa: int, length: int = 1) -> int:
        """Where the ``length`` bytes at guest-physical ``gpa`` (inside one region) are mapped in this process."""
        region = self._region(gpa, length)
        return region.host_address + gpa - region.gpa

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def read_u16(self, gpa: int) -> int:
        value: int = struct.unpack_from("<H", self.view(gpa, 2))[0]
        return value

    def read_u32(self, gpa: int) -> int:
        value: int = struct.unpack_from("<I", self.view(gpa, 4))[0]
        return value

    def read_u64(self, gpa: int) -> int:
        value: int = struct.unpack_from("<Q", self.view(gpa, 8))[0]
        return value

    def write_u16(self, gpa: int, value: int) -> None:
        struct.pack_into("<H", self.view(gpa, 2), 0, value)

    def write_u32(self, gpa: int, value: int) -> None:
        struct.pack_into("<I", self.view(gpa, 4), 0, value)

    def write_u64(self, gpa: int, value: int) -> None:
        struct.pack_into("<Q", self.view(gpa, 8), 0, value)

    def populate(self, ranges: Iterable[tuple[int, int]]) -> int:
        """Read in and map the pages of each (gpa, length) range ahead of the guest
        (``MADV_POPULATE_READ``; before Linux 5.14, ``MADV_WILLNEED``: a read-ahead only); returns
        how many pages it did. Stops early, without error, where madvise fails (a range unmapped)."""
        advice, pages = _MADV_POPULATE_READ, 0
        for gpa, length in ranges:
            region = self._region(gpa, length)
            address = _ffi.cast("void *", region.host_address + gpa - region.gpa)
            while _libc.madvise(address, length, advice) != 0:
                if _ffi.errno != errno.EINVAL or advice == _MADV_WILLNEED:
                    return pages
                advice = _MADV_WILLNEED
            pages += length // PAGE_SIZE
        return pages

    def read_at_random(self) -> None:
        """No read-ahead on guest RAM's file pages (``MADV_RANDOM``): a fault reads its own page."""
        for region in self.regions:
            if _libc.madvise(_ffi.cast("void *", region.host_address), region.size, _MADV_RANDOM) != 0:
                raise OSError(_ffi.errno, f"madvise(MADV_RANDOM) failed: {os.strerror(_ffi.errno)}")

    def mapped_pages(self, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (gpa, pages) runs of guest pages within the (gpa, length) ``ranges`` that this
        process has mapped so far (present or swapped out: ``/proc/self/pagemap``), in order."""
        runs: list[tuple[int, int]] = []
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            for gpa, length in sorted(ranges):
                region = self._region(gpa, length)
                first = (region.host_address + gpa - region.gpa) // PAGE_SIZE
                entries = os.pread(pagemap.fileno(), length // PAGE_SIZE * 8, first * 8)
                for index, (entry,) in enumerate(struct.iter_unpack("<Q", entries)):
                    if entry & _PAGEMAP_MAPPED:
                        page = gpa + index * PAGE_SIZE
                        if runs and runs[-1][0] + runs[-1][1] * PAGE_SIZE == page:
                            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                        else:
                            runs.append((page, 1))
        return runs

    def close(self) -> None:
        """Unmap every region. Views handed out before must no longer be used."""
        for _, _, view in self._spans:
            view.release()
        self._spans = []
        for region in self.regions:
            _libc.munmap(_ffi.cast("void *", region.host_address), region.size)
        self.regions = []
