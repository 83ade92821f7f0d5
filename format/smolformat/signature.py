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
from collections.abc import Sequence
from typing import Any

from .amend import replace_section
from .layout import (
    DIGEST_SIZE,
    PAGE_SIZE,
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
    data sections' (index sections are left out: they describe the layout). Decodes every image
    and hashes every other section against its digest (an open checks only those it parses: not
    the kernel, the initrd or unknown ones); raises FormatError."""
    entries = []
    for s in bundle.sections:
        if s.kind in _UNSIGNED:
            continue
        if s.kind in (SectionKind.MEMORY_DATA, SectionKind.DISK_DATA):
            digest = _image_digest(bundle, s)
        else:
            bundle.check_digest(s)
            digest = s.digest
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
    return replace_section(source, target, SectionKind.SIGNATURE, Signatures.build(list(records)))
