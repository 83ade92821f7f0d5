"""Restoring a machine from a .smolmachine bundle, up to (not including) the first guest entry.

Guest RAM is the bundle's raw pages mapped ``MAP_PRIVATE`` (never read in whole), or a zstd
bundle decoded into anonymous memory. Base disks are materialised once into the cache, keyed
by the bundle's digest, and every instance writes to its own fresh overlay.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import smolformat
from smolvmm.agent.channel import AgentPort
from smolvmm.config import CONSOLE_ROLES_LABEL, MachineConfig, NetConfig, bundle_disk, networks_for, open_bundle
from smolvmm.devices.virtio.block import VirtioBlock
from smolvmm.devices.virtio.console import VirtioConsole
from smolvmm.devices.virtio.device import VirtioDevice
from smolvmm.devices.virtio.net import VirtioNet
from smolvmm.devices.virtio.ports import UnixSocketPort
from smolvmm.devices.virtio.rng import VirtioRng
from smolvmm.errors import BundleError, ConfigError, HypervisorError
from smolvmm.host.memory import GuestMemory
from smolvmm.monitor import boundary
from smolvmm.monitor.console import VirtioConsoleInput
from smolvmm.monitor.timings import Timings
from smolvmm.monitor.usernet import open_backend
from smolvmm.monitor.vcpu import MachineExit
from smolvmm.monitor.vm import VirtualMachine

if TYPE_CHECKING:
    from smolvmm.monitor.signing import TrustedKeys


@dataclass(frozen=True)
class Restored:
    """A VM rebuilt from a bundle, paused before its first guest entry."""

    vm: VirtualMachine
    config: MachineConfig
    cmdline: str
    digest: bytes
    labels: dict[str, str]
    agent: AgentPort | None
    new_macs: dict[str, bytes]  # guest interface name -> the MAC this instance was asked to use


@dataclass(frozen=True)
class RestoreOverrides:
    """What a restore may change: host-side resources, never guest-visible state."""

    networks: tuple[NetConfig, ...] = ()
    console_socket: Path | None = None
    overlays: tuple[Path | None, ...] = ()


RESTORES_ON: dict[str, frozenset[str]] = {
    "kvm-hardware": frozenset({"kvm-hardware"}),
    "kvm-pvm": frozenset({"kvm-pvm"}),
}
"""The hypervisor flavours a bundle's state is known to run on, by the flavour that saved it
(``METADATA.hypervisor``). Only the same flavour: PVM and hardware KVM differ in CPU state
(MSRs, CPUID). A flavour not listed here, or none recorded, restores nowhere."""


def check_flavour(saved: str, host: str) -> None:
    """Refuse state saved under ``saved`` unless ``RESTORES_ON`` says it runs on ``host``."""
    if host in RESTORES_ON.get(saved, ()):
        return
    if not saved:
        raise BundleError(f"the bundle does not record the hypervisor that saved it, so it may not run on {host}")
    why = "their CPU state is not compatible" if saved in RESTORES_ON else f"smolvmm does not know {saved}"
    raise BundleError(f"the bundle was saved under {saved} and this host is {host}: {why}")


def _devices(
    bundle: smolformat.Bundle,
    overrides: RestoreOverrides,
    roles: list[str],
    main: VirtioConsoleInput | None,
    agent: AgentPort,
) -> list[tuple[VirtioDevice, str | None]]:
    """Fresh device objects for the bundle's virtio devices, in slot order, with console roles."""
    devices: list[tuple[VirtioDevice, str | None]] = []
    saved_nets = sum(1 for d in bundle.config.devices if d.kind == "virtio-net")
    networks = list(networks_for(bundle.labels, saved_nets, overrides.networks))
    roles = list(roles)
    try:
        for entry in bundle.config.devices:
            if entry.bus != "mmio":
                continue
            if entry.kind == "virtio-blk":
                index = entry.params.disk
                overlay = overrides.overlays[index] if index < len(overrides.overlays) else None
                device: VirtioDevice = VirtioBlock(
                    bundle_disk(bundle, index), entry.params.read_only, overlay, entry.params.serial
                )
                devices.append((device, None))
            elif entry.kind == "virtio-net":
                net = networks.pop(0)
                devices.append((VirtioNet(open_backend(net), net.mac or entry.params.mac), None))
            elif entry.kind == "virtio-console":
                role = roles.pop(0) if roles else "socket"
                if role == "main" and main is not None:
                    devices.append((VirtioConsole(main), role))
                elif role == "agent":
                    devices.append((VirtioConsole(agent), role))
                elif role == "socket" and overrides.console_socket is not None:
                    devices.append((VirtioConsole(UnixSocketPort(overrides.console_socket)), role))
                else:
                    raise ConfigError("the bundle has a console socket device: pass --console-socket PATH")
            elif entry.kind == "virtio-rng":
                devices.append((VirtioRng(), None))
            else:
                raise BundleError(f"the bundle has a {entry.kind} device this monitor cannot restore")
    except BaseException:
        for device, _ in devices:
            device.close()
        raise
    return devices


def restore_vm_from(
    path: str | os.PathLike[str],
    overrides: RestoreOverrides,
    on_exit: Callable[[MachineExit], None],
    timings: Timings,
    *,
    same_flavour: bool = True,
    trusted_keys: TrustedKeys | None = None,
) -> Restored:
    """Rebuild a paused VM from ``path``.

    ``same_flavour=False`` skips the hypervisor-flavour check, for a restore that never runs.
    With ``trusted_keys``, a bundle whose content no trusted key signed is refused first.
    """
    with open_bundle(path) as bundle:
        if trusted_keys is not None:
            from smolvmm.monitor.signing import check_signature  # cryptography is imported only for signed restores

            check_signature(bundle, trusted_keys)
            timings.mark("signature")
        if bundle.config.arch != "x86_64":
            raise BundleError(f"the bundle is for {bundle.config.arch}; this monitor runs x86_64 guests")
        saved_devices = boundary.admit_devices(bundle.config.devices, bundle.devices)
        timings.mark("parse")
        memory = GuestMemory.anonymous([(r.gpa, r.size) for r in bundle.config.ram])
        try:
            if bundle.memory_encoding == "raw":
                memory.map_file(bundle.fileno(), bundle.memory_extents())
            else:
                bundle.read_memory_into([memory.region_view(i) for i in range(len(memory.regions))])
        except BaseException:
            memory.close()
            raise
        timings.mark("memory_map")
        labels = bundle.labels
        roles = [r for r in labels.get(CONSOLE_ROLES_LABEL, "").split(",") if r]
        main = VirtioConsoleInput() if "main" in roles else None
        agent = AgentPort()
        vm = VirtualMachine(memory, bundle.config.vcpu_count, on_exit, main, saved_devices.uart)
        try:
            if same_flavour:
                check_flavour(bundle.metadata.hypervisor if bundle.metadata else "", vm.hypervisor.flavour)
            # Everything from the bundle is admitted before any of it reaches an ioctl or a device.
            offer = vm.hypervisor.offer
            vm_state = boundary.admit_vm(bundle.vm_state)
            vcpu_states = [boundary.admit_vcpu(s, i, offer, strict=same_flavour) for i, s in enumerate(bundle.vcpus)]
            new_macs: dict[str, bytes] = {}
            transports = []
            devices = _devices(bundle, overrides, roles, main, agent)
            for (device, role), (_, instance, state) in zip(devices, saved_devices.virtio, strict=True):
                transport = vm.add_virtio(device, role)
                new_mac = isinstance(device, VirtioNet) and device.mac != state.device.mac
                if new_mac:
                    # A new MAC for this clone: the device reports it, the guest agent applies it.
                    new_macs[f"eth{instance}"] = device.mac
                    state = dataclasses.replace(state, device=dataclasses.replace(state.device, mac=device.mac))
                transport.check_state(state)
                transports.append((transport, state, new_mac))
            timings.mark("devices")
            try:
                vm.vm.restore_state(vm_state)
                pairs = zip(vm.vcpus, vcpu_states, strict=True)
                skipped = sum(vcpu.restore_state(s.state, strict=same_flavour) + s.dropped for vcpu, s in pairs)
            except HypervisorError as exc:  # a value the boundary admitted but the hypervisor checks further
                raise BundleError(f"{path}: this host's hypervisor refused the saved state: {exc}") from exc
            for transport, state, new_mac in transports:
                transport.restore_state(state)
                if new_mac:
                    transport.config_changed()
            timings.mark("vm_vcpu_state")
            if skipped:
                timings.note("msrs_skipped", skipped)
        except BaseException:
            vm.close()
            agent.close()  # if no console device took it yet (closing twice is harmless)
            raise
        config = MachineConfig(vcpus=bundle.config.vcpu_count, memory=sum(r.size for r in bundle.config.ram))
        return Restored(
            vm, config, bundle.config.cmdline, bundle.digest, labels, agent if "agent" in roles else None, new_macs
        )
