"""Writing a bundle: atomically (temp file, fsync, rename), streaming RAM and disks.

``write_bundle(path, BundleContents(...), memory_encoding="raw")`` returns the bundle digest.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from construct import ConstructError

from . import checks
from .errors import FormatError
from .files import check_replaceable, new_file_mode
from .layout import (
    CHECKSUMMED_HEADER,
    DIGEST_SIZE,
    ENTRY_SIZE,
    HEADER_SIZE,
    MAGIC,
    PAGE_SIZE,
    SECTION_ALIGN,
    VERSION_MAJOR,
    VERSION_MINOR,
    Encoding,
    Header,
    SectionEntry,
    SectionFlag,
    SectionKind,
)
from .pages import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    MIN_DEDUP_RUN,
    MIN_ZERO_GAP,
    Extent,
    RawEncoder,
    encode_zstd,
)
from .payloads import payload
from .reader import SectionInfo
from .tempnames import owned_prefix, remove_stale

ENCODINGS = {"raw": Encoding.RAW_PAGES, "zstd": Encoding.ZSTD_CHUNKS}

# Pieces shorter than _SHORT_PIECE are gathered, up to _BATCH_PIECES (16 MiB at most) per pwritev call.
# A longer piece is worth a call on its own and goes out at once: zstd frames then go out while the
# compressing threads work on the next chunks (gathered 8 MiB at a time, a zstd write took ~10 % longer).
_SHORT_PIECE = 64 << 10
_BATCH_PIECES = 256
# Writeback of the temp file is started every _WRITEBACK_STEP bytes (see start_writeback).
_WRITEBACK_STEP = 8 << 20
_OPTIONAL_KINDS = {
    SectionKind.METADATA,
    SectionKind.KERNEL,
    SectionKind.INITRD,
    SectionKind.SIGNATURE,
    SectionKind.WORKING_SET,
}


@dataclass
class BundleContents:
    """Everything a bundle holds; structured values are dicts shaped like the construct declarations.

    ``memory`` has one buffer (memoryview, mmap, bytearray) per ``config["ram"]`` region, in order.
    ``vcpus[i]`` is vCPU ``i``'s ``<arch>.VcpuState``; ``disks[i]`` is the path of base disk ``i``
    (the ``disk`` parameter of a virtio-blk device). ``unknown_sections`` are carried over from a
    bundle of a later minor version (``Bundle.unknown_sections()``), unchanged; ``signatures`` (a
    SIGNATURE section, written when not empty) from a signed bundle, whose content they sign;
    ``working_set`` (a WORKING_SET section, written when not empty) the ``{address, pages}``
    ranges of guest RAM a restore may read ahead.
    """

    config: Mapping[str, Any]
    vcpus: Sequence[Mapping[str, Any]]
    vm_state: Mapping[str, Any]
    devices: Sequence[Mapping[str, Any]]
    memory: Sequence[Any]
    disks: Sequence[str | os.PathLike[str]] = ()
    kernel: bytes | None = None
    initrd: bytes | None = None
    metadata: Mapping[str, Any] | None = field(default=None)
    unknown_sections: Sequence[tuple[SectionInfo, bytes]] = ()
    signatures: Sequence[Mapping[str, Any]] = ()
    working_set: Sequence[Mapping[str, int]] = ()


def make_metadata(
    hypervisor: str,
    *,
    creator: str = "smolvmm",
    labels: Mapping[str, str] | None = None,
    parent_digest: bytes = b"",
) -> dict[str, Any]:
    """A METADATA value stamped with the current time."""
    return {
        "creator": creator,
        "created_unix_ns": time.time_ns(),
        "hypervisor": hypervisor,
        "parent_digest": parent_digest,
        "labels": [{"key": k, "value": v} for k, v in (labels or {}).items()],
    }


class _Output:
    """The temp file: writes gathered into batches, each hashed into its section's digest and written
    with one ``pwritev`` call.

    A raw image arrives as thousands of pieces: on ext4, 85 MiB in 16 KiB pieces took 47 ms to write
    and 39 ms to fsync with a call per piece, 17 and 25 ms with a call per batch of 512.
    """

    def __init__(self, fd: int, progress: Callable[[int], None] | None = None) -> None:
        self.fd = fd
        self._progress = progress
        self.position = HEADER_SIZE
        self.entries: list[dict[str, Any]] = []
        self._hash: Any = None
        self._batch: list[memoryview] = []
        self._batch_at = HEADER_SIZE  # where the batch's first byte goes
        # BLAKE2b (~0.7-1.4 GB/s here) is slower than writing: a thread of its own hashes each batch
        # (hashlib releases the GIL) while this one classifies and writes the next; one worker keeps
        # the batches in order.
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smolformat-digest")
        self._hashed: Future[None] | None = None
        self._unsynced = HEADER_SIZE  # writeback is started for the bytes before this offset

    def close(self) -> None:
        """Stop the hashing thread (after the hashing it was given)."""
        self._hasher.shutdown()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if not self._batch:
            self._batch_at = self.position
        self._batch.append(view)
        self.position += len(view)
        if len(view) >= _SHORT_PIECE or len(self._batch) >= _BATCH_PIECES:
            self.flush()
        return len(data)

    def flush(self) -> None:
        """Hash and write the batch."""
        views, at = self._batch, self._batch_at
        self._batch = []
        if not views:
            return
        self._hashed = self._hasher.submit(_update, self._hash, views)
        written = os.pwritev(self.fd, views, at)
        if self._progress is not None:
            self._progress(self.position - HEADER_SIZE)
        for view in views:
            skip = min(written, len(view))
            written -= skip
            view, at = view[skip:], at + skip
            while view:  # only after a short pwritev
                done = os.pwrite(self.fd, view, at)
                view, at = view[done:], at + done
        if self.position - self._unsynced >= _WRITEBACK_STEP:
            # Start writing back now, so that the final fsync finds little left to do.
            start_writeback(self.fd, self._unsynced, self.position - self._unsynced)
            self._unsynced = self.position

    @contextmanager
    def section(
        self,
        kind: SectionKind | int,
        *,
        index: int = 0,
        encoding: Encoding | int = Encoding.STRUCT,
        align: int = SECTION_ALIGN,
    ) -> Iterator[dict[str, Any]]:
        """Write one section at the next ``align`` boundary; the caller may set ``logical_length``
        and ``flags``."""
        self.position = -(-self.position // align) * align
        entry: dict[str, Any] = {
            "kind": kind,
            "flags": 0 if kind in _OPTIONAL_KINDS else SectionFlag.REQUIRED,
            "encoding": encoding,
            "reserved0": 0,
            "index": index,
            "reserved1": 0,
            "offset": self.position,
            "logical_length": None,
        }
        self._hash = hashlib.blake2b(digest_size=DIGEST_SIZE)
        try:
            yield entry
        except BaseException:
            self._batch = []  # it may hold views of a disk's mapping, which must close
            self._wait_hashed()
            raise
        self.flush()
        entry["length"] = self.position - entry["offset"]
        if entry["logical_length"] is None:
            entry["logical_length"] = entry["length"]
        self._wait_hashed()
        entry["digest"] = self._hash.digest()
        self.entries.append(entry)

    def _wait_hashed(self) -> None:
        if self._hashed is not None:
            self._hashed.result()
            self._hashed = None

    def struct(self, kind: SectionKind, value: Any, *, arch: str = "", index: int = 0) -> Any:
        """Build ``value``, write it, and return it parsed back (the checks run on parsed values)."""
        construct = payload(kind, arch)
        try:
            data = construct.build(value)
        except ConstructError as exc:
            raise FormatError("bad-section", f"cannot write {kind.name.lower()}: {str(exc).splitlines()[-1]}") from exc
        with self.section(kind, index=index):
            self.write(data)
        return construct.parse(data)


def _update(digest: Any, views: list[memoryview]) -> None:
    if len(views) > 1 and sum(map(len, views)) < len(views) * _SHORT_PIECE:
        # Many short pieces (pages stored one by one): one copy, then one update that releases the GIL
        # once, instead of a GIL hand-over per piece with the thread that classifies and writes.
        digest.update(b"".join(views))
        return
    for view in views:
        digest.update(view)


def _write_image(
    out: _Output,
    kinds: tuple[SectionKind, SectionKind],
    index: int,
    regions: Sequence[tuple[int, memoryview]],
    encoding: Encoding,
    chunk_size: int,
    level: int,
    threads: int,
    min_dedup_run: int,
    min_zero_gap: int,
) -> None:
    data_kind, index_kind = kinds
    align = PAGE_SIZE if encoding == Encoding.RAW_PAGES else SECTION_ALIGN
    extents: list[Extent]
    with out.section(data_kind, index=index, encoding=encoding, align=align) as entry:
        entry["logical_length"] = sum(len(data) for _, data in regions)
        if encoding == Encoding.RAW_PAGES:
            encoder = RawEncoder(out, min_dedup_run, min_zero_gap)
            for address, data in regions:
                encoder.add_region(address, data)
            extents = encoder.finish()
        else:
            extents = encode_zstd(out, regions, chunk_size, level, threads)
    granule = PAGE_SIZE if encoding == Encoding.RAW_PAGES else chunk_size
    index_value = {"encoding": encoding, "granule": granule, "extents": [e._asdict() for e in extents]}
    out.struct(index_kind, index_value, index=index)


@contextmanager
def _mapped(path: str | os.PathLike[str]) -> Iterator[memoryview]:
    """A read-only view of a whole file, paged in as it is read (empty files give an empty view)."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            yield memoryview(b"")
            return
        mapping = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ)
        view = memoryview(mapping)
        try:
            yield view
        finally:
            view.release()
            close_mapping(mapping)


def close_mapping(mapping: mmap.mmap) -> None:
    """Unmap now; or, while a failed write's traceback still holds views into it (a full disk),
    when those go, so that the write's own error is what the caller sees."""
    try:
        mapping.close()
    except BufferError:
        pass


def write_bundle(
    path: str | os.PathLike[str],
    contents: BundleContents,
    *,
    memory_encoding: str = "raw",
    disk_encoding: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    zstd_level: int = 3,
    threads: int = 2,
    min_dedup_run: int = MIN_DEDUP_RUN,
    min_zero_gap: int = MIN_ZERO_GAP,
    progress: Callable[[int], None] | None = None,
) -> bytes:
    """Write ``contents`` to ``path`` atomically; returns the bundle digest (its header checksum).

    ``memory_encoding``/``disk_encoding`` are "raw" (mmap-able) or "zstd" (``disk_encoding``
    defaults to ``memory_encoding``). Raw images store a run of at least ``min_dedup_run`` pages
    equal to stored ones only once (the default 1: every identical page; 0: no deduplication), and
    leave out runs of at least ``min_zero_gap`` zero pages (shorter ones between data are stored:
    fewer mappings). ``progress`` is called with the bytes written so far, now and then. Invalid
    contents raise ``FormatError`` before anything lands at ``path``; on any exception the temp
    file is removed.
    """
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk size {chunk_size} is not a power of two in [4 KiB, 4 MiB]")
    memory_enc = ENCODINGS[memory_encoding]
    disk_enc = ENCODINGS[disk_encoding or memory_encoding]
    target = Path(path)
    check_replaceable(target)
    remove_stale(target.parent, f".{target.name}")  # what a killed writer of this bundle left
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=owned_prefix(f".{target.name}"), suffix=".tmp")
    tmp = Path(tmp_name)
    out = _Output(fd, progress)
    try:
        os.fchmod(fd, new_file_mode())
        config = out.struct(SectionKind.CONFIG, contents.config)
        regions = checks.ram_regions(config)
        if contents.metadata is not None:
            out.struct(SectionKind.METADATA, contents.metadata)
        out.struct(SectionKind.VM_STATE, contents.vm_state, arch=config.arch)
        for vcpu_id, vcpu in enumerate(contents.vcpus):
            out.struct(SectionKind.VCPU_STATE, vcpu, arch=config.arch, index=vcpu_id)
        checks.check_vcpu_ids(config, range(len(contents.vcpus)))
        devices = out.struct(SectionKind.DEVICES, list(contents.devices))
        disk_ids = checks.check_devices(config, devices)
        if len(disk_ids) != len(contents.disks):
            raise ValueError(f"{len(disk_ids)} block devices but {len(contents.disks)} disks were given")
        for kind, blob in ((SectionKind.KERNEL, contents.kernel), (SectionKind.INITRD, contents.initrd)):
            if blob is not None:
                with out.section(kind, encoding=Encoding.BYTES):
                    out.write(blob)
        if contents.signatures:
            out.struct(SectionKind.SIGNATURE, list(contents.signatures))
        if contents.working_set:
            checks.check_working_set(regions, out.struct(SectionKind.WORKING_SET, list(contents.working_set)))
        for info, data in contents.unknown_sections:
            # Page-aligned: a later version may map such a section, as it does RAW_PAGES data.
            with out.section(info.kind, index=info.index, encoding=info.encoding, align=PAGE_SIZE) as entry:
                entry.update(flags=info.flags, logical_length=info.logical_length)
                out.write(data)
        if len(contents.memory) != len(regions):
            raise ValueError(f"{len(contents.memory)} memory buffers for {len(regions)} RAM regions")
        views = [(r.gpa, memoryview(buf).cast("B")) for r, buf in zip(config.ram, contents.memory)]
        for (gpa, view), region in zip(views, config.ram):
            if len(view) != region.size:
                raise ValueError(f"memory buffer for {gpa:#x} has {len(view)} bytes, not {region.size}")
        memory_kinds = (SectionKind.MEMORY_DATA, SectionKind.MEMORY_INDEX)
        _write_image(
            out, memory_kinds, 0, views, memory_enc, chunk_size, zstd_level, threads, min_dedup_run, min_zero_gap
        )
        for disk_id, disk_path in enumerate(contents.disks):
            with _mapped(disk_path) as view:
                disk_kinds = (SectionKind.DISK_DATA, SectionKind.DISK_INDEX)
                _write_image(
                    out,
                    disk_kinds,
                    disk_id,
                    [(0, view)],
                    disk_enc,
                    chunk_size,
                    zstd_level,
                    threads,
                    min_dedup_run,
                    min_zero_gap,
                )
        digest = _finish(out)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        return digest
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    finally:
        out.close()


def _finish(out: _Output) -> bytes:
    """Append the section table and write the header; returns the checksum."""
    table_offset = -(-out.position // SECTION_ALIGN) * SECTION_ALIGN
    table = b"".join(SectionEntry.build(entry) for entry in out.entries)
    file_size = table_offset + len(table)
    header = {
        "magic": MAGIC,
        "version_major": VERSION_MAJOR,
        "version_minor": VERSION_MINOR,
        "header_size": HEADER_SIZE,
        "flags": 0,
        "file_size": file_size,
        "table_offset": table_offset,
        "section_count": len(out.entries),
        "entry_size": ENTRY_SIZE,
        "reserved": bytes(48),
        "checksum": bytes(DIGEST_SIZE),
    }
    unsummed = Header.build(header)[:CHECKSUMMED_HEADER]
    checksum = hashlib.blake2b(unsummed + table, digest_size=DIGEST_SIZE).digest()
    os.pwrite(out.fd, unsummed + checksum, 0)
    os.pwrite(out.fd, table, table_offset)
    os.ftruncate(out.fd, file_size)
    return checksum


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes of ``fd`` at ``offset`` back to disk without waiting for it
    (Linux's ``sync_file_range``); a no-op where that is missing. Durability still comes from fsync."""
    global _sync_file_range
    if _sync_file_range is None:
        import ctypes  # only a writer needs it

        call = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
        if call is not None:
            call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _sync_file_range = call or False
    if _sync_file_range:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
