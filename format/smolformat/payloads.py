"""Which construct declares the payload of each STRUCT-encoded section kind."""

from __future__ import annotations

from functools import cache

from construct import Construct, FocusedSeq, Int32ul, PrefixedArray, Terminated

from . import arm64, x86_64
from .config import MAX_DEVICES, Config, Metadata
from .devices import DeviceRecord
from .layout import SectionKind
from .limits import bounded
from .pages import PageIndex

ARCH_STATE = {"x86_64": x86_64, "arm64": arm64}

Devices = PrefixedArray(bounded(Int32ul, MAX_DEVICES), DeviceRecord)

_COMMON: dict[SectionKind, Construct] = {
    SectionKind.CONFIG: Config,
    SectionKind.METADATA: Metadata,
    SectionKind.DEVICES: Devices,
    SectionKind.MEMORY_INDEX: PageIndex,
    SectionKind.DISK_INDEX: PageIndex,
}


@cache
def payload(kind: SectionKind, arch: str = "") -> Construct:
    """The declared construct for a section kind, which must consume the whole section."""
    if kind == SectionKind.VCPU_STATE:
        declared = ARCH_STATE[arch].VcpuState
    elif kind == SectionKind.VM_STATE:
        declared = ARCH_STATE[arch].VmState
    else:
        declared = _COMMON[kind]
    return FocusedSeq("value", "value" / declared, Terminated)
