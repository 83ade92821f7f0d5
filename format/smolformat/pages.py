"""Page images: guest RAM and base disks, stored as raw pages (mmap-able) or zstd chunks.

An image is a list of regions ``(start, size)`` (guest RAM regions, or one region for a disk).
Its *index* section lists extents ``(address, length, offset, stored)``; its *data* section holds
the bytes. Ranges that no extent covers are zero.

- raw: page-aligned pages; runs of at least ``min_zero_gap`` zero pages left out (shorter ones
  between stored pages are stored: fewer, longer mappings); a run of at least ``min_dedup_run``
  pages equal to ones already stored points at them (stored once) while the image has fewer than
  ``DEDUP_EXTENTS`` extents, so that a restore's mappings stay far below Linux's default
  vm.max_map_count (65530). Both default to 16, for restore speed: every extent is one mmap, and
  with ``min_dedup_run=1`` a real 256 MiB snapshot shrank 81.8 -> 63.7 MiB but its mappings grew
  97 -> 4762 and mapping them took 22.4 ms instead of 0.5 ms (BENCHMARKS.md). 1 and 1 give
  the smallest raw file (``pack --raw --smallest``).
- zstd: one independent frame per ``granule``-sized chunk of a region; all-zero chunks left out.
"""

from __future__ import annotations

import bisect
import os
import re
import threading
from array import array
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from construct import Container, Int16ul, Int32ul, Int64ul, Struct

from .errors import FormatError
from .layout import PAGE_SIZE, Encoding
from .limits import bounded
from .packed import Packed, PackedArray
from .pagescan import DUP, NEW, ZERO, PageScanner

if TYPE_CHECKING:
    import zstandard  # imported where a zstd image is written or read: a raw restore never needs it

MAX_EXTENTS = 1 << 24
MIN_DEDUP_RUN = 16
DEDUP_EXTENTS = 16384
MIN_ZERO_GAP = 16
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = PAGE_SIZE
# 4x the default: a reader decodes a chunk (window included) within 4 MiB; zstd's default levels
# find no matches farther back than 2-8 MiB, so larger chunks would not compress better.
MAX_CHUNK_SIZE = 1 << 22
_CHECK_BLOCK = 64 << 10
_SCAN_PAGES = 4096  # 16 MiB
_SEGMENTS = re.compile(rb"\x00+|\x01+|\x02", re.DOTALL)

PageIndex = Struct(
    "encoding" / Int16ul,
    "granule" / Int32ul,
    "extents"
    / PackedArray(
        bounded(Int32ul, MAX_EXTENTS),
        Packed(Struct("address" / Int64ul, "length" / Int64ul, "offset" / Int64ul, "stored" / Int64ul)),
    ),
)


class Extent(NamedTuple):
    """``length`` bytes of the image at ``address``, stored at ``offset`` in the data section."""

    address: int
    length: int
    offset: int
    stored: int


class ImageMap(NamedTuple):
    """A checked index: the data section's encoding, its granule, and the extents in address order."""

    encoding: Encoding
    granule: int
    extents: list[Extent]


@dataclass(frozen=True)
class Region:
    """A region of an image: guest RAM ``[start, start+size)`` or a disk ``[0, size)``."""

    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


def _round_up(value: int, granule: int) -> int:
    return -(-value // granule) * granule


class _ExtentList:
    """Extents in address order, merged when both address and offset continue the last one."""

    def __init__(self) -> None:
        self._addresses: list[int] = []
        self._lengths: list[int] = []
        self._offsets: list[int] = []

    def __len__(self) -> int:
        return len(self._addresses)

    def add(self, address: int, length: int, offset: int) -> None:
        if (
            self._addresses
            and self._addresses[-1] + self._lengths[-1] == address
            and self._offsets[-1] + _round_up(self._lengths[-1], PAGE_SIZE) == offset
        ):
            self._lengths[-1] += length
        else:
            self._addresses.append(address)
            self._lengths.append(length)
            self._offsets.append(offset)

    @property
    def extents(self) -> list[Extent]:
        return [
            Extent(address, length, offset, _round_up(length, PAGE_SIZE))
            for address, length, offset in zip(self._addresses, self._lengths, self._offsets)
        ]


class Output(Protocol):
    """Where an encoder writes its bytes: a binary file, or the writer's batching output."""

    def write(self, data: bytes | memoryview, /) -> object: ...


class RawEncoder:
    """Writes pages to ``out`` (positioned at the page-aligned data start).

    ``out.write`` may keep the views it is given until later, and a dedup match is confirmed byte
    for byte against the page it was stored from: the regions must not change until the image is
    written (a paused guest's RAM, a read-only disk). Runs of fewer than ``min_dedup_run`` pages
    equal to stored ones are stored again (0 turns deduplication off). Runs of fewer than
    ``min_zero_gap`` zero pages between stored pages are stored too (1: every zero page is left out).
    Pages are classified by ``pagescan`` (natively where it can), ``_SCAN_PAGES`` at a time so that
    writing (and the section digest) starts early.
    """

    def __init__(
        self,
        out: Output,
        min_dedup_run: int = MIN_DEDUP_RUN,
        min_zero_gap: int = MIN_ZERO_GAP,
        *,
        native: bool = True,
    ) -> None:
        self._out = out
        self._min_run = min_dedup_run
        self._min_zero_gap = max(1, min_zero_gap)
        self._written = 0
        self._scanner = PageScanner(dedup=min_dedup_run > 0, native=native)
        self._pages = 0  # pages classified so far, over every region
        # Runs of pages stored as the first of their contents: first page number, stored offset.
        self._new_starts: list[int] = []
        self._new_offsets: list[int] = []
        self._list = _ExtentList()

    def _stored_at(self, page: int) -> int:
        """Where page number ``page``, the first of its contents, is stored."""
        run = bisect.bisect_right(self._new_starts, page) - 1
        return self._new_offsets[run] + (page - self._new_starts[run]) * PAGE_SIZE

    def _shareable_run(self, kinds: bytes, refs: array[int], index: int, stored_at: int) -> int:
        """How many pages from ``index`` (a DUP) on would share one run of stored pages (counted up to
        ``min_dedup_run``)."""
        length = 1
        while (
            length < self._min_run
            and index + length < len(kinds)
            and kinds[index + length] == DUP
            and self._stored_at(refs[index + length]) == stored_at + length * PAGE_SIZE
        ):
            length += 1
        return length

    def add_region(self, start: int, data: memoryview) -> None:
        """Encode one region: ``data`` is never copied whole."""
        size = len(data)
        pending_new = -1  # first page of a run of new pages not yet written
        run: list[tuple[int, int]] = []  # (page offset in region, stored offset) equal pages

        held = [0, 0]  # data[held[0]:held[1]] is stored but not yet written: adjacent pieces go as one

        def write_held() -> None:
            if held[1] > held[0]:
                self._out.write(data[held[0] : held[1]])
            held[:] = [0, 0]

        def flush_new(end: int) -> None:
            nonlocal pending_new
            if pending_new < 0:
                return
            length = end - pending_new
            self._list.add(start + pending_new, length, self._written)
            if held[1] != pending_new:
                write_held()
                held[0] = pending_new
            held[1] = end
            self._written += length
            if length % PAGE_SIZE:
                write_held()
                padding = PAGE_SIZE - length % PAGE_SIZE
                self._out.write(bytes(padding))
                self._written += padding
            pending_new = -1

        def flush_run() -> None:
            nonlocal pending_new
            if run and len(run) >= self._min_run:
                first, stored_at = run[0]
                self._list.add(start + first, len(run) * PAGE_SIZE, stored_at)
            elif run:
                pending_new = run[0][0]
                flush_new(run[-1][0] + PAGE_SIZE)
            run.clear()

        zeros_from = -1  # first page of the current run of zero pages
        min_zero_gap = self._min_zero_gap * PAGE_SIZE
        # Each segment is a run of zero pages, a run of new pages, or one page equal to an earlier one:
        # handling a run at once does what handling its pages one by one would.
        for scan_at in range(0, size, _SCAN_PAGES * PAGE_SIZE):
            kinds, refs = self._scanner.classify(data[scan_at : scan_at + _SCAN_PAGES * PAGE_SIZE], self._pages)
            first_page = self._pages
            self._pages += len(kinds)
            skip_to = 0
            for segment in _SEGMENTS.finditer(kinds):
                kind, index = kinds[segment.start()], segment.start()
                if index < skip_to:
                    continue
                pos = scan_at + index * PAGE_SIZE
                if kind == ZERO:
                    if zeros_from < 0:
                        zeros_from = pos
                    if min(scan_at + segment.end() * PAGE_SIZE, size) - zeros_from >= min_zero_gap:
                        flush_new(zeros_from)
                    flush_run()
                    continue
                zeros_from = -1
                if kind == DUP and len(self._list) < DEDUP_EXTENTS:
                    stored_at = self._stored_at(refs[index])
                    # A run too short to share, seen whole inside this scan, is stored again: written
                    # with the new pages before it (the same bytes and extents as writing them one
                    # after the other, page by page). Not where the one extent that write may add
                    # reaches DEDUP_EXTENTS, which would stop sharing within the run.
                    if not run and len(self._list) + 1 < DEDUP_EXTENTS:
                        length = self._shareable_run(kinds, refs, index, stored_at)
                        if length < self._min_run and index + length < len(kinds):
                            if pending_new < 0:
                                pending_new = pos
                            flush_new(pos + length * PAGE_SIZE)
                            skip_to = index + length
                            continue
                    flush_new(pos)
                    if run and not (run[-1][0] + PAGE_SIZE == pos and run[-1][1] + PAGE_SIZE == stored_at):
                        flush_run()
                    run.append((pos, stored_at))
                    continue
                flush_run()
                if pending_new < 0:
                    pending_new = pos
                if kind == NEW:
                    self._new_starts.append(first_page + index)
                    self._new_offsets.append(self._written + (pos - pending_new))
        flush_new(zeros_from if zeros_from >= 0 else size)
        flush_run()
        write_held()

    def finish(self) -> list[Extent]:
        """The extents written so far."""
        self._scanner.close()
        return self._list.extents


def _chunks(regions: Sequence[tuple[int, memoryview]], granule: int) -> Iterator[tuple[int, memoryview]]:
    for start, data in regions:
        for pos in range(0, len(data), granule):
            yield start + pos, data[pos : pos + granule]


def encode_zstd(
    out: Output,
    regions: Sequence[tuple[int, memoryview]],
    granule: int,
    level: int,
    threads: int,
) -> list[Extent]:
    """Compress each ``granule`` chunk into its own frame, ``threads`` at a time, in address order."""
    import zstandard

    local = threading.local()

    def compress(chunk: memoryview) -> bytes | None:
        if chunk.tobytes() == bytes(len(chunk)):
            return None
        if not hasattr(local, "cctx"):
            local.cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        cctx: zstandard.ZstdCompressor = local.cctx
        return cctx.compress(chunk)

    extents: list[Extent] = []
    written = 0
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        chunks = list(_chunks(regions, granule))
        window = 4 * max(1, threads)
        for first in range(0, len(chunks), window):
            batch = chunks[first : first + window]
            for (address, chunk), frame in zip(batch, pool.map(compress, [c for _, c in batch])):
                if frame is None:
                    continue
                out.write(frame)
                extents.append(Extent(address, len(chunk), written, len(frame)))
                written += len(frame)
    return extents


def check_index(
    index: Container,
    encoding: Encoding,
    regions: Sequence[Region],
    data_length: int,
    what: str,
) -> ImageMap:
    """Validate a parsed PageIndex against its regions and data section.

    ``what`` names the image ("ram" or "disk") in error codes: ``map-outside-ram`` etc.
    """
    if index.encoding != encoding:
        raise FormatError(
            "encoding-mismatch", f"{what} index says encoding {index.encoding}, data section {int(encoding)}"
        )
    granule = index.granule
    if encoding == Encoding.RAW_PAGES and granule != PAGE_SIZE:
        raise FormatError("bad-granule", f"{what} raw page size {granule} is not {PAGE_SIZE}")
    if encoding == Encoding.ZSTD_CHUNKS and not (
        MIN_CHUNK_SIZE <= granule <= MAX_CHUNK_SIZE and granule & (granule - 1) == 0
    ):
        raise FormatError("bad-granule", f"{what} zstd chunk size {granule} is not a power of two in [4 KiB, 4 MiB]")
    bounds = sorted((r.start, r.end) for r in regions)
    raw = encoding == Encoding.RAW_PAGES
    extents: list[Extent] = []
    previous_end = 0
    slot = 0
    for item in index.extents:
        extent = Extent(item["address"], item["length"], item["offset"], item["stored"])
        address, length, offset, stored = extent
        if length == 0 or address < previous_end:
            raise FormatError("map-overlap", f"{what} extent at {address:#x} is empty, unordered or overlaps")
        while slot < len(bounds) and bounds[slot][1] <= address:
            slot += 1
        start, end = bounds[slot] if slot < len(bounds) else (0, 0)
        if not start <= address or address + length > end:
            raise FormatError(
                "map-outside-" + what,
                f"{what} extent {address:#x}+{length:#x} lies outside the {what}",
            )
        if offset + stored > data_length:
            raise FormatError("map-outside-file", f"{what} extent at {address:#x} points past its data section")
        if raw:
            tail = address + length == end
            if (
                (address - start) % PAGE_SIZE
                or offset % PAGE_SIZE
                or (length % PAGE_SIZE and not tail)
                or stored != _round_up(length, PAGE_SIZE)
            ):
                raise FormatError("map-misaligned", f"{what} raw extent at {address:#x} is not page-aligned")
        elif (address - start) % granule or length != min(granule, end - address) or stored == 0:
            raise FormatError("map-misaligned", f"{what} zstd chunk at {address:#x} is not a whole chunk")
        elif stored > zstd_bound(length):
            raise FormatError(
                "bad-chunk",
                f"{what} zstd chunk at {address:#x} claims {stored} bytes, more than a frame"
                f" of {length} bytes can take",
            )
        previous_end = address + length
        extents.append(extent)
    return ImageMap(encoding, granule, extents)


def zstd_bound(length: int) -> int:
    """The most bytes one zstd frame of ``length`` bytes can take (zstd's ZSTD_COMPRESSBOUND)."""
    small = (128 << 10) - length >> 11 if length < 128 << 10 else 0
    return length + (length >> 8) + small


def split_extents(image: ImageMap, block: int) -> Iterator[Extent]:
    """Raw extents cut into pieces of at most ``block`` bytes (a page multiple); zstd chunks as they are."""
    for extent in image.extents:
        if image.encoding != Encoding.RAW_PAGES or extent.length <= block:
            yield extent
            continue
        for start in range(0, extent.length, block):
            length = min(block, extent.length - start)
            yield Extent(extent.address + start, length, extent.offset + start, _round_up(length, PAGE_SIZE))


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_FIELD_SIZES = (0, 1, 2, 4)  # a Dictionary_ID's bytes by its flag (RFC 8878 §3.1.1.1.1)


def zstd_frame_size(frame: bytes) -> int:
    """How many bytes the zstd frame at the start of ``frame`` takes, by its header and block
    headers (RFC 8878 §3.1.1); 0 if it is not a whole frame (a skippable frame is not one)."""
    if frame[:4] != _ZSTD_MAGIC or len(frame) < 5:
        return 0
    descriptor = frame[4]
    single_segment, checksum = descriptor >> 5 & 1, descriptor >> 2 & 1
    content_size = (single_segment, 2, 4, 8)[descriptor >> 6]
    at = 5 + (not single_segment) + _ZSTD_FIELD_SIZES[descriptor & 3] + content_size
    while at + 3 <= len(frame):
        header = int.from_bytes(frame[at : at + 3], "little")
        kind, size = header >> 1 & 3, header >> 3
        if kind == 3:  # reserved
            return 0
        at += 3 + (1 if kind == 1 else size)
        if header & 1:  # the last block
            at += 4 * checksum
            return at if at <= len(frame) else 0
    return 0


def _decode_frame(
    dctx: zstandard.ZstdDecompressor, frame: bytes, extent: Extent, sink: Callable[[int], memoryview]
) -> None:
    """Decode one chunk's frame into ``sink(bytes done so far)``, piece by piece: exactly its length."""
    import zstandard

    if zstd_frame_size(frame) != len(frame):
        raise FormatError("bad-chunk", f"zstd chunk at {extent.address:#x} is not one complete zstd frame")
    done = 0
    try:
        with dctx.stream_reader(frame, read_across_frames=False) as reader:
            while done < extent.length and (n := reader.readinto(sink(done))):
                done += n
            extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise FormatError("bad-chunk", f"zstd chunk at {extent.address:#x} does not decode: {exc}") from exc
    if done != extent.length or extra:
        raise FormatError("bad-chunk", f"zstd chunk at {extent.address:#x} does not decode to {extent.length} bytes")


def _decompressor(granule: int) -> zstandard.ZstdDecompressor:
    import zstandard

    # A frame may not ask for a window beyond its chunk: decoding memory stays within one granule.
    return zstandard.ZstdDecompressor(max_window_size=granule)


def decode_into(
    fd: int,
    data_offset: int,
    image: ImageMap,
    target: Callable[[int, int], memoryview],
    threads: int,
) -> None:
    """Decode every extent into ``target(address, length)``; ranges without an extent are not touched."""
    local = threading.local()

    def decode(extent: Extent) -> None:
        view = target(extent.address, extent.length)
        position = data_offset + extent.offset
        if image.encoding == Encoding.RAW_PAGES:
            while view:  # a single read stops short of 2 GiB
                got = os.preadv(fd, [view], position)
                if got == 0:
                    raise FormatError("truncated", f"file ends at {position:#x}, inside guest data")
                view, position = view[got:], position + got
            return
        if not hasattr(local, "dctx"):
            local.dctx = _decompressor(image.granule)
        _decode_frame(local.dctx, os.pread(fd, extent.stored, position), extent, lambda done: view[done:])

    if threads <= 1:
        for extent in image.extents:
            decode(extent)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(decode, image.extents):
            pass


def check_chunks(fd: int, data_offset: int, image: ImageMap) -> None:
    """Decode every zstd chunk of ``image`` and drop the output: memory stays one small block."""
    dctx = _decompressor(image.granule)
    scratch = memoryview(bytearray(_CHECK_BLOCK))
    for extent in image.extents:
        frame = os.pread(fd, extent.stored, data_offset + extent.offset)

        def sink(done: int, length: int = extent.length) -> memoryview:
            return scratch[: length - done]

        _decode_frame(dctx, frame, extent, sink)
