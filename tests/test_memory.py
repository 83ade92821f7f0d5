"""GuestMemory on the real x86_64 RAM layout: bounds checks and guest-physical to host translation.

4 GiB of RAM is split around the 32-bit MMIO gap into two regions (reserved with MAP_NORESERVE,
so only touched pages cost memory). Any access not wholly inside one region must raise
GuestMemoryError, never another exception and never a touch of host memory outside the region.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smolvmm.arch.x86_64 import layout
from smolvmm.errors import BundleError, GuestMemoryError
from smolvmm.host.memory import PAGE_SIZE, GuestMemory

GIB = 1 << 30
RAM = 4 * GIB
REGIONS = layout.ram_regions(RAM)
LOW_END = layout.MMIO_GAP_START
HIGH = layout.MMIO_GAP_END
HIGH_END = HIGH + RAM - LOW_END


@pytest.fixture(scope="module")
def memory() -> Iterator[GuestMemory]:
    memory = GuestMemory.anonymous(REGIONS)
    yield memory
    memory.close()


def inside(gpa: int, length: int) -> bool:
    """The model: an access is valid iff it lies wholly inside one region (length 0 may sit at its end)."""
    return gpa >= 0 and length >= 0 and any(start <= gpa and gpa + length <= start + size for start, size in REGIONS)


def host_address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_ram_is_split_around_the_mmio_gap(memory: GuestMemory) -> None:
    assert REGIONS == [(0, LOW_END), (HIGH, HIGH_END - HIGH)]
    assert layout.ram_regions(256 << 20) == [(0, 256 << 20)]
    assert layout.ram_regions(LOW_END) == [(0, LOW_END)]
    assert [(r.gpa, r.size) for r in memory.regions] == REGIONS
    assert memory.size == RAM


def test_first_and_last_bytes_of_each_region(memory: GuestMemory) -> None:
    for region in memory.regions:
        memory.write(region.gpa, b"\x5a")
        memory.write(region.end - 1, b"\xa5")
        assert memory.read(region.gpa, 1) == b"\x5a" and memory.read(region.end - 1, 1) == b"\xa5"
        memory.write_u64(region.end - 8, 0x1122_3344_5566_7788)
        assert memory.read_u64(region.end - 8) == 0x1122_3344_5566_7788
        assert memory.read_u32(region.end - 4) == 0x1122_3344
        assert memory.read_u16(region.end - 2) == 0x1122
        assert len(memory.view(region.gpa, region.size)) == region.size
        assert memory.read(region.end, 0) == b""


def test_translation_to_host_addresses(memory: GuestMemory) -> None:
    """Each region's guest-physical range is its host mapping, read and written both ways."""
    spans = sorted((r.host_address, r.host_address + r.size) for r in memory.regions)
    assert spans[0][1] <= spans[1][0], "regions share host memory"
    for index, region in enumerate(memory.regions):
        for offset in (0, PAGE_SIZE + 3, region.size // 2, region.size - 8):
            gpa = region.gpa + offset
            host = region.host_address + offset
            assert host_address(memory.view(gpa, 8)) == host
            assert host_address(memory.region_view(index)[offset:]) == host
            memory.write_u64(gpa, 0x0123_4567_89AB_CDEF ^ gpa)
            assert ctypes.string_at(host, 8) == (0x0123_4567_89AB_CDEF ^ gpa).to_bytes(8, "little")
            ctypes.memmove(host, b"host-set", 8)
            assert memory.read(gpa, 8) == b"host-set"
    # The high region is not the low one seen again (a lost region base would alias them).
    memory.write(0x1000, b"low!")
    memory.write(HIGH + 0x1000, b"high")
    assert memory.read(0x1000, 4) == b"low!"


OUTSIDE = [
    (-1, 1),
    (-8, 8),
    (-1, 0),
    (-(2**64), 2**64 + 1),  # ends inside RAM, starts below 0
    (LOW_END - 1, 2),  # straddles the end of the low region into the gap
    (LOW_END - 7, 8),
    (LOW_END, 1),  # the gap: virtio-mmio, IOAPIC, LAPIC
    (layout.IOAPIC_ADDR, 4),
    (layout.LAPIC_ADDR, 4),
    (HIGH - 1, 1),
    (HIGH - 4, 8),  # straddles the gap into the high region
    (0xE000_0000, 0),  # zero length, but inside the gap
    (HIGH_END - 1, 2),
    (HIGH_END, 1),
    (HIGH_END + 1, 0),
    (2**63, 8),
    (2**64 - 1, 1),
    (2**64 - 1, 2),  # would wrap to 0 in 64-bit arithmetic
    (2**64, 1),
    (2**64, 0),
    (2**64 + 0x1000, 8),  # would alias 0x1000 if truncated to 64 bits
    (2**100, 1),
    (0, -1),
    (0x1000, -(2**64)),
    (0, LOW_END + 1),
    (0, RAM),
    (0, 2**64),
    (0, 2**64 + 1),  # would be 1 byte if truncated to 64 bits
    (HIGH, 2**100),
]


@pytest.mark.parametrize(("gpa", "length"), OUTSIDE, ids=[f"{g:#x}+{n:#x}" for g, n in OUTSIDE])
def test_access_outside_ram_is_an_error(memory: GuestMemory, gpa: int, length: int) -> None:
    assert not inside(gpa, length)
    with pytest.raises(GuestMemoryError):
        memory.view(gpa, length)
    with pytest.raises(GuestMemoryError):
        memory.read(gpa, length)
    if 0 <= length <= 16:
        with pytest.raises(GuestMemoryError):
            memory.write(gpa, bytes(length))
    for size, read, write in (
        (2, memory.read_u16, memory.write_u16),
        (4, memory.read_u32, memory.write_u32),
        (8, memory.read_u64, memory.write_u64),
    ):
        if not inside(gpa, size):
            with pytest.raises(GuestMemoryError):
                read(gpa)
            with pytest.raises(GuestMemoryError):
                write(gpa, 0)


EXTENT_STARTS = (-PAGE_SIZE, LOW_END - PAGE_SIZE, LOW_END, HIGH - PAGE_SIZE, HIGH_END, 2**64)
EXTENTS = [(gpa, 2 * PAGE_SIZE) for gpa in EXTENT_STARTS] + [(PAGE_SIZE, -PAGE_SIZE), (0, RAM), (HIGH, 2**64)]


@pytest.mark.parametrize(("gpa", "length"), EXTENTS)
def test_file_extent_outside_ram_is_a_bundle_error(memory: GuestMemory, gpa: int, length: int) -> None:
    """A bundle's extent is the bundle's fault, not the guest's: BundleError, never GuestMemoryError."""
    with pytest.raises(BundleError, match="outside guest RAM"):
        memory.map_file(-1, [(gpa, length, 0)])


def test_misaligned_file_extent_is_a_bundle_error(memory: GuestMemory) -> None:
    for extent in ((PAGE_SIZE + 1, PAGE_SIZE, 0), (0, PAGE_SIZE + 1, 0), (0, PAGE_SIZE, 512)):
        with pytest.raises(BundleError, match="not page aligned"):
            memory.map_file(-1, [extent])


def test_no_access_after_close() -> None:
    memory = GuestMemory.anonymous([(0, 2 * PAGE_SIZE)])
    memory.close()
    with pytest.raises(GuestMemoryError):
        memory.read(0, 1)


BOUNDARIES = [0, PAGE_SIZE, LOW_END, HIGH, HIGH_END, 2**32, 2**63, 2**64]
addresses = st.one_of(
    st.integers(-(2**66), 2**66),
    st.builds(lambda b, d: b + d, st.sampled_from(BOUNDARIES), st.integers(-16, 16)),
)
lengths = st.one_of(
    st.integers(-16, 64),
    st.integers(-(2**66), 2**66),
    st.builds(lambda b, d: b + d, st.sampled_from([LOW_END, HIGH_END - HIGH, 2**64]), st.integers(-16, 16)),
)


@settings(max_examples=2000, deadline=None)
@given(gpa=addresses, length=lengths)
def test_accesses_match_the_region_model(memory: GuestMemory, gpa: int, length: int) -> None:
    if not inside(gpa, length):
        with pytest.raises(GuestMemoryError):
            memory.view(gpa, length)
        return
    view = memory.view(gpa, length)
    assert len(view) == length
    if length:
        region = next(r for r in memory.regions if r.gpa <= gpa < r.end)
        assert host_address(view) == region.host_address + gpa - region.gpa
    if length <= 64:
        data = bytes(range(length))
        memory.write(gpa, data)
        assert memory.read(gpa, length) == data


def test_the_pages_a_restore_touched_are_found_and_populate_maps_the_rest(tmp_path: Path) -> None:
    backing = tmp_path / "ram"
    backing.write_bytes(bytes(range(256)) * (64 * PAGE_SIZE // 256))  # 64 pages of "bundle"
    guest = GuestMemory([(0, 128 * PAGE_SIZE)])
    try:
        with open(backing, "rb") as file:
            guest.map_file(file.fileno(), [(16 * PAGE_SIZE, 64 * PAGE_SIZE, 0)])
        stored = [(16 * PAGE_SIZE, 64 * PAGE_SIZE)]
        assert guest.mapped_pages(stored) == []  # mapped, not yet touched
        guest.read_at_random()  # a trial resume's: no read-ahead (fault-around may still map neighbours)
        guest.read(20 * PAGE_SIZE, 1)
        guest.write(40 * PAGE_SIZE + 7, b"x")  # a write copies the page: still this mapping's
        touched = guest.mapped_pages(stored)
        # a read fault maps its neighbours in the page cache too (fault-around): a superset, in order
        assert touched and all(start % PAGE_SIZE == 0 and pages >= 1 for start, pages in touched)
        covered = {start // PAGE_SIZE + i for start, pages in touched for i in range(pages)}
        assert {20, 40} <= covered <= set(range(16, 80))
        assert guest.populate([(48 * PAGE_SIZE, 8 * PAGE_SIZE)]) == 8
        assert set(range(48, 56)) <= {s // PAGE_SIZE + i for s, n in guest.mapped_pages(stored) for i in range(n)}
        assert guest.read(50 * PAGE_SIZE, 4) == bytes(range(4))  # the file's bytes, read in ahead
        with pytest.raises(GuestMemoryError):
            guest.populate([(120 * PAGE_SIZE, 16 * PAGE_SIZE)])  # past guest RAM: refused, nothing touched
    finally:
        guest.close()
    assert guest.populate([]) == 0
