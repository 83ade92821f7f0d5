"""The arm64 Linux ``Image`` header (Documentation/arch/arm64/booting.rst, "Call the kernel image").

The first 64 bytes of an uncompressed arm64 kernel, all little endian::

    0x00  u32 code0        executable code (with an EFI stub: "MZ" and a branch)
    0x04  u32 code1
    0x08  u64 text_offset  load offset from a 2 MiB-aligned base
    0x10  u64 image_size   bytes the kernel occupies once running (includes its BSS)
    0x18  u64 flags        bit 0: big endian; bits 1-2: page size; bit 3: placement
    0x20  u64 res2, res3, res4
    0x38  u32 magic        "ARM\\x64"
    0x3c  u32 res5         offset of the PE header (EFI stub), else 0
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from smolvmm.errors import ImageError

HEADER = struct.Struct("<IIQQQQQQII")
MAGIC = 0x644D_5241  # b"ARM\x64" read as a little-endian u32

FLAG_BIG_ENDIAN = 1 << 0
FLAG_PAGE_SIZE_SHIFT = 1
FLAG_ANYWHERE = 1 << 3  # 0: place the 2 MiB-aligned base as close to the start of RAM as possible


class PageSize(IntEnum):
    """The kernel's page size, flags bits 1-2."""

    UNSPECIFIED = 0
    SIZE_4K = 1
    SIZE_16K = 2
    SIZE_64K = 3


@dataclass(frozen=True)
class ImageHeader:
    """The parts of an arm64 Image header a loader acts on."""

    text_offset: int
    image_size: int
    page_size: PageSize
    anywhere: bool  # may the 2 MiB-aligned base lie anywhere in RAM
    pe_offset: int  # 0 without an EFI stub


# What other kernel formats start with, so a wrong file gets a useful message.
_OTHER_FORMATS = (
    (b"\x1f\x8b", "a gzip file (Debian's vmlinuz is Image.gz): decompress it first"),
    (b"\x7fELF", "an ELF file (vmlinux): pass the arch/arm64/boot/Image made from it"),
    (b"\x28\xb5\x2f\xfd", "a zstd file: decompress it first"),
)


def parse_image(data: bytes, name: str = "kernel") -> ImageHeader:
    """Parse and check the header at the start of ``data``, or raise ImageError saying why not."""
    for prefix, what in _OTHER_FORMATS:
        if data.startswith(prefix):
            raise ImageError(f"{name} is not an arm64 Image: it is {what}")
    if len(data) < HEADER.size:
        raise ImageError(f"{name} is {len(data)} bytes, shorter than the {HEADER.size}-byte arm64 Image header")
    _, _, text_offset, image_size, flags, _, _, _, magic, pe_offset = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ImageError(f"{name} is not an arm64 Image: bytes 0x38..0x3c are {data[0x38:0x3C]!r}, not b'ARM\\x64'")
    if flags & FLAG_BIG_ENDIAN:
        raise ImageError(f"{name} is a big-endian arm64 kernel; smolvmm runs little-endian guests only")
    if image_size == 0:
        raise ImageError(f"{name} has image_size 0 (a kernel older than Linux 3.17), which smolvmm does not place")
    if image_size < len(data):
        raise ImageError(f"{name} is {len(data)} bytes but its header says it occupies only {image_size}")
    if pe_offset and len(data) < pe_offset + 4:
        raise ImageError(f"{name} is truncated: its PE header at {pe_offset:#x} lies beyond its {len(data)} bytes")
    if pe_offset and data[pe_offset : pe_offset + 4] != b"PE\0\0":
        raise ImageError(f"{name} is corrupt: no PE signature at the offset {pe_offset:#x} its header names")
    if text_offset % 4096:
        raise ImageError(f"{name} has text_offset {text_offset:#x}, which is not page aligned")
    return ImageHeader(
        text_offset=text_offset,
        image_size=image_size,
        page_size=PageSize(flags >> FLAG_PAGE_SIZE_SHIFT & 0x3),
        anywhere=bool(flags & FLAG_ANYWHERE),
        pe_offset=pe_offset,
    )
