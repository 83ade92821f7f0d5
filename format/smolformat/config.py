"""The CONFIG and METADATA section payloads: what the machine is, and who made the bundle."""

from __future__ import annotations

from construct import (
    Enum,
    GreedyBytes,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    PascalString,
    Prefixed,
    PrefixedArray,
    Struct,
)

from .devices import DeviceConfig
from .layout import DIGEST_SIZE
from .limits import Checked, bounded

MAX_VCPUS = 1024
MAX_RAM_REGIONS = 64
MAX_DEVICES = 1024
MAX_CMDLINE = 1 << 16

Arch = Enum(Int8ul, x86_64=1, arm64=2)

RamRegion = Struct("gpa" / Int64ul, "size" / Int64ul)

Config = Struct(
    "arch" / Arch,
    "vcpu_count" / bounded(Int32ul, MAX_VCPUS),
    "ram" / PrefixedArray(bounded(Int32ul, MAX_RAM_REGIONS), RamRegion),
    "cmdline" / PascalString(bounded(Int32ul, MAX_CMDLINE), "utf8"),
    "devices" / PrefixedArray(bounded(Int32ul, MAX_DEVICES), DeviceConfig),
)

_Text = PascalString(Int16ul, "utf8")

Metadata = Struct(
    "creator" / _Text,
    "created_unix_ns" / Int64ul,
    "hypervisor" / _Text,
    # a bundle digest, or empty when there is no parent
    "parent_digest"
    / Checked(
        Prefixed(Int8ul, GreedyBytes),
        lambda value: len(value) in (0, DIGEST_SIZE),
        lambda value: f"a parent digest of {len(value)} bytes (0 or {DIGEST_SIZE})",
    ),
    "labels"
    / Checked(
        PrefixedArray(Int16ul, Struct("key" / _Text, "value" / _Text)),
        lambda labels: len({label["key"] for label in labels}) == len(labels),
        lambda _labels: "a label key appears twice (labels are a map)",
    ),
)
