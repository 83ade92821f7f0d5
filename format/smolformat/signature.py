"""The SIGNATURE section (spec §4.2): what a signature signs, and adding one to a bundle.

A signature signs the bundle's *content*, not its byte layout: the digest of every section
whose bytes a re-encoding keeps, and for guest RAM and each disk a digest of the image itself
(its nonzero pages, decoded, with their addresses). So ``repack_bundle`` (``smolvmm pack
--raw/--zstd``) keeps it valid. This module computes the signed message and writes signed
files; the cryptography (Ed25519) is the caller's, so the format package needs no crypto library.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import FormatError
from .layout import (
    CHECKSUMMED_HEADER,
    DIGEST_SIZE,
    ENTRY_SIZE,
    HEADER_SIZE,
    PAGE_SIZE,
    SECTION_ALIGN,
    Encoding,
    Header,
    SectionEntry,
    SectionKind,
)
from .payloads import Signatures
from .reader import Bundle, SectionInfo

ED25519 = 1
# Domain separation: these bytes start every signed message, so a signature over a bundle's
# content can never be taken for a signature over anything else.
CONTEXT = b"smolmachine content v1\n"
_ENTRY = struct.Struct("<HIQ32s")  # kind, index, logical_length, digest
_ADDRESS = struct.Struct("<Q")
_UNSIGNED = {SectionKind.SIGNATURE, SectionKind.MEMORY_INDEX, SectionKind.DISK_INDEX}


def _image_digest(bundle: Bundle, section: SectionInfo) -> bytes:
    """``digest()`` over every page of the image that holds a nonzero byte, in address order: its
    address (u64) then its bytes (spec §4.2). Zero pages cost nothing, so neither do sparse images."""
    digest = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for address, chunk in bundle.image_pieces(section):
        for start in range(0, len(chunk), PAGE_SIZE):
            end = min(start + PAGE_SIZE, len(chunk))
            if chunk.count(0, start, end) != end - start:
                digest.update(_ADDRESS.pack(address + start))
                digest.update(memoryview(chunk)[start:end])
    return digest.digest()


def content_digests(bundle: Bundle) -> list[tuple[int, int, int, bytes]]:
    """(kind, index, logical_length, digest) of everything a signature covers, in (kind, index)
    order: each section's digest, but guest RAM's and each disk's image digest in place of their
    data sections' (index sections are left out: they describe the layout). Decodes every image."""
    entries = []
    for s in bundle.sections:
        if s.kind in _UNSIGNED:
            continue
        digest = _image_digest(bundle, s) if s.kind in (SectionKind.MEMORY_DATA, SectionKind.DISK_DATA) else s.digest
        entries.append((int(s.kind), s.index, s.logical_length, digest))
    return sorted(entries)


def signed_message(bundle: Bundle) -> bytes:
    """The bytes an Ed25519 signature of the bundle signs (spec §4.2)."""
    entries = content_digests(bundle)
    return CONTEXT + struct.pack("<I", len(entries)) + b"".join(_ENTRY.pack(*e) for e in entries)


def write_signed(
    source: str | os.PathLike[str], target: str | os.PathLike[str], records: Sequence[dict[str, Any]]
) -> bytes:
    """Write ``source`` with its SIGNATURE section replaced by ``records`` to ``target``, atomically
    (a new file renamed over ``target``, which may be ``source``); returns the new bundle digest.

    Every other section keeps its bytes and offset; the old signature's bytes become zero padding.
    """
    payload = Signatures.build(list(records))
    target = Path(target)
    with Bundle(source) as bundle:
        table_offset = bundle._table_offset
        kept = [s for s in bundle.sections if s.kind != SectionKind.SIGNATURE]
        old = [s for s in bundle.sections if s.kind == SectionKind.SIGNATURE]
        end = max((s.offset + s.length for s in kept), default=HEADER_SIZE)
        fd, tmp_name = tempfile.mkstemp(dir=target.resolve().parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, os.fstat(bundle.fileno()).st_mode & 0o777)
            _copy(bundle.fileno(), fd, min(end, table_offset))
            for s in old:  # a signature before the end of the other sections becomes zero padding
                if s.offset < end:
                    os.pwrite(fd, bytes(s.length), s.offset)
            offset = -(-end // SECTION_ALIGN) * SECTION_ALIGN
            os.pwrite(fd, payload, offset)
            digest = _seal(fd, bundle, kept, offset, payload)
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
        done = os.copy_file_range(source, target, length - copied, copied, copied)
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


def _seal(fd: int, bundle: Bundle, kept: list[SectionInfo], offset: int, payload: bytes) -> bytes:
    """Append the table (kept sections, then the signature at ``offset``) and write the header;
    returns the new bundle digest."""
    length = len(payload)
    digest = hashlib.blake2b(payload, digest_size=DIGEST_SIZE).digest()
    entries = [_entry(s) for s in kept]
    entries.append(
        {
            "kind": int(SectionKind.SIGNATURE),
            "flags": 0,
            "encoding": int(Encoding.STRUCT),
            "reserved0": 0,
            "index": 0,
            "reserved1": 0,
            "offset": offset,
            "length": length,
            "logical_length": length,
            "digest": digest,
        }
    )
    table = b"".join(SectionEntry.build(e) for e in entries)
    table_offset = -(-(offset + length) // SECTION_ALIGN) * SECTION_ALIGN
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
