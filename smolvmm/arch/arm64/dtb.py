"""A flattened device tree (DTB, version 17) encoder: a tree of nodes in, the blob's bytes out.

Devicetree Specification v0.4, chapter 5: a 40-byte header, the memory reservation block
(pairs of big-endian u64, ended by a zero pair), the structure block (tokens), then the strings
block (property names, each stored once). All numbers are big endian.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

FDT_MAGIC = 0xD00D_FEED
FDT_VERSION = 17
FDT_LAST_COMP_VERSION = 16
FDT_BEGIN_NODE, FDT_END_NODE, FDT_PROP, FDT_END = 1, 2, 3, 9
HEADER_SIZE = 40

_NODE_NAME = re.compile(r"[0-9A-Za-z,._+-]{1,31}(@[0-9A-Za-z,._+-]+)?")
_PROPERTY_NAME = re.compile(r"[0-9A-Za-z,._+?#-]{1,31}")


def cells(*values: int) -> bytes:
    """A property value of 32-bit cells."""
    for value in values:
        if not 0 <= value < 1 << 32:
            raise ValueError(f"{value:#x} does not fit in a 32-bit cell")
    return struct.pack(f">{len(values)}I", *values)


def u64_cells(*values: int) -> bytes:
    """A property value of 64-bit numbers, each as two cells (for #address-cells = 2 etc.)."""
    return cells(*(part for value in values for part in (value >> 32, value & 0xFFFF_FFFF)))


def strings(*values: str) -> bytes:
    """A string or string-list property value: each string NUL-terminated."""
    for value in values:
        if "\0" in value:
            raise ValueError(f"device tree string {value!r} contains a NUL")
    return b"".join(value.encode() + b"\0" for value in values)


@dataclass
class Node:
    """A device tree node: properties (name -> raw value) in insertion order, then children."""

    name: str
    properties: dict[str, bytes] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)

    def child(self, name: str, properties: dict[str, bytes] | None = None) -> Node:
        """Append a child node and return it."""
        node = Node(name, dict(properties or {}))
        self.children.append(node)
        return node


def encode(root: Node, reservations: Iterable[tuple[int, int]] = (), boot_cpuid: int = 0) -> bytes:
    """The DTB for ``root``; ``reservations`` are (address, size) ranges the OS must not use."""
    if root.name != "":
        raise ValueError("the root node of a device tree has an empty name")
    names: dict[str, int] = {}
    strings_block = bytearray()
    structure = bytearray()

    def string_offset(name: str) -> int:
        if name not in names:
            names[name] = len(strings_block)
            strings_block.extend(name.encode() + b"\0")
        return names[name]

    def emit(node: Node, is_root: bool) -> None:
        if not is_root and not _NODE_NAME.fullmatch(node.name):
            raise ValueError(f"invalid device tree node name {node.name!r}")
        structure.extend(_pad(struct.pack(">I", FDT_BEGIN_NODE) + node.name.encode() + b"\0"))
        for name, value in node.properties.items():
            if not _PROPERTY_NAME.fullmatch(name):
                raise ValueError(f"invalid property name {name!r} in node {node.name!r}")
            structure.extend(_pad(struct.pack(">III", FDT_PROP, len(value), string_offset(name)) + value))
        seen: set[str] = set()
        for child in node.children:
            if child.name in seen:
                raise ValueError(f"node {node.name!r} has two children named {child.name!r}")
            seen.add(child.name)
            emit(child, False)
        structure.extend(struct.pack(">I", FDT_END_NODE))

    emit(root, True)
    structure.extend(struct.pack(">I", FDT_END))

    reserve = b"".join(struct.pack(">QQ", address, size) for address, size in reservations)
    reserve += struct.pack(">QQ", 0, 0)
    off_mem_rsvmap = HEADER_SIZE
    off_dt_struct = off_mem_rsvmap + len(reserve)
    off_dt_strings = off_dt_struct + len(structure)
    total = off_dt_strings + len(strings_block)
    header = struct.pack(
        ">10I",
        FDT_MAGIC,
        total,
        off_dt_struct,
        off_dt_strings,
        off_mem_rsvmap,
        FDT_VERSION,
        FDT_LAST_COMP_VERSION,
        boot_cpuid,
        len(strings_block),
        len(structure),
    )
    return header + reserve + bytes(structure) + bytes(strings_block)


def _pad(data: bytes) -> bytes:
    """Tokens start on 4-byte boundaries: pad with zeros."""
    return data + b"\0" * (-len(data) % 4)
