"""Giving a bundle its WORKING_SET (spec §9.1) without re-encoding it.

The working set is known only once the bundle exists (a trial resume of it), so it is added
after: every other section is copied byte for byte (``copy_file_range``: the kernel copies, and
shares blocks where the filesystem can), a WORKING_SET section goes after them, and a new table
and header after that. The result is written atomically like any bundle.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import checks
from .crafting import section_digest
from .errors import FormatError
from .layout import SECTION_ALIGN, Encoding, SectionKind
from .payloads import payload
from .reader import open_bundle
from .tempnames import owned_prefix, remove_stale
from .writer import _finish_frame, _fsync_dir


def set_working_set(path: str | os.PathLike[str], ranges: Sequence[Mapping[str, int]]) -> bytes:
    """Write bundle ``path`` again with a WORKING_SET of ``ranges`` (``{address, pages}``) in place
    of any it had; returns the new bundle digest. A signed bundle is refused (its signature covers
    the working set: record it before signing)."""
    target = Path(path)
    declared = payload(SectionKind.WORKING_SET)
    data = declared.build(list(ranges))
    with open_bundle(target) as bundle:
        checks.check_working_set(checks.ram_regions(bundle.config), declared.parse(data))
        if bundle.signatures:
            raise FormatError("bad-section", f"{target} is signed: its working set must be recorded before signing")
        kept = [s for s in bundle.sections if s.kind != SectionKind.WORKING_SET]
        dropped = [s for s in bundle.sections if s.kind == SectionKind.WORKING_SET]
        body_end = max(s.offset + s.length for s in bundle.sections)
        remove_stale(target.parent, f".{target.name}")
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=owned_prefix(f".{target.name}"), suffix=".tmp")
        try:
            os.fchmod(fd, os.fstat(bundle.fileno()).st_mode & 0o777)
            copied = 0
            while copied < body_end:
                done = os.copy_file_range(bundle.fileno(), fd, body_end - copied, copied, copied)
                if not done:
                    raise FormatError("truncated", f"{target} ended while it was copied")
                copied += done
            for old in dropped:  # bytes outside every section must be zero (spec §10)
                os.pwrite(fd, bytes(old.length), old.offset)
            offset = -(-body_end // SECTION_ALIGN) * SECTION_ALIGN
            os.pwrite(fd, bytes(offset - body_end) + data, body_end)
            entries = [
                _entry(s.kind, s.flags, s.encoding, s.index, s.offset, s.length, s.logical_length, s.digest)
                for s in kept
            ]
            entries.append(
                _entry(
                    SectionKind.WORKING_SET, 0, Encoding.STRUCT, 0, offset, len(data), len(data), section_digest(data)
                )
            )
            digest = _finish_frame(fd, offset + len(data), entries)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp_name)
            raise
    os.close(fd)
    os.replace(tmp_name, target)
    _fsync_dir(target.parent)
    return digest


def _entry(
    kind: int, flags: int, encoding: int, index: int, offset: int, length: int, logical: int, digest: bytes
) -> dict[str, Any]:
    return {
        "kind": int(kind),
        "flags": flags,
        "encoding": int(encoding),
        "reserved0": 0,
        "index": index,
        "reserved1": 0,
        "offset": offset,
        "length": length,
        "logical_length": logical,
        "digest": digest,
    }
