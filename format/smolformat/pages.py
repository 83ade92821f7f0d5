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

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

import zstandard
from construct import Int16ul, Int32ul, Int64ul, Struct

from .errors import FormatError
from .layout import PAGE_SIZE, Encoding
from .limits import bounded
from .packed import Packed, PackedArray

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
_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_BLOCK_SIZE = 16 * PAGE_SIZE
_ZERO_BLOCK = bytes(_ZERO_BLOCK_SIZE)

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
        self.extents: list[Extent] = []

    def add(self, address: int, length: int, offset: int) -> None:
        last = self.extents[-1] if self.extents else None
        if last and last.address + last.length == address and last.offset + last.stored == offset:
            merged = last.length + length
            self.extents[-1] = last._replace(length=merged, stored=_round_up(merged, PAGE_SIZE))
        else:
            self.extents.append(Extent(address, length, offset, _round_up(length, PAGE_SIZE)))


class RawEncoder:
    """Writes pages to ``out`` (positioned at the page-aligned data start).

    ``out.write`` may keep the views it is given until later, and a dedup match is confirmed byte
    for byte against the page it was stored from: the regions must not change until the image is
    written (a paused guest's RAM, a read-only disk). Runs of fewer than ``min_dedup_run`` pages
    equal to stored ones are stored again (0 turns deduplication off). Runs of fewer than
    ``min_zero_gap`` zero pages between stored pages are stored too (1: every zero page is left out).
    """

    def __init__(
        self,
        out: BinaryIO,
        min_dedup_run: int = MIN_DEDUP_RUN,
        min_zero_gap: int = MIN_ZERO_GAP,
    ) -> None:
        self._out = out
        self._min_run = min_dedup_run
        self._min_zero_gap = max(1, min_zero_gap)
        self._written = 0
        # A page's hash -> where it is stored, and the region and offset it was stored from.
        self._seen: dict[int, tuple[int, memoryview, int]] = {}
        self._list = _ExtentList()

    def add_region(self, start: int, data: memoryview) -> None:
        """Encode one region: ``data`` is read a block at a time and never copied whole."""
        size = len(data)
        pending_new = -1  # first page of a run of new pages not yet written
        run: list[tuple[int, int]] = []  # (page offset in region, stored offset) equal pages

        def flush_new(end: int) -> None:
            nonlocal pending_new
            if pending_new < 0:
                return
            chunk = data[pending_new:end]
            self._list.add(start + pending_new, len(chunk), self._written)
            self._out.write(chunk)
            self._written += len(chunk)
            if len(chunk) % PAGE_SIZE:
                padding = PAGE_SIZE - len(chunk) % PAGE_SIZE
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

        def zero_pages(at: int, end: int) -> None:
            nonlocal zeros_from
            if zeros_from < 0:
                zeros_from = at
            if end - zeros_from >= min_zero_gap:
                flush_new(zeros_from)
            flush_run()

        min_zero_gap = self._min_zero_gap * PAGE_SIZE
        seen = self._seen
        # Most of a guest's RAM is zero: a block at a time, page by page only inside non-zero blocks.
        for block_at in range(0, size, _ZERO_BLOCK_SIZE):
            block = data[block_at : block_at + _ZERO_BLOCK_SIZE].tobytes()
            if block == _ZERO_BLOCK[: len(block)]:
                zero_pages(block_at, block_at + len(block))
                continue
            for offset in range(0, len(block), PAGE_SIZE):
                pos = block_at + offset
                raw = block[offset : offset + PAGE_SIZE]
                if raw == _ZERO_PAGE[: len(raw)]:
                    zero_pages(pos, pos + len(raw))
                    continue
                zeros_from = -1
                # Only a lookup key: a candidate is confirmed byte for byte before it is shared.
                digest = hash(raw) if self._min_run else 0
                found = seen.get(digest)
                if (
                    found is not None
                    and len(raw) == PAGE_SIZE
                    and len(self._list.extents) < DEDUP_EXTENTS
                    and found[1][found[2] : found[2] + PAGE_SIZE].tobytes() == raw
                ):
                    stored_at = found[0]
                    flush_new(pos)
                    if run and not (run[-1][0] + PAGE_SIZE == pos and run[-1][1] + PAGE_SIZE == stored_at):
                        flush_run()
                    run.append((pos, stored_at))
                    continue
                flush_run()
                if pending_new < 0:
                    pending_new = pos
                if self._min_run:
                    seen.setdefault(digest, (self._written + (pos - pending_new), data, pos))
        flush_new(zeros_from if zeros_from >= 0 else size)
        flush_run()

    def finish(self) -> list[Extent]:
        """The extents written so far."""
        return self._list.extents


def _chunks(regions: Sequence[tuple[int, memoryview]], granule: int) -> Iterator[tuple[int, memoryview]]:
    for start, data in regions:
        for pos in range(0, len(data), granule):
            yield start + pos, data[pos : pos + granule]


def encode_zstd(
    out: BinaryIO,
    regions: Sequence[tuple[int, memoryview]],
    granule: int,
    level: int,
    threads: int,
) -> list[Extent]:
    """Compress each ``granule`` chunk into its own frame, ``threads`` at a time, in address order."""
    local = threading.local()

    def compress(chunk: memoryview) -> bytes | None:
        if chunk.tobytes() == bytes(len(chunk)):
            return None
        if not hasattr(local, "cctx"):
            local.cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        return local.cctx.compress(chunk)

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
    index: dict,
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
        raise FormatError(
            "bad-granule", f"{what} zstd chunk size {granule} is not a power of two in [4 KiB, 4 MiB]"
        )
    ordered = sorted(regions, key=lambda r: r.start)
    extents: list[Extent] = []
    previous_end = 0
    slot = 0
    for item in index.extents:
        extent = Extent(item.address, item.length, item.offset, item.stored)
        if extent.length == 0 or extent.address < previous_end:
            raise FormatError(
                "map-overlap", f"{what} extent at {extent.address:#x} is empty, unordered or overlaps"
            )
        while slot < len(ordered) and ordered[slot].end <= extent.address:
            slot += 1
        region = ordered[slot] if slot < len(ordered) else None
        if region is None or extent.address < region.start or extent.address + extent.length > region.end:
            raise FormatError(
                "map-outside-" + what,
                f"{what} extent {extent.address:#x}+{extent.length:#x} lies outside the {what}",
            )
        if extent.offset + extent.stored > data_length:
            raise FormatError(
                "map-outside-file", f"{what} extent at {extent.address:#x} points past its data section"
            )
        if encoding == Encoding.RAW_PAGES:
            tail = extent.address + extent.length == region.end
            if (
                (extent.address - region.start) % PAGE_SIZE
                or extent.offset % PAGE_SIZE
                or (extent.length % PAGE_SIZE and not tail)
                or extent.stored != _round_up(extent.length, PAGE_SIZE)
            ):
                raise FormatError(
                    "map-misaligned", f"{what} raw extent at {extent.address:#x} is not page-aligned"
                )
        elif (
            (extent.address - region.start) % granule
            or extent.length != min(granule, region.end - extent.address)
            or extent.stored == 0
        ):
            raise FormatError(
                "map-misaligned", f"{what} zstd chunk at {extent.address:#x} is not a whole chunk"
            )
        elif extent.stored > zstd_bound(extent.length):
            raise FormatError(
                "bad-chunk",
                f"{what} zstd chunk at {extent.address:#x} claims {extent.stored} bytes, more than a frame"
                f" of {extent.length} bytes can take",
            )
        previous_end = extent.address + extent.length
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


def _decode_frame(
    dctx: zstandard.ZstdDecompressor, frame: bytes, extent: Extent, sink: Callable[[int], memoryview]
) -> None:
    """Decode one chunk's frame into ``sink(bytes done so far)``, piece by piece: exactly its length."""
    done = 0
    try:
        with dctx.stream_reader(frame, read_across_frames=False) as reader:
            while done < extent.length and (n := reader.readinto(sink(done))):
                done += n
            extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise FormatError("bad-chunk", f"zstd chunk at {extent.address:#x} does not decode: {exc}") from exc
    if done != extent.length or extra:
        raise FormatError(
            "bad-chunk", f"zstd chunk at {extent.address:#x} does not decode to {extent.length} bytes"
        )


def _decompressor(granule: int) -> zstandard.ZstdDecompressor:
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
        _decode_frame(dctx, frame, extent, lambda done: scratch[: extent.length - done])
