"""Opening a bundle: every structural check up front, bulk data left on disk until asked for.

``open_bundle(path)`` checks the header, the section table and every small section (their digests
too), and parses them; it never reads nor hashes RAM, disks, kernel or initrd. ``Bundle.verify()``
hashes everything and decodes every zstd chunk.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, NamedTuple

from construct import ConstructError

from . import checks
from .errors import FormatError, brief
from .files import open_regular
from .layout import (
    CHECKSUMMED_HEADER,
    DIGEST_SIZE,
    ENTRY_SIZE,
    HEADER_SIZE,
    MAGIC,
    MAX_SECTIONS,
    PAGE_SIZE,
    SECTION_ALIGN,
    SMOLPACK_FOOTER_SIZE,
    SMOLPACK_MAGIC,
    VERSION_MAJOR,
    Encoding,
    Header,
    SectionEntry,
    SectionFlag,
    SectionKind,
)
from .pages import ImageMap, Region, check_chunks, check_index, decode_into, split_extents
from .payloads import payload

_PARSE_ERRORS = (ConstructError, struct.error, ValueError, OverflowError, IndexError, KeyError, TypeError)
_SINGLETONS = {
    SectionKind.CONFIG,
    SectionKind.METADATA,
    SectionKind.VM_STATE,
    SectionKind.DEVICES,
    SectionKind.MEMORY_INDEX,
    SectionKind.MEMORY_DATA,
    SectionKind.KERNEL,
    SectionKind.INITRD,
    SectionKind.SIGNATURE,
    SectionKind.WORKING_SET,
}
_REQUIRED = {
    SectionKind.CONFIG,
    SectionKind.VM_STATE,
    SectionKind.DEVICES,
    SectionKind.MEMORY_INDEX,
    SectionKind.MEMORY_DATA,
}
_IMAGE_DATA = {SectionKind.MEMORY_DATA, SectionKind.DISK_DATA}
_BLOBS = {SectionKind.KERNEL, SectionKind.INITRD}
_ENCODING_NAMES: dict[int, str] = {Encoding.RAW_PAGES: "raw", Encoding.ZSTD_CHUNKS: "zstd"}
_HASH_BLOCK = 1 << 20
_COPY_BLOCK = 1 << 20
# STRUCT sections are read whole: none comes near this (a vCPU with a 1 MiB XSAVE area is the largest)
MAX_STRUCT_SECTION = 64 << 20


class SectionInfo(NamedTuple):
    """One section table entry; ``kind`` is a ``SectionKind`` or, for an unknown kind, an int."""

    kind: SectionKind | int
    flags: int
    encoding: Encoding | int
    index: int  # type: ignore[assignment]  # the spec's field name; it shadows tuple.index
    offset: int
    length: int
    logical_length: int
    digest: bytes


class MemoryExtent(NamedTuple):
    """Guest RAM ``[guest_phys_addr, +length)`` is at ``file_offset`` in the bundle (page-aligned)."""

    guest_phys_addr: int
    length: int
    file_offset: int


class DiskExtent(NamedTuple):
    """Disk bytes ``[disk_offset, +length)`` are at ``file_offset`` in the bundle."""

    disk_offset: int
    length: int
    file_offset: int


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise FormatError("truncated", f"file ends before byte {offset + length}")
    return data


def _not_a_bundle(fd: int, size: int, head: bytes) -> FormatError:
    tail = os.pread(fd, SMOLPACK_FOOTER_SIZE, max(0, size - SMOLPACK_FOOTER_SIZE))
    if SMOLPACK_MAGIC in tail:
        return FormatError("smolpack", "this is a smolvm SMOLPACK disk pack, not a smolvmm machine bundle")
    if 0 < size < len(MAGIC) and MAGIC.startswith(head):
        return FormatError("truncated", f"file ends after {size} bytes, inside the header")
    return FormatError("bad-magic", "not a .smolmachine bundle (bad magic)")


def _read_table(fd: int) -> tuple[Any, bytes, list[SectionInfo]]:
    size = os.fstat(fd).st_size
    head = os.pread(fd, HEADER_SIZE, 0)
    if head[: len(MAGIC)] != MAGIC:
        raise _not_a_bundle(fd, size, head)
    if len(head) < HEADER_SIZE:
        raise FormatError("truncated", f"file ends after {size} bytes, inside the header")
    header = Header.parse(head)
    if header.version_major != VERSION_MAJOR:
        raise FormatError(
            "unsupported-version",
            f"bundle format version {header.version_major}.{header.version_minor} is not supported"
            f" (this reader: {VERSION_MAJOR}.x)",
        )
    if header.header_size != HEADER_SIZE or header.entry_size < ENTRY_SIZE or header.entry_size % SECTION_ALIGN:
        raise FormatError(
            "bad-header", f"header size {header.header_size} / entry size {header.entry_size} not supported"
        )
    if header.section_count > MAX_SECTIONS:
        raise FormatError("bad-header", f"{header.section_count} sections: more than any bundle holds ({MAX_SECTIONS})")
    if size < header.file_size:
        raise FormatError("truncated", f"file has {size} bytes, its header says {header.file_size}")
    if size > header.file_size:
        raise FormatError("trailing-data", f"file has {size - header.file_size} bytes after its end")
    table_length = header.section_count * header.entry_size
    if header.table_offset + table_length != size:
        raise FormatError("section-table-outside-file", "the section table does not end the file")
    if header.table_offset < HEADER_SIZE or header.table_offset % SECTION_ALIGN:
        raise FormatError(
            "misaligned",
            f"the section table at {header.table_offset:#x} is not {SECTION_ALIGN}-byte aligned past the header",
        )
    table = _pread(fd, table_length, header.table_offset)
    checksum = hashlib.blake2b(head[:CHECKSUMMED_HEADER] + table, digest_size=DIGEST_SIZE).digest()
    if checksum != header.checksum:
        raise FormatError("bad-checksum", "header or section table checksum mismatch")
    sections = []
    for start in range(0, table_length, header.entry_size):
        entry = SectionEntry.unpack_from(table, start)
        kind = SectionKind(entry.kind) if entry.kind in SectionKind._value2member_map_ else entry.kind
        encoding = Encoding(entry.encoding) if entry.encoding in Encoding._value2member_map_ else entry.encoding
        sections.append(
            SectionInfo(
                kind,
                entry.flags,
                encoding,
                entry.index,
                entry.offset,
                entry.length,
                entry.logical_length,
                entry.digest,
            )
        )
    _check_placement(sections, header.table_offset)
    return header, checksum, sections


def _check_placement(sections: Sequence[SectionInfo], table_offset: int) -> None:
    for s in sections:
        if s.offset + s.length >= 1 << 64 or s.logical_length >= 1 << 63:
            raise FormatError("length-overflow", f"section {_name(s)} offset+length overflows 64 bits")
        if s.offset < HEADER_SIZE or s.offset + s.length > table_offset:
            raise FormatError("section-outside-file", f"section {_name(s)} lies outside the file's data area")
        align = PAGE_SIZE if s.kind in _IMAGE_DATA and s.encoding == Encoding.RAW_PAGES else SECTION_ALIGN
        if s.offset % align:
            raise FormatError("misaligned", f"section {_name(s)} at {s.offset:#x} is not {align}-byte aligned")
    previous: SectionInfo | None = None  # of the sections before, the one that ends last
    for s in sorted(sections, key=lambda s: s.offset):
        if not s.length:
            continue  # an empty section holds no byte: it overlaps nothing
        if previous and s.offset < previous.offset + previous.length:
            raise FormatError("section-overlap", f"sections {_name(previous)} and {_name(s)} overlap")
        if not previous or s.offset + s.length > previous.offset + previous.length:
            previous = s


def _check_known(s: SectionInfo) -> None:
    """A known kind's entry is as §4.1 says: index, encoding of a blob, logical length."""
    if s.kind in _SINGLETONS and s.index:
        raise FormatError("bad-section", f"section {_name(s)} must have index 0: there is one of its kind")
    if s.kind in _BLOBS and s.encoding != Encoding.BYTES:
        raise FormatError("encoding-mismatch", f"section {_name(s)} must be BYTES-encoded")
    if s.kind not in _IMAGE_DATA and s.kind != SectionKind.SIGNATURE and s.logical_length != s.length:
        raise FormatError(
            "bad-section", f"section {_name(s)} has logical length {s.logical_length}, not its length {s.length}"
        )


def _name(section: SectionInfo) -> str:
    kind = section.kind.name.lower() if isinstance(section.kind, SectionKind) else f"kind-{section.kind}"
    return f"{kind}#{section.index}"


class DiskImage:
    """Base disk ``index`` of a bundle: ``size`` bytes, stored raw or as zstd chunks."""

    def __init__(self, bundle: Bundle, index: int, data: SectionInfo, image: ImageMap) -> None:
        self._bundle = bundle
        self.index = index
        self.size = data.logical_length
        self.encoding = _ENCODING_NAMES[data.encoding]
        self._data = data
        self._image = image

    def extents(self) -> list[DiskExtent]:
        """Where the disk's non-zero bytes lie in the bundle file (raw encoding only)."""
        if self._data.encoding != Encoding.RAW_PAGES:
            raise FormatError(
                "wrong-encoding",
                f"disk {self.index} is zstd-compressed; `smolvmm pack --raw` makes it mappable",
            )
        return [DiskExtent(e.address, e.length, self._data.offset + e.offset) for e in self._image.extents]

    def read_into(self, buffer: Any, threads: int = 2) -> None:
        """Decode the disk into ``buffer`` (``size`` bytes, zero-filled: zero ranges are skipped)."""
        view = memoryview(buffer).cast("B")
        if len(view) != self.size:
            raise ValueError(f"buffer has {len(view)} bytes, disk {self.index} has {self.size}")
        decode_into(
            self._bundle.fileno(),
            self._data.offset,
            self._image,
            lambda address, length: view[address : address + length],
            threads,
        )

    def materialise(self, path: str | os.PathLike[str]) -> None:
        """Write the disk to a new sparse file at ``path``, one chunk (at most 1 MiB raw) at a time."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, self.size)
            for address, chunk in stored_pieces(self._bundle.fileno(), self._data, self._image):
                os.pwrite(fd, chunk, address)
        finally:
            os.close(fd)


def _whole(chunk: bytearray) -> Callable[[int, int], memoryview]:
    """A sink that decodes a piece into ``chunk``, all of it."""
    return lambda _address, _length: memoryview(chunk)


def stored_pieces(fd: int, data: SectionInfo, image: ImageMap) -> Iterator[tuple[int, bytearray]]:
    """(address, bytes) of every stored piece of an image, decoded, in address order: a zstd chunk
    or at most 1 MiB of raw pages. Image bytes outside them are zero."""
    for piece in split_extents(image, _COPY_BLOCK):
        chunk = bytearray(piece.length)
        decode_into(
            fd,
            data.offset,
            image._replace(extents=[piece]),
            _whole(chunk),
            1,
        )
        yield piece.address, chunk


class Bundle:
    """An open .smolmachine file. Use as a context manager (it holds the file descriptor).

    Parsed at open: ``config``, ``metadata`` (or None; ``labels`` as a dict), ``vcpus`` (by vCPU
    id), ``vm_state``, ``devices``, ``signatures`` (empty if unsigned), ``sections``, ``digest``. On demand: ``memory_extents()``, ``read_memory_into()``,
    ``disk(i)``, ``kernel``, ``initrd``, ``unknown_sections()``, ``verify()``.
    """

    def __init__(self, path: str | os.PathLike[str], on_config: Callable[[Any], None] | None = None) -> None:
        self.path = os.fspath(path)
        self._fd = open_regular(self.path)
        try:
            self._open(on_config)
        except BaseException:
            os.close(self._fd)
            raise

    def _open(self, on_config: Callable[[Any], None] | None) -> None:
        header, self.digest, self.sections = _read_table(self._fd)
        self._table_offset = header.table_offset
        self.version = (header.version_major, header.version_minor)
        by_kind: dict[SectionKind, list[SectionInfo]] = {}
        seen: set[tuple[SectionKind, int]] = set()
        for s in self.sections:
            if not isinstance(s.kind, SectionKind):
                if s.flags & SectionFlag.REQUIRED:
                    raise FormatError(
                        "unknown-required-section", f"required section {_name(s)} is unknown to this reader"
                    )
                continue
            _check_known(s)
            if (s.kind, s.index) in seen:  # singletons all have index 0 (_check_known)
                code = "duplicate-vcpu" if s.kind == SectionKind.VCPU_STATE else "duplicate-section"
                raise FormatError(code, f"section {_name(s)} appears twice")
            seen.add((s.kind, s.index))
            by_kind.setdefault(s.kind, []).append(s)
        for kind in _REQUIRED:
            if kind not in by_kind:
                raise FormatError("missing-section", f"the bundle has no {kind.name.lower()} section")
        self._by_kind = by_kind
        self.config = self._parse(by_kind[SectionKind.CONFIG][0])
        regions = checks.ram_regions(self.config)
        if on_config is not None:
            on_config(self.config)
        arch = self.config.arch
        meta = by_kind.get(SectionKind.METADATA)
        self.metadata = self._parse(meta[0]) if meta else None
        self.vm_state = self._parse(by_kind[SectionKind.VM_STATE][0], arch)
        vcpu_sections = sorted(by_kind.get(SectionKind.VCPU_STATE, []), key=lambda s: s.index)
        checks.check_vcpu_ids(self.config, (s.index for s in vcpu_sections))
        self.vcpus = [self._parse(s, arch) for s in vcpu_sections]
        self.devices = self._parse(by_kind[SectionKind.DEVICES][0])
        signature = by_kind.get(SectionKind.SIGNATURE)
        self.signatures = list(self._parse(signature[0])) if signature else []
        working_set = by_kind.get(SectionKind.WORKING_SET)
        self.working_set = list(self._parse(working_set[0])) if working_set else []
        checks.check_working_set(regions, self.working_set)
        disk_ids = checks.check_devices(self.config, self.devices)
        self._memory = self._image(SectionKind.MEMORY_DATA, SectionKind.MEMORY_INDEX, 0, regions, "ram")
        if self._memory[0].logical_length != sum(r.size for r in regions):
            raise FormatError("bad-section", "memory data size does not match the configured RAM")
        self._disks: dict[int, tuple[SectionInfo, ImageMap]] = {}
        for s in by_kind.get(SectionKind.DISK_DATA, []):
            self._disks[s.index] = self._image(
                SectionKind.DISK_DATA, SectionKind.DISK_INDEX, s.index, [Region(0, s.logical_length)], "disk"
            )
        if len(by_kind.get(SectionKind.DISK_INDEX, [])) != len(self._disks) or sorted(disk_ids) != sorted(self._disks):
            raise FormatError(
                "missing-section", f"disk sections {brief(self._disks)} do not match block devices' disks"
            )

    def _section_bytes(self, s: SectionInfo) -> bytes:
        data = _pread(self._fd, s.length, s.offset)
        if hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest() != s.digest:
            raise FormatError("bad-digest", f"section {_name(s)} does not match its digest")
        return data

    def _parse(self, s: SectionInfo, arch: str = "") -> Any:
        if s.encoding != Encoding.STRUCT:
            raise FormatError("encoding-mismatch", f"section {_name(s)} must be STRUCT-encoded")
        if s.length > MAX_STRUCT_SECTION:
            raise FormatError("bad-section", f"section {_name(s)} is {s.length} bytes, more than any valid one")
        data = self._section_bytes(s)
        try:
            return payload(s.kind, arch).parse(data)
        except _PARSE_ERRORS as exc:
            raise FormatError("bad-section", f"section {_name(s)} does not parse: {str(exc).splitlines()[-1]}") from exc

    def _image(
        self, data_kind: SectionKind, index_kind: SectionKind, index: int, regions: list[Region], what: str
    ) -> tuple[SectionInfo, ImageMap]:
        data = next((s for s in self._by_kind.get(data_kind, []) if s.index == index), None)
        index_section = next((s for s in self._by_kind.get(index_kind, []) if s.index == index), None)
        if data is None or index_section is None:
            raise FormatError("missing-section", f"{what} {index} lacks its data or index section")
        if data.encoding not in _ENCODING_NAMES:
            raise FormatError("encoding-mismatch", f"section {_name(data)} has unknown encoding {int(data.encoding)}")
        return data, check_index(self._parse(index_section), Encoding(data.encoding), regions, data.length, what)

    @property
    def memory_encoding(self) -> str:
        """ "raw" or "zstd"."""
        return _ENCODING_NAMES[self._memory[0].encoding]

    def memory_extents(self) -> list[MemoryExtent]:
        """Where guest RAM lies in the file, to ``mmap(MAP_FIXED|MAP_PRIVATE)`` onto guest RAM.

        Guest pages in no extent are zero. Raw encoding only.
        """
        data, image = self._memory
        if data.encoding != Encoding.RAW_PAGES:
            raise FormatError(
                "wrong-encoding", "guest memory is zstd-compressed; `smolvmm pack --raw` makes it mappable"
            )
        return [MemoryExtent(e.address, e.length, data.offset + e.offset) for e in image.extents]

    def read_memory_into(self, memory: Sequence[Any], threads: int = 2) -> None:
        """Decode guest RAM into ``memory``: one zero-filled writable buffer per ``config.ram`` region.

        Zero ranges are not written, so fresh anonymous mappings stay unallocated there.
        """
        views = [(r.gpa, memoryview(buf).cast("B")) for r, buf in zip(self.config.ram, memory, strict=True)]
        for (gpa, view), region in zip(views, self.config.ram):
            if len(view) != region.size:
                raise ValueError(f"buffer for RAM at {gpa:#x} has {len(view)} bytes, not {region.size}")

        def target(address: int, length: int) -> memoryview:
            for gpa, view in views:
                if gpa <= address < gpa + len(view):
                    return view[address - gpa : address - gpa + length]
            raise AssertionError("extent outside RAM passed the index checks")

        data, image = self._memory
        decode_into(self._fd, data.offset, image, target, threads)

    def images(self) -> list[tuple[SectionInfo, ImageMap]]:
        """Every image's data section and checked index: guest RAM first, then disks by number."""
        return [self._memory, *(self._disks[i] for i in sorted(self._disks))]

    @property
    def disk_count(self) -> int:
        """How many base disks the bundle holds."""
        return len(self._disks)

    def disk(self, index: int) -> DiskImage:
        """Base disk ``index`` (the ``disk`` parameter of a virtio-blk device)."""
        if index not in self._disks:
            raise IndexError(f"bundle has no disk {index}")
        data, image = self._disks[index]
        return DiskImage(self, index, data, image)

    def image_pieces(self, section: SectionInfo) -> Iterator[tuple[int, bytearray]]:
        """The stored pieces of guest RAM (``section`` is MEMORY_DATA) or of a disk (its DISK_DATA),
        decoded: see ``stored_pieces``."""
        data, image = self._memory if section.kind == SectionKind.MEMORY_DATA else self._disks[section.index]
        return stored_pieces(self._fd, data, image)

    def unknown_sections(self) -> list[tuple[SectionInfo, bytes]]:
        """The optional sections of kinds this reader does not know, with their bytes (digest checked)."""
        return [(s, self._section_bytes(s)) for s in self.sections if not isinstance(s.kind, SectionKind)]

    def _blob(self, kind: SectionKind) -> bytes | None:
        found = self._by_kind.get(kind)
        return self._section_bytes(found[0]) if found else None

    @property
    def labels(self) -> dict[str, str]:
        """The METADATA labels as a dict (empty without METADATA)."""
        return {label.key: label.value for label in self.metadata.labels} if self.metadata else {}

    @property
    def kernel(self) -> bytes | None:
        """The kernel image for a cold boot, if the bundle has one (digest checked)."""
        return self._blob(SectionKind.KERNEL)

    @property
    def initrd(self) -> bytes | None:
        """The initrd for a cold boot, if the bundle has one (digest checked)."""
        return self._blob(SectionKind.INITRD)

    def verify(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Hash every section against its digest, check that the bytes between sections are zero
        and decode every zstd chunk; raises FormatError.

        ``progress(done, total)`` is called as bytes are checked (zstd data counts twice: hashed,
        then decoded)."""
        self._check_gaps()
        compressed = [
            (data, image)
            for data, image in [self._memory, *self._disks.values()]
            if image.encoding == Encoding.ZSTD_CHUNKS
        ]
        total = sum(s.length for s in self.sections) + sum(data.length for data, _ in compressed)
        done = 0
        for s in sorted(self.sections, key=lambda s: s.offset):
            self.check_digest(s, None if progress is None else partial(_report, progress, done, total))
            done += s.length
        for data, image in compressed:
            check_chunks(self._fd, data.offset, image)
            done += data.length
            if progress is not None:
                progress(done, total)

    def check_digest(self, s: SectionInfo, hashed: Callable[[int], None] | None = None) -> None:
        """Hash section ``s`` against its table digest, a block at a time; raises FormatError.
        ``hashed(n)`` is called as its first ``n`` bytes are hashed."""
        digest = hashlib.blake2b(digest_size=DIGEST_SIZE)
        for start in range(0, s.length, _HASH_BLOCK):
            block = _pread(self._fd, min(_HASH_BLOCK, s.length - start), s.offset + start)
            digest.update(block)
            if hashed is not None:
                hashed(start + len(block))
        if digest.digest() != s.digest:
            raise FormatError("bad-digest", f"section {_name(s)} does not match its digest")

    def _check_gaps(self) -> None:
        """Every byte between the header and the table that no section holds is zero (spec §2)."""
        end = HEADER_SIZE
        ranges = []
        for s in sorted(self.sections, key=lambda s: s.offset):
            ranges.append((end, s.offset))
            end = max(end, s.offset + s.length)  # an empty section may lie inside another
        ranges.append((end, self._table_offset))
        for start, stop in ranges:
            for at in range(start, stop, _HASH_BLOCK):
                block = _pread(self._fd, min(_HASH_BLOCK, stop - at), at)
                if block.count(0) != len(block):
                    first = at + next(i for i, byte in enumerate(block) if byte)
                    raise FormatError("nonzero-gap", f"byte {first:#x}, outside every section, is not zero")

    def fileno(self) -> int:
        """The open file descriptor, for mmap."""
        return self._fd

    def close(self) -> None:
        """Close the file descriptor (mappings already made stay valid)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _report(progress: Callable[[int, int], None], base: int, total: int, done: int) -> None:
    progress(base + done, total)


def open_bundle(path: str | os.PathLike[str], *, on_config: Callable[[Any], None] | None = None) -> Bundle:
    """Open and check a bundle (structure, small sections, their digests); raises FormatError.

    ``on_config`` is called with the checked CONFIG before the other sections are read (a restore
    starts reserving guest RAM meanwhile); what it raises, the open raises.
    """
    return Bundle(path, on_config)


def verify_bundle(path: str | os.PathLike[str], progress: Callable[[int, int], None] | None = None) -> Bundle:
    """Open a bundle and run every integrity check (``Bundle.verify``); returns it closed."""
    with open_bundle(path) as bundle:
        bundle.verify(progress)
    return bundle
