"""Replacing one singleton section of a bundle without re-encoding the rest (its SIGNATURE, its
WORKING_SET): every other section keeps its bytes and offset (``copy_file_range``: the kernel
copies, and shares blocks where the filesystem can), the new section goes after them, then a new
table; the header keeps its fields but those that locate the table, and its checksum."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import FormatError
from .files import check_replaceable
from .layout import (
    CHECKSUMMED_HEADER,
    DIGEST_SIZE,
    ENTRY_SIZE,
    HEADER_SIZE,
    SECTION_ALIGN,
    Encoding,
    Header,
    SectionEntry,
    SectionKind,
)
from .reader import Bundle, SectionInfo

_COPY_BLOCK = 1 << 20


def replace_section(
    source: str | os.PathLike[str], target: str | os.PathLike[str], kind: SectionKind, payload: bytes
) -> bytes:
    """Write ``source`` with its ``kind`` section (STRUCT-encoded, optional, index 0) holding
    ``payload`` to ``target``, atomically (a new file renamed over ``target``, which may be
    ``source``); returns the new bundle digest. The old section's bytes become zero padding."""
    target = Path(target)
    check_replaceable(target)
    with Bundle(source) as bundle:
        table_offset = bundle._table_offset
        kept = [s for s in bundle.sections if s.kind != kind]
        old = [s for s in bundle.sections if s.kind == kind]
        end = max((s.offset + s.length for s in kept), default=HEADER_SIZE)
        fd, tmp_name = tempfile.mkstemp(dir=target.resolve().parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, os.fstat(bundle.fileno()).st_mode & 0o777)
            _copy(bundle.fileno(), fd, min(end, table_offset))
            for s in old:  # bytes outside every section must be zero (spec §10)
                if s.offset < end:
                    os.pwrite(fd, bytes(s.length), s.offset)
            offset = -(-end // SECTION_ALIGN) * SECTION_ALIGN
            os.pwrite(fd, payload, offset)
            digest = _seal(fd, bundle, [*map(_entry, kept), _new_entry(kind, offset, payload)])
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp_name)
            raise
    os.close(fd)
    os.replace(tmp_name, target)
    dir_fd = os.open(target.resolve().parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return digest


def _copy(source: int, target: int, length: int) -> None:
    copied = 0
    while copied < length:
        try:
            done = os.copy_file_range(source, target, length - copied, copied, copied)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # another filesystem, or one that cannot copy ranges: through this process, a block at a time
            done = os.pwrite(target, os.pread(source, min(length - copied, _COPY_BLOCK), copied), copied)
        if done == 0:
            raise FormatError("truncated", f"file ends at {copied}")
        copied += done


def _entry(s: SectionInfo) -> dict[str, Any]:
    return {
        "kind": int(s.kind),
        "flags": s.flags,
        "encoding": int(s.encoding),
        "reserved0": 0,
        "index": s.index,
        "reserved1": 0,
        "offset": s.offset,
        "length": s.length,
        "logical_length": s.logical_length,
        "digest": s.digest,
    }


def _new_entry(kind: SectionKind, offset: int, payload: bytes) -> dict[str, Any]:
    digest = hashlib.blake2b(payload, digest_size=DIGEST_SIZE).digest()
    info = SectionInfo(kind, 0, Encoding.STRUCT, 0, offset, len(payload), len(payload), digest)
    return _entry(info)


def _seal(fd: int, bundle: Bundle, entries: list[dict[str, Any]]) -> bytes:
    """Append the table after the last section and write the header; returns the new bundle digest."""
    end = max(e["offset"] + e["length"] for e in entries)
    table = b"".join(SectionEntry.build(e) for e in entries)
    table_offset = -(-end // SECTION_ALIGN) * SECTION_ALIGN
    header = dict(Header.parse(os.pread(bundle.fileno(), HEADER_SIZE, 0)))
    header.pop("_io", None)
    header.update(
        file_size=table_offset + len(table),
        table_offset=table_offset,
        section_count=len(entries),
        entry_size=ENTRY_SIZE,
    )
    unsummed = Header.build(header)[:CHECKSUMMED_HEADER]
    checksum = hashlib.blake2b(unsummed + table, digest_size=DIGEST_SIZE).digest()
    os.pwrite(fd, table, table_offset)
    os.pwrite(fd, unsummed + checksum, 0)
    os.ftruncate(fd, table_offset + len(table))
    return checksum
