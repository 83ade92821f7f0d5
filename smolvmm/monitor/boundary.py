"""The one boundary between a bundle's saved state and the hypervisor and devices.

smolformat has checked a bundle's structure (every length, count and cross-reference); what it
cannot know is what *this* host takes. Before any ioctl or device model sees a value from
VCPU_STATE, VM_STATE or DEVICES, it passes through here and is either admitted as plain data or
refused with a ``BundleError`` of one line naming the section, the field and the value.

Policy (docs/THREAT_MODEL.md): a restore that runs the guest refuses CPUID leaves and MSRs the
host does not offer (the hypervisor itself masks CPUID feature bits it cannot give a guest); a restore that is only measured (``strict=False``) drops
them instead, with one warning line on the ``smolvmm.monitor.boundary`` logger. Everything else is refused
either way: an XSAVE area of another size than the host's, impossible interrupt controller or
timer values, device records that do not pair with this monitor's devices, FIFOs longer than the
model's. Device models re-check their own state (queues against guest RAM, features against
what they offer) in ``MmioTransport.check_state`` before anything is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from smolvmm.arch.arm64 import state as arm64_state
from smolvmm.arch.interface import Arch
from smolvmm.arch.x86_64 import layout
from smolvmm.devices.records import uart_state, virtio_state
from smolvmm.devices.uart import UartState
from smolvmm.devices.virtio.mmio import MMIO_SIZE, MmioState
from smolvmm.errors import BundleError
from smolvmm.hypervisor.interface import HostOffer

_log = logging.getLogger(__name__)

# mp_state values an x86_64 vCPU can be restored in: runnable, uninitialized, INIT received,
# halted, SIPI received (the others belong to other architectures).
X86_MP_STATES = frozenset(range(5))
MAX_XCRS = 16
_REGISTERS = ("eax", "ebx", "ecx", "edx")
IOAPIC_ID_MAX = 0xF
PIT_MODES = 8  # modes 0-7 (6 and 7 alias 2 and 3)
PIT_MODE_UNSET = 0xFF  # a channel the guest never programmed, as KVM resets it
PIT_RW_MODES = 4  # none, LSB, MSB, LSB then MSB
PIT_RW_STATES = 5  # KVM's RW_STATE_LSB .. RW_STATE_WORD1 are 1-4
PIT_COUNT_MAX = 0x10000
PIT_FLAGS = 0x3  # HPET legacy routing, speaker dummy
# The platform devices (smolvmm.arch.interface) whose saved state a restore loads, where the arch puts them.
RESTORED_PLATFORM = ("uart16550", "i8042")


@dataclass
class AdmittedVcpu:
    """A vCPU's saved state, every value within what the host takes; ``dropped`` counts the
    CPUID leaves and MSRs a measured-only restore left out."""

    state: dict[str, Any]
    dropped: int = 0


@dataclass
class AdmittedDevices:
    """DEVICES as plain data, paired with CONFIG.devices: the UART (None: a fresh one) and each
    virtio-mmio device's (config entry, instance, transport state), in slot order."""

    uart: UartState | None = None
    virtio: list[tuple[Any, int, MmioState]] = field(default_factory=list)


def refuse(where: str, what: str) -> BundleError:
    """The one-line error for a refused value: ``where`` names the section and field."""
    return BundleError(f"{where}: {what}")


def admit_vcpu(state: Mapping[str, Any], vcpu_id: int, offer: HostOffer, *, strict: bool = True) -> AdmittedVcpu:
    """Check one saved x86_64 vCPU against ``offer``; returns it as plain data (see the module)."""
    where = f"VCPU_STATE#{vcpu_id}"
    mp_state = state["mp_state"]["mp_state"]
    if mp_state not in X86_MP_STATES:
        raise refuse(f"{where} mp_state", f"{mp_state} is not an x86_64 vCPU state (0-{max(X86_MP_STATES)})")
    xsave = bytes(state["xsave"])
    if len(xsave) != offer.xsave_size:
        raise refuse(f"{where} xsave", f"{len(xsave)} bytes; this host's hypervisor takes exactly {offer.xsave_size}")
    nr_xcrs = state["xcrs"]["nr_xcrs"]
    if nr_xcrs > MAX_XCRS:
        raise refuse(f"{where} xcrs.nr_xcrs", f"{nr_xcrs}, more than {MAX_XCRS}")
    cpuid, dropped_leaves = _admit_cpuid(where, state["cpuid"], offer, strict)
    msrs, dropped_msrs = _admit_msrs(where, state["msrs"], offer, strict)
    admitted = {name: state[name] for name in state if not name.startswith("_")}
    admitted.update(xsave=xsave, cpuid=cpuid, msrs=msrs)
    return AdmittedVcpu(admitted, dropped_leaves + dropped_msrs)


def _admit_cpuid(
    where: str, entries: Sequence[Mapping[str, int]], offer: HostOffer, strict: bool
) -> tuple[list[dict[str, Any]], int]:
    admitted: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    dropped = 0
    for entry in entries:
        leaf = (entry["function"], entry["index"])
        name = f"{where} cpuid[{leaf[0]:#x}.{leaf[1]}]"
        if leaf in seen:
            raise refuse(name, "appears twice")
        seen.add(leaf)
        if leaf not in offer.cpuid:
            if strict:
                raise refuse(name, "this host's hypervisor does not offer the leaf")
            _log.warning("%s: not offered by this host; left out", name)
            dropped += 1
            continue
        values = {reg: entry[reg] for reg in _REGISTERS}
        admitted.append({"function": leaf[0], "index": leaf[1], "flags": entry["flags"], **values})
    return admitted, dropped


def _admit_msrs(
    where: str, entries: Sequence[Mapping[str, int]], offer: HostOffer, strict: bool
) -> tuple[list[dict[str, int]], int]:
    admitted = []
    missing = []
    for entry in entries:
        if entry["index"] in offer.msrs:
            admitted.append({"index": entry["index"], "reserved": 0, "data": entry["data"]})
        else:
            missing.append(entry["index"])
    if missing and strict:
        raise refuse(f"{where} msrs", f"MSR {missing[0]:#x} is not one this host's hypervisor saves and restores")
    if missing:
        _log.warning("%s msrs: %d MSR(s) this host does not have left out, first %#x", where, len(missing), missing[0])
    return admitted, len(missing)


def admit_vm(state: Mapping[str, Any]) -> dict[str, Any]:
    """Check the saved x86_64 interrupt controllers and PIT; returns them as plain data."""
    ioapic = state["ioapic"]
    if ioapic["base_address"] != layout.IOAPIC_ADDR:
        raise refuse("VM_STATE ioapic.base_address", f"{ioapic['base_address']:#x}, not {layout.IOAPIC_ADDR:#x}")
    if ioapic["id"] > IOAPIC_ID_MAX:
        raise refuse("VM_STATE ioapic.id", f"{ioapic['id']}, more than {IOAPIC_ID_MAX}")
    pit = state["pit"]
    if pit["flags"] & ~PIT_FLAGS:
        raise refuse("VM_STATE pit.flags", f"{pit['flags']:#x} has unknown bits")
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
                raise refuse(f"VM_STATE pit.channels[{number}].{name}", f"{channel[name]}, not below {limit}")
        if channel["count"] > PIT_COUNT_MAX:
            raise refuse(f"VM_STATE pit.channels[{number}].count", f"{channel['count']}, more than {PIT_COUNT_MAX}")
    return {name: state[name] for name in state if not name.startswith("_")}


def admit_arm64_vcpu(state: Mapping[str, Any], vcpu_id: int) -> AdmittedVcpu:
    """Check one saved arm64 vCPU: every register one smolvmm saves (``smolvmm.arch.arm64.state``)."""
    try:
        return AdmittedVcpu(arm64_state.VcpuState.from_record(state).to_record())
    except (ValueError, BundleError) as exc:  # the arm64 state module names the register, this the section
        raise refuse(f"VCPU_STATE#{vcpu_id}", str(exc)) from None


def admit_arm64_vm(state: Mapping[str, Any]) -> dict[str, Any]:
    """Check the saved arm64 VGIC distributor: only the registers smolvmm saves."""
    try:
        return arm64_state.VmState.from_record(state).to_record()
    except (ValueError, BundleError) as exc:  # the arm64 state module names the register, this the section
        raise refuse("VM_STATE", str(exc)) from None


def admit_state(
    arch: Arch, vm_state: Mapping[str, Any], vcpus: Sequence[Mapping[str, Any]], offer: HostOffer, *, strict: bool
) -> tuple[dict[str, Any], list[AdmittedVcpu]]:
    """The saved VM and vCPU states of a bundle of ``arch``, each admitted by that arch's rules."""
    if arch.name == "arm64":
        return admit_arm64_vm(vm_state), [admit_arm64_vcpu(s, i) for i, s in enumerate(vcpus)]
    return admit_vm(vm_state), [admit_vcpu(s, i, offer, strict=strict) for i, s in enumerate(vcpus)]


def admit_devices(arch: Arch, config_devices: Sequence[Any], records: Sequence[Any]) -> AdmittedDevices:
    """Pair each DEVICES record with its configured device (by kind and instance) and check that
    ``arch``'s machine has that device where the bundle says; returns the records as plain data."""
    platform = {d.kind: (d.bus, d.base, d.size, d.irq) for d in arch.platform_devices if d.kind in RESTORED_PLATFORM}
    admitted = AdmittedDevices()
    by_key = {(r.kind, r.instance): r for r in records}
    counts: dict[str, int] = {}
    slot = 0
    for number, device in enumerate(config_devices):
        kind = str(device.kind)
        instance = counts.get(kind, 0)
        counts[kind] = instance + 1
        where = f"CONFIG devices[{number}] {kind}#{instance}"
        record = by_key.get((kind, instance))
        if record is None:
            raise refuse(f"DEVICES {kind}#{instance}", "no saved state for this configured device")
        placement = (str(device.bus), device.base, device.size, device.gsi)
        if kind in platform and instance == 0:
            expected = platform[kind]
        elif device.bus == "mmio":
            base, gsi = arch.virtio_slot(slot)
            expected = ("mmio", base, MMIO_SIZE, gsi)
            slot += 1
        else:
            raise refuse(where, f"this monitor has no such {device.bus} device")
        if placement != expected:
            got, want = _placement(placement), _placement(expected)
            raise refuse(f"{where} placement", f"{got}; this monitor puts it at {want}")
        state = record.state
        if kind == "uart16550":
            admitted.uart = uart_state(state)
        elif kind == "i8042":
            # The model keeps no state: it is idle, with nothing in its output buffer.
            if len(state.output_buffer):
                raise refuse(
                    f"DEVICES {kind}#{instance} output_buffer",
                    f"{len(state.output_buffer)} bytes; this monitor's i8042 has no output buffer",
                )
        else:
            admitted.virtio.append((device, instance, virtio_state(kind, state)))
    return admitted


def _placement(placement: tuple[str, int, int, int]) -> str:
    bus, base, size, gsi = placement
    return f"{bus} {base:#x}+{size:#x} gsi {gsi}"
