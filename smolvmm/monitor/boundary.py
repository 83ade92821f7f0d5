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

from smolvmm.arch.interface import AdmittedVcpu, Arch, HostOffer
from smolvmm.arch.machines import host_arch
from smolvmm.devices.records import uart_state, virtio_state
from smolvmm.devices.uart import UartState
from smolvmm.devices.virtio.mmio import MMIO_SIZE, MmioState
from smolvmm.errors import BundleError

_log = logging.getLogger(__name__)

# The platform devices (smolvmm.arch.interface) whose saved state a restore loads, where the arch puts them.
RESTORED_PLATFORM = ("uart16550", "i8042")


@dataclass
class AdmittedDevices:
    """DEVICES as plain data, paired with CONFIG.devices: the UART (None: a fresh one) and each
    virtio-mmio device's (config entry, instance, transport state), in slot order."""

    uart: UartState | None = None
    virtio: list[tuple[Any, int, MmioState]] = field(default_factory=list)


def refuse(where: str, what: str) -> BundleError:
    """The one-line error for a refused value: ``where`` names the section and field."""
    return BundleError(f"{where}: {what}")


def admit_vcpu(
    state: Mapping[str, Any], vcpu_id: int, offer: HostOffer, *, strict: bool = True, arch: Arch | None = None
) -> AdmittedVcpu:
    """Check one saved vCPU of ``arch`` (this host's by default) against its rules and ``offer``;
    returns it as plain data (see the module), logging one line per value left out."""
    where = f"VCPU_STATE#{vcpu_id}"
    try:
        admitted = (arch or host_arch()).admit_vcpu_state(state, offer, strict=strict)
    except BundleError as exc:  # the arch names the field, this the section
        raise BundleError(f"{where} {exc}") from None
    for name in admitted.left_out:
        _log.warning("%s %s; left out", where, name)
    return admitted


def admit_vm(state: Mapping[str, Any], arch: Arch | None = None) -> dict[str, Any]:
    """Check the saved VM-wide state of ``arch`` (this host's by default); returns it as plain data."""
    try:
        return (arch or host_arch()).admit_vm_state(state)
    except BundleError as exc:  # the arch names the field, this the section
        raise BundleError(f"VM_STATE {exc}") from None


def admit_state(
    arch: Arch, vm_state: Mapping[str, Any], vcpus: Sequence[Mapping[str, Any]], offer: HostOffer, *, strict: bool
) -> tuple[dict[str, Any], list[AdmittedVcpu]]:
    """The saved VM and vCPU states of a bundle of ``arch``, each admitted by that arch's rules."""
    return admit_vm(vm_state, arch), [admit_vcpu(s, i, offer, strict=strict, arch=arch) for i, s in enumerate(vcpus)]


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
