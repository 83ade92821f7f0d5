"""Which construct declares the payload of each STRUCT-encoded section kind."""

from __future__ import annotations

import importlib
from functools import cache

from construct import Bytes, Construct, FocusedSeq, Int8ul, Int16ul, Int32ul, Int64ul, PrefixedArray, Struct, Terminated

from .config import MAX_DEVICES, Config, Metadata
from .devices import DeviceRecord
from .layout import SectionKind
from .limits import bounded
from .packed import Packed, PackedArray
from .pages import PageIndex

ARCHES = ("x86_64", "arm64")  # each names the module that declares its vCPU and VM state

Devices = PrefixedArray(bounded(Int32ul, MAX_DEVICES), DeviceRecord)

MAX_SIGNATURES = 16
# One signature of the bundle's content (spec §4.2); algorithm 1 is Ed25519.
SignatureRecord = Struct("algorithm" / Int16ul, "public_key" / Bytes(32), "signature" / Bytes(64))
Signatures = PrefixedArray(bounded(Int8ul, MAX_SIGNATURES), SignatureRecord)

MAX_WORKING_SET_RANGES = 1 << 20
# The guest pages a clone touched first after a trial resume (spec §9.1): page-aligned ranges.
WorkingSet = PackedArray(
    bounded(Int32ul, MAX_WORKING_SET_RANGES), Packed(Struct("address" / Int64ul, "pages" / Int64ul))
)

_COMMON: dict[SectionKind, Construct] = {
    SectionKind.CONFIG: Config,
    SectionKind.METADATA: Metadata,
    SectionKind.DEVICES: Devices,
    SectionKind.MEMORY_INDEX: PageIndex,
    SectionKind.DISK_INDEX: PageIndex,
    SectionKind.SIGNATURE: Signatures,
    SectionKind.WORKING_SET: WorkingSet,
}


@cache
def payload(kind: SectionKind, arch: str = "") -> Construct:
    """The declared construct for a section kind, which must consume the whole section."""
    if kind in (SectionKind.VCPU_STATE, SectionKind.VM_STATE):
        if arch not in ARCHES:
            raise KeyError(arch)
        # Imported on first use: an arch's declarations take ~10 ms to build, a restore needs one.
        state = importlib.import_module(f"{__package__}.{arch}")
        declared = state.VcpuState if kind == SectionKind.VCPU_STATE else state.VmState
    else:
        declared = _COMMON[kind]
    return FocusedSeq("value", "value" / declared, Terminated)
