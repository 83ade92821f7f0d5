"""The file's frame: header, section table, section kinds, flags and encodings (spec §2-§4)."""

from __future__ import annotations

from enum import IntEnum, IntFlag

from construct import Bytes, Int16ul, Int32ul, Int64ul, Struct

from .packed import Packed

MAGIC = b"\x89SMOLVMM"
SMOLPACK_MAGIC = b"SMOLPACK"
SMOLPACK_FOOTER_SIZE = 64
VERSION_MAJOR = 1
VERSION_MINOR = 0
HEADER_SIZE = 128
ENTRY_SIZE = 72
DIGEST_SIZE = 32
PAGE_SIZE = 4096
SECTION_ALIGN = 8
# More entries than any bundle can hold: 1024 vCPU states (MAX_VCPUS), an index and a data
# section for each of at most 1024 disks (MAX_DEVICES), 9 singleton kinds (3081 in all), and
# room for the sections of later minor versions. Caps the table a reader reads and walks.
MAX_SECTIONS = 4096
# bytes of header covered by the checksum (everything before the checksum field)
CHECKSUMMED_HEADER = HEADER_SIZE - DIGEST_SIZE


class SectionKind(IntEnum):
    """What a section holds (spec §4)."""

    CONFIG = 1
    METADATA = 2
    VCPU_STATE = 3
    VM_STATE = 4
    DEVICES = 5
    MEMORY_INDEX = 6
    MEMORY_DATA = 7
    DISK_INDEX = 8
    DISK_DATA = 9
    KERNEL = 10
    INITRD = 11
    SIGNATURE = 12
    WORKING_SET = 13


class SectionFlag(IntFlag):
    """Per-section flags; a reader rejects an unknown kind only when it is REQUIRED."""

    REQUIRED = 1


class Encoding(IntEnum):
    """How a section's bytes encode its content."""

    STRUCT = 0
    BYTES = 1
    RAW_PAGES = 2
    ZSTD_CHUNKS = 3


Header = Packed(
    Struct(
        "magic" / Bytes(8),
        "version_major" / Int16ul,
        "version_minor" / Int16ul,
        "header_size" / Int32ul,
        "flags" / Int64ul,
        "file_size" / Int64ul,
        "table_offset" / Int64ul,
        "section_count" / Int32ul,
        "entry_size" / Int32ul,
        "reserved" / Bytes(48),
        "checksum" / Bytes(DIGEST_SIZE),
    )
)

SectionEntry = Packed(
    Struct(
        "kind" / Int16ul,
        "flags" / Int16ul,
        "encoding" / Int16ul,
        "reserved0" / Int16ul,
        "index" / Int32ul,
        "reserved1" / Int32ul,
        "offset" / Int64ul,
        "length" / Int64ul,
        "logical_length" / Int64ul,
        "digest" / Bytes(DIGEST_SIZE),
    )
)
