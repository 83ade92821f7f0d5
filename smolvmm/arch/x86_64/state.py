"""The architecture's rules for an x86_64 snapshot: what a saved vCPU and VM may hold (``admit_vcpu``,
``admit_vm``), which MSRs a snapshot saves, how far the TSC may drift unscaled, and the TSC deadline
a restore re-arms.

The records are ``smolformat.x86_64.VcpuState`` and ``VmState`` values. The hypervisor backend
reads and writes the registers themselves (``Vcpu.save_state`` and ``restore_state`` in
smolvmm.hypervisor.interface) and applies the MSR and TSC rules; ``smolvmm.monitor.boundary``
applies the admission rules to a bundle's records before any of them reaches it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from smolvmm.arch.interface import AdmittedVcpu, HostOffer
from smolvmm.arch.x86_64 import layout, msrs
from smolvmm.errors import BundleError

TSC_TOLERANCE_PPM = 250
# mp_state values an x86_64 vCPU can be restored in: runnable, uninitialized, INIT received,
# halted, SIPI received (the others belong to other architectures).
MP_STATES = frozenset(range(5))
MAX_XCRS = 16
_REGISTERS = ("eax", "ebx", "ecx", "edx")
IOAPIC_ID_MAX = 0xF
PIT_MODES = 8  # modes 0-7 (6 and 7 alias 2 and 3)
PIT_MODE_UNSET = 0xFF  # a channel the guest never programmed, as KVM resets it
PIT_RW_MODES = 4  # none, LSB, MSB, LSB then MSB
PIT_RW_STATES = 5  # KVM's RW_STATE_LSB .. RW_STATE_WORD1 are 1-4
PIT_COUNT_MAX = 0x10000
PIT_FLAGS = 0x3  # HPET legacy routing, speaker dummy


def _refuse(field: str, what: str) -> BundleError:
    return BundleError(f"{field}: {what}")


def admit_vcpu(record: Mapping[str, Any], offer: HostOffer, *, strict: bool) -> AdmittedVcpu:
    """A saved vCPU as plain data, every value one ``offer`` takes; BundleError "field: what" for
    any other. CPUID leaves and MSRs the host lacks are refused, or left out when not ``strict``."""
    mp_state = record["mp_state"]["mp_state"]
    if mp_state not in MP_STATES:
        raise _refuse("mp_state", f"{mp_state} is not an x86_64 vCPU state (0-{max(MP_STATES)})")
    xsave = bytes(record["xsave"])
    if len(xsave) != offer.xsave_size:
        raise _refuse("xsave", f"{len(xsave)} bytes; this host's hypervisor takes exactly {offer.xsave_size}")
    nr_xcrs = record["xcrs"]["nr_xcrs"]
    if nr_xcrs > MAX_XCRS:
        raise _refuse("xcrs.nr_xcrs", f"{nr_xcrs}, more than {MAX_XCRS}")
    cpuid, leaves = _admit_cpuid(record["cpuid"], offer, strict)
    saved_msrs, missing = _admit_msrs(record["msrs"], offer, strict)
    left_out = []
    if leaves:
        first = _leaf_name(leaves[0])
        left_out.append(f"cpuid: {len(leaves)} leaf(s) this host's hypervisor does not offer, first {first}")
    if missing:
        left_out.append(f"msrs: {len(missing)} MSR(s) this host does not have, first {missing[0]:#x}")
    admitted = {name: record[name] for name in record if not name.startswith("_")}
    admitted.update(xsave=xsave, cpuid=cpuid, msrs=saved_msrs)
    return AdmittedVcpu(admitted, len(leaves) + len(missing), tuple(left_out))


def _leaf_name(leaf: tuple[int, int]) -> str:
    """A CPUID leaf as the messages name it: function.index, e.g. 0x80000009.0."""
    return f"{leaf[0]:#x}.{leaf[1]}"


def _admit_cpuid(
    entries: Sequence[Mapping[str, int]], offer: HostOffer, strict: bool
) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    admitted: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    missing = []
    for entry in entries:
        leaf = (entry["function"], entry["index"])
        if leaf in seen:
            raise _refuse(f"cpuid[{_leaf_name(leaf)}]", "appears twice")
        seen.add(leaf)
        if leaf not in offer.cpuid:
            if strict:
                raise _refuse(f"cpuid[{_leaf_name(leaf)}]", "this host's hypervisor does not offer the leaf")
            missing.append(leaf)
            continue
        values = {reg: entry[reg] for reg in _REGISTERS}
        admitted.append({"function": leaf[0], "index": leaf[1], "flags": entry["flags"], **values})
    return admitted, missing


def _admit_msrs(
    entries: Sequence[Mapping[str, int]], offer: HostOffer, strict: bool
) -> tuple[list[dict[str, int]], list[int]]:
    admitted, missing = [], []
    for entry in entries:
        if entry["index"] in offer.msrs:
            admitted.append({"index": entry["index"], "reserved": 0, "data": entry["data"]})
        elif strict:
            raise _refuse("msrs", f"MSR {entry['index']:#x} is not one this host's hypervisor saves and restores")
        else:
            missing.append(entry["index"])
    return admitted, missing


def admit_vm(record: Mapping[str, Any]) -> dict[str, Any]:
    """The saved interrupt controllers and PIT as plain data; BundleError "field: what" for a
    value no x86_64 machine of smolvmm's can hold."""
    ioapic = record["ioapic"]
    if ioapic["base_address"] != layout.IOAPIC_ADDR:
        raise _refuse("ioapic.base_address", f"{ioapic['base_address']:#x}, not {layout.IOAPIC_ADDR:#x}")
    if ioapic["id"] > IOAPIC_ID_MAX:
        raise _refuse("ioapic.id", f"{ioapic['id']}, more than {IOAPIC_ID_MAX}")
    pit = record["pit"]
    if pit["flags"] & ~PIT_FLAGS:
        raise _refuse("pit.flags", f"{pit['flags']:#x} has unknown bits")
    for number, channel in enumerate(pit["channels"]):
        for name, limit in (
            ("mode", PIT_MODE_UNSET + 1 if channel["mode"] == PIT_MODE_UNSET else PIT_MODES),
            ("rw_mode", PIT_RW_MODES),
            ("read_state", PIT_RW_STATES),
            ("write_state", PIT_RW_STATES),
            ("bcd", 2),
            ("gate", 2),
            ("count_latched", PIT_RW_STATES),
            ("status_latched", 2),
        ):
            if channel[name] >= limit:
                raise _refuse(f"pit.channels[{number}].{name}", f"{channel[name]}, not below {limit}")
        if channel["count"] > PIT_COUNT_MAX:
            raise _refuse(f"pit.channels[{number}].count", f"{channel['count']}, more than {PIT_COUNT_MAX}")
    return {name: record[name] for name in record if not name.startswith("_")}


def saved_msr_indices(supported: list[int]) -> list[int]:
    """The MSRs a snapshot saves, in restore order: every MSR the hypervisor can save, TSC first."""
    rest = [index for index in supported if index != msrs.MSR_IA32_TSC]
    return [msrs.MSR_IA32_TSC, *rest] if msrs.MSR_IA32_TSC in supported else rest


def tsc_needs_scaling(saved_khz: int, host_khz: int) -> bool:
    """Whether a guest whose TSC ran at ``saved_khz`` must be scaled to run on a ``host_khz`` TSC."""
    return bool(saved_khz) and abs(saved_khz - host_khz) * 1_000_000 > TSC_TOLERANCE_PPM * saved_khz


def rearm_tsc_deadline(values: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Saved (index, value) MSRs with a TSC deadline of 0 replaced by the saved TSC.

    A deadline of 0 would leave the LAPIC timer disarmed for good if the guest was between ticks;
    arming it at the restored TSC fires it at once and the guest re-arms (as Firecracker does).
    """
    tsc = next((v for i, v in values if i == msrs.MSR_IA32_TSC), 0)
    return [(i, tsc if i == msrs.MSR_IA32_TSC_DEADLINE and v == 0 else v) for i, v in values]
