"""Guest RAM: mmap-backed regions and bounds-checked guest-physical access.

Every address and length here may come from the guest, so each access is checked
against the regions before any host memory is touched; an access that is out of
bounds, or that straddles two regions, raises GuestMemoryError.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass

from .errors import GuestMemoryError

PAGE_SIZE = 4096


@dataclass(frozen=True)
class Region:
    """One contiguous range of guest-physical memory backed by a host mapping."""

    gpa: int
    size: int
    mapping: mmap.mmap

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def host_address(self) -> int:
        """Host virtual address of the region's first byte (for KVM and preadv)."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mapping))


class GuestMemory:
    """The guest's physical memory as a set of non-overlapping regions."""

    def __init__(self, regions: list[Region]) -> None:
        ordered = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(ordered, ordered[1:]):
            if a.end > b.gpa:
                raise ValueError(f"guest memory regions overlap at {b.gpa:#x}")
        self.regions = ordered
        self._views = [memoryview(r.mapping) for r in ordered]

    @classmethod
    def anonymous(cls, layout: list[tuple[int, int]]) -> GuestMemory:
        """Fresh zeroed memory for each (gpa, size) pair in ``layout``."""
        regions = []
        for gpa, size in layout:
            if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
                raise ValueError(f"region {gpa:#x}+{size:#x} is not page aligned")
            mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            regions.append(Region(gpa, size, mapping))
        return cls(regions)

    @property
    def size(self) -> int:
        """Total bytes of guest RAM."""
        return sum(r.size for r in self.regions)

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``length`` bytes at ``gpa``, which must lie inside one region."""
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest access {gpa:#x}+{length:#x}")
        for region, view in zip(self.regions, self._views):
            if region.gpa <= gpa < region.end or (length == 0 and gpa == region.end):
                offset = gpa - region.gpa
                if length > region.size - offset:
                    break
                return view[offset : offset + length]
        raise GuestMemoryError(f"guest access {gpa:#x}+{length:#x} is outside guest RAM")

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def read_u16(self, gpa: int) -> int:
        return struct.unpack_from("<H", self.view(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack_from("<I", self.view(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack_from("<Q", self.view(gpa, 8))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        struct.pack_into("<H", self.view(gpa, 2), 0, value)

    def write_u32(self, gpa: int, value: int) -> None:
        struct.pack_into("<I", self.view(gpa, 4), 0, value)

    def write_u64(self, gpa: int, value: int) -> None:
        struct.pack_into("<Q", self.view(gpa, 8), 0, value)

    def close(self) -> None:
        """Release the views and unmap every region."""
        for view in self._views:
            view.release()
        self._views = []
        for region in self.regions:
            region.mapping.close()
