"""Saving a paused machine into a .smolmachine bundle (the restore side is smolvmm.monitor.restore).

The caller pauses the vCPUs and stops the device tasks first (``Machine.snapshot`` does), so
every register, queue index and used ring is at rest while it is read here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import smolformat
from smolformat.tempnames import owned_prefix, remove_stale
from smolvmm import progress
from smolvmm.config import CONSOLE_ROLES_LABEL, NET_MODES_LABEL
from smolvmm.devices.records import VIRTIO_KINDS, uart_record, virtio_record
from smolvmm.devices.virtio.block import VirtioBlock
from smolvmm.devices.virtio.net import VirtioNet
from smolvmm.errors import BundleError, SmolvmmError
from smolvmm.monitor.vm import VirtualMachine

SCRATCH = "smolvmm-snapshot"  # temporary directories for the flat disk images a snapshot stores
SAVED_PLATFORM_DEVICES = ("uart16550",)  # the platform devices whose state a bundle holds


def _device_config(vm: VirtualMachine) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = [
        {"kind": d.kind, "bus": d.bus, "base": d.base, "size": d.size, "gsi": d.irq, "params": None}
        for d in vm.arch.platform_devices
        if d.kind in SAVED_PLATFORM_DEVICES
    ]
    disk = 0
    for transport, (base, size, gsi) in zip(vm.transports, vm.virtio_slots):
        device = transport.device
        kind = VIRTIO_KINDS[type(device)]
        params: dict[str, Any] | None = None
        if isinstance(device, VirtioBlock):
            params = {"disk": disk, "read_only": device.read_only, "serial": device.save_state().serial}
            disk += 1
        elif isinstance(device, VirtioNet):
            params = {"mac": device.mac}
        devices.append({"kind": kind, "bus": "mmio", "base": base, "size": size, "gsi": gsi, "params": params})
    return devices


@contextlib.contextmanager
def capture(vm: VirtualMachine, cmdline: str, parent_digest: bytes, labels: dict[str, str]) -> Iterator[Any]:
    """The machine's contents as ``smolformat.BundleContents``; disks are folded into temporary
    flat images (base + overlay) that exist until the block exits."""
    remove_stale(tempfile.gettempdir(), SCRATCH)  # what a killed monitor's snapshot left
    with tempfile.TemporaryDirectory(prefix=owned_prefix(SCRATCH)) as scratch:
        disks: list[str] = []
        for transport in vm.transports:
            if isinstance(transport.device, VirtioBlock):
                path = os.path.join(scratch, f"disk{len(disks)}.img")
                transport.device.export(path)
                disks.append(path)
        records = [{"kind": "uart16550", "instance": 0, "state": uart_record(vm.uart.state())}]
        counts: dict[str, int] = {}
        for transport in vm.transports:
            kind = VIRTIO_KINDS[type(transport.device)]
            records.append(
                {"kind": kind, "instance": counts.get(kind, 0), "state": virtio_record(transport.save_state())}
            )
            counts[kind] = counts.get(kind, 0) + 1
        yield smolformat.BundleContents(
            config={
                "arch": vm.arch.name,
                "vcpu_count": len(vm.vcpus),
                "ram": [{"gpa": r.gpa, "size": r.size} for r in vm.memory.regions],
                "cmdline": cmdline,
                "devices": _device_config(vm),
            },
            vcpus=[vcpu.save_state() for vcpu in vm.vcpus],
            vm_state=vm.vm.save_state(),
            devices=records,
            memory=[vm.memory.region_view(i) for i in range(len(vm.memory.regions))],
            disks=disks,
            metadata=smolformat.make_metadata(
                vm.hypervisor.flavour,
                labels={
                    **labels,
                    CONSOLE_ROLES_LABEL: ",".join(vm.console_roles),
                    NET_MODES_LABEL: ",".join(
                        t.device.backend.mode for t in vm.transports if isinstance(t.device, VirtioNet)
                    ),
                },
                parent_digest=parent_digest,
            ),
        )


def write(path: str | os.PathLike[str], contents: Any, encoding: str) -> bytes:
    """Write the bundle atomically; returns its digest."""
    try:
        with progress.task(f"saving {path}") as saving:
            return smolformat.write_bundle(Path(path), contents, memory_encoding=encoding, progress=saving.update)
    except smolformat.FormatError as exc:
        raise BundleError(f"cannot write {path}: {exc}") from exc
    except OSError as exc:  # e.g. a full disk: an I/O error, not a bad bundle; nothing is left at path
        raise SmolvmmError(f"cannot write {path}: {exc.strerror}") from exc
