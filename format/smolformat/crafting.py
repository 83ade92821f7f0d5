"""Editing a bundle's frame and re-sealing it: the tool behind conformance vectors and tests.

A *valid-looking* broken file (right checksum, wrong content) reaches the deeper checks, which is
what vectors and fuzzing need.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from .layout import (
    CHECKSUMMED_HEADER,
    DIGEST_SIZE,
    ENTRY_SIZE,
    HEADER_SIZE,
    SECTION_ALIGN,
    Header,
    SectionEntry,
    SectionKind,
)


def parse_frame(data: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and section entries of a well-formed bundle, as plain dicts."""
    header = dict(Header.parse(data[:HEADER_SIZE]))
    start = header["table_offset"]
    entries = [
        {
            k: v
            for k, v in SectionEntry.parse(data[start + i * ENTRY_SIZE : start + (i + 1) * ENTRY_SIZE]).items()
            if k != "_io"
        }
        for i in range(header["section_count"])
    ]
    return {k: v for k, v in header.items() if k != "_io"}, entries


def section_digest(data: bytes) -> bytes:
    """The digest of a section's bytes."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def build_frame(body: bytes, header: dict[str, Any], entries: list[dict[str, Any]]) -> bytes:
    """``body`` (header area + sections) with ``entries`` appended as the table, checksum re-sealed.

    The header's table offset, section count, entry size and file size are set to match.
    """
    body = bytes(body) + bytes(-len(body) % SECTION_ALIGN)
    table = b"".join(SectionEntry.build(entry) for entry in entries)
    header = dict(header)
    header.update(
        table_offset=len(body),
        section_count=len(entries),
        file_size=len(body) + len(table),
        entry_size=ENTRY_SIZE,
    )
    return reseal(Header.build(header) + body[HEADER_SIZE:] + table)


def reseal(data: bytes) -> bytes:
    """``data`` with its header checksum recomputed over the header and the table it points at."""
    header = Header.parse(data[:HEADER_SIZE])
    table = data[header.table_offset : header.table_offset + header.section_count * header.entry_size]
    checksum = hashlib.blake2b(data[:CHECKSUMMED_HEADER] + table, digest_size=DIGEST_SIZE).digest()
    return data[:CHECKSUMMED_HEADER] + checksum + data[HEADER_SIZE:]


def find_entry(entries: list[dict[str, Any]], kind: SectionKind, index: int = 0) -> dict[str, Any]:
    """The table entry of section ``kind`` number ``index``."""
    return next(e for e in entries if e["kind"] == kind and e["index"] == index)


def edit_table(data: bytes, edit: Callable[[dict[str, Any], list[dict[str, Any]]], None]) -> bytes:
    """``data`` after ``edit(header, entries)`` changed its frame, re-sealed."""
    header, entries = parse_frame(data)
    edit(header, entries)
    return build_frame(data[: header["table_offset"]], header, entries)


def append_section(data: bytes, entry: dict[str, Any], payload: bytes) -> bytes:
    """``data`` with one more section (``entry`` gives kind, flags, encoding, index)."""
    header, entries = parse_frame(data)
    body = data[: header["table_offset"]]
    body += bytes(-len(body) % 8)
    entries.append(
        {
            **entry,
            "offset": len(body),
            "length": len(payload),
            "logical_length": len(payload),
            "digest": section_digest(payload),
        }
    )
    return build_frame(body + payload, header, entries)


def rewrite_section(data: bytes, kind: SectionKind, change: Callable[[bytearray], None]) -> bytes:
    """Change a section's bytes in place (same length) and give it a matching digest."""
    header, entries = parse_frame(data)
    entry = find_entry(entries, kind)
    payload = bytearray(data[entry["offset"] : entry["offset"] + entry["length"]])
    change(payload)
    entry["digest"] = section_digest(bytes(payload))
    body = data[: entry["offset"]] + bytes(payload) + data[entry["offset"] + entry["length"] : header["table_offset"]]
    return build_frame(body, header, entries)


def replace_section(data: bytes, kind: SectionKind, payload: bytes) -> bytes:
    """``data`` with section ``kind`` holding ``payload``, of any length: its old bytes are zeroed and
    the section moves after the others (``logical_length`` becomes the new length)."""
    header, entries = parse_frame(data)
    old = find_entry(entries, kind)
    entries.remove(old)
    body = bytearray(data[: header["table_offset"]])
    body[old["offset"] : old["offset"] + old["length"]] = bytes(old["length"])
    fields = ("kind", "flags", "encoding", "reserved0", "index", "reserved1")
    return append_section(build_frame(bytes(body), header, entries), {k: old[k] for k in fields}, payload)
