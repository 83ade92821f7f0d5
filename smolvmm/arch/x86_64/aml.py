"""A small ACPI Machine Language encoder: just the terms smolvmm's DSDT uses (ACPI 6.4 §20)."""

from __future__ import annotations

import struct

Term = bytes


def pkg_length(body_len: int) -> bytes:
    """PkgLength for a body of ``body_len`` bytes; the length counts the PkgLength bytes too."""
    if body_len + 1 < 0x40:
        return bytes([body_len + 1])
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0xF)]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError("AML package too long")


def name_string(path: str) -> bytes:
    """'\\_SB_.V000' or 'ADDR' -> an AML NameString (segments padded to four characters with '_')."""
    root = path.startswith("\\")
    segments = [s.ljust(4, "_").encode() for s in path.lstrip("\\").split(".")]
    if any(len(s) != 4 for s in segments):
        raise ValueError(f"invalid AML name {path!r}")
    prefix = b"\\" if root else b""
    if len(segments) == 1:
        return prefix + segments[0]
    if len(segments) == 2:
        return prefix + b"\x2e" + b"".join(segments)
    return prefix + b"\x2f" + bytes([len(segments)]) + b"".join(segments)


def integer(value: int) -> Term:
    if value in (0, 1):
        return bytes([value])
    for prefix, fmt, limit in ((0x0A, "<B", 1 << 8), (0x0B, "<H", 1 << 16), (0x0C, "<I", 1 << 32)):
        if value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    return b"\x0e" + struct.pack("<Q", value)


def string(text: str) -> Term:
    return b"\x0d" + text.encode("ascii") + b"\x00"


def buffer(data: bytes) -> Term:
    body = integer(len(data)) + data
    return b"\x11" + pkg_length(len(body)) + body


def package(*elements: Term) -> Term:
    body = bytes([len(elements)]) + b"".join(elements)
    return b"\x12" + pkg_length(len(body)) + body


def name(path: str, value: Term) -> Term:
    return b"\x08" + name_string(path) + value


def scope(path: str, *terms: Term) -> Term:
    body = name_string(path) + b"".join(terms)
    return b"\x10" + pkg_length(len(body)) + body


def device(path: str, *terms: Term) -> Term:
    body = name_string(path) + b"".join(terms)
    return b"\x5b\x82" + pkg_length(len(body)) + body


def method(path: str, args: int, *terms: Term) -> Term:
    body = name_string(path) + bytes([args & 0x7]) + b"".join(terms)
    return b"\x14" + pkg_length(len(body)) + body


def notify(path: str, value: int) -> Term:
    return b"\x86" + name_string(path) + integer(value)


def eisa_id(text: str) -> Term:
    """EISAID("PNP0501"): three letters packed in five bits each, then four hex digits, as an integer."""
    letters = [ord(c) - 0x40 for c in text[:3]]
    packed = (letters[0] << 10) | (letters[1] << 5) | letters[2]
    product = int(text[3:], 16)
    value = ((packed >> 8) | ((packed & 0xFF) << 8)) | (((product >> 8) | ((product & 0xFF) << 8)) << 16)
    return integer(value)


def io_port(base: int, length: int) -> bytes:
    """IO (Decode16, base, base, 1, length) resource descriptor."""
    return struct.pack("<BBHHBB", 0x47, 1, base, base, 1, length)


def irq_no_flags(irq: int) -> bytes:
    """IRQNoFlags () { irq }: an edge-triggered, active-high ISA interrupt."""
    return struct.pack("<BH", 0x22, 1 << irq)


def memory32_fixed(base: int, length: int) -> bytes:
    """Memory32Fixed (ReadWrite, base, length) resource descriptor."""
    return struct.pack("<BHBII", 0x86, 9, 1, base, length)


def interrupt(gsi: int) -> bytes:
    """Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi } resource descriptor."""
    return struct.pack("<BHBBI", 0x89, 6, 0x03, 1, gsi)


def resource_template(*descriptors: bytes) -> Term:
    return buffer(b"".join(descriptors) + b"\x79\x00")
