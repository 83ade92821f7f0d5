"""Assembling a machine for a cold boot: kernel, initrd and command line onto a fresh VM; or
the configuration to cold-boot a bundle that carries its kernel."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from smolvmm.agent.channel import AgentPort
from smolvmm.arch.x86_64 import layout
from smolvmm.config import DiskConfig, MachineConfig, NetConfig
from smolvmm.devices.virtio.block import VirtioBlock
from smolvmm.devices.virtio.console import VirtioConsole
from smolvmm.devices.virtio.device import VirtioDevice
from smolvmm.devices.virtio.net import VirtioNet
from smolvmm.devices.virtio.ports import UnixSocketPort
from smolvmm.devices.virtio.rng import VirtioRng
from smolvmm.errors import BundleError, ConfigError
from smolvmm.host.cache import cache_root
from smolvmm.host.memory import GuestMemory
from smolvmm.images.cache import cached_file
from smolvmm.monitor.console import VirtioConsoleInput
from smolvmm.monitor.timings import Timings
from smolvmm.monitor.usernet import DHCP_ARG, open_backend
from smolvmm.monitor.vm import VirtualMachine

if TYPE_CHECKING:
    from smolvmm.monitor.machine import Machine


def boot_files(config: MachineConfig) -> tuple[Path, Path | None, str]:
    """(kernel, initrd, cmdline): the config's own, or the default or minimal guest's (built on first use)."""
    if isinstance(config.kernel, Path):
        cmdline = config.cmdline if config.cmdline is not None else "console=ttyS0 reboot=k panic=-1"
        return config.kernel, config.initrd, cmdline
    from smolvmm.images.guest import default_guest, minimal_guest

    guest = default_guest() if config.kernel is None else minimal_guest()
    return guest.kernel, guest.initrd, config.cmdline if config.cmdline is not None else guest.cmdline


def virtio_devices(
    config: MachineConfig, main: VirtioConsoleInput | None, agent: AgentPort
) -> list[tuple[VirtioDevice, str | None]]:
    """The configured virtio devices in slot order, each with its console role: the main console
    first (so it is hvc0), the guest agent's console (next hvc), then disks (the first is
    /dev/vda), networks, the console socket and an entropy source."""
    devices: list[tuple[VirtioDevice, str | None]] = []
    try:
        if main is not None:
            devices.append((VirtioConsole(main), "main"))
        devices.append((VirtioConsole(agent), "agent"))
        for index, disk in enumerate(config.disks):
            devices.append((VirtioBlock(disk.path, disk.read_only, disk.overlay, serial=f"smolvmm-disk{index}"), None))
        for net in config.networks:
            devices.append((VirtioNet(open_backend(net), net.mac), None))
        if config.console_socket is not None:
            devices.append((VirtioConsole(UnixSocketPort(config.console_socket)), "socket"))
        devices.append((VirtioRng(), None))
    except BaseException:
        for device, _ in devices:
            device.close()
        raise
    return devices


def with_console(cmdline: str, console: str) -> str:
    """``cmdline`` with its console= replaced by hvc0 when the machine's console is virtio."""
    if console == "serial":
        return cmdline
    return re.sub(r"\bconsole=\S+", "", cmdline).strip() + " console=hvc0"


def create_for_boot(cls: type[Machine], config: MachineConfig) -> Machine:
    timings = Timings()
    kernel, initrd, cmdline = boot_files(config)
    cmdline = with_console(cmdline, config.console)
    # The agent's console comes right after the main one: hvc1 when the console is virtio.
    cmdline += f" smolvmm.agent=hvc{1 if config.console == 'virtio' else 0}"
    dhcp = [f"eth{index}" for index, net in enumerate(config.networks) if net.mode == "user"]
    if dhcp:  # the guest asks passt for its address (a TAP network is the user's to address)
        cmdline += f" {DHCP_ARG}={','.join(dhcp)}"
    if config.extra_cmdline:
        cmdline = f"{cmdline} {config.extra_cmdline}"
    memory = GuestMemory.anonymous(layout.ram_regions(config.memory))
    machine: Machine | None = None
    console = VirtioConsoleInput() if config.console == "virtio" else None
    agent = AgentPort()
    vm = VirtualMachine(memory, config.vcpus, lambda exit: machine._record_exit(exit) if machine else None, console)
    try:
        for device, role in virtio_devices(config, console, agent):
            vm.add_virtio(device, role)
        vm.setup_boot(kernel, initrd, cmdline)
        timings.mark("load_kernel")
        tasks = [(f"virtio-{t.device.__class__.__name__}{i}", t.run) for i, t in enumerate(vm.transports)]
        timings.mark("devices")

        def read_boot_files() -> tuple[bytes, bytes | None]:
            return kernel.read_bytes(), initrd.read_bytes() if initrd else None

        machine = cls(vm, config, tasks, cmdline, timings, agent=agent, boot_files=read_boot_files)
    except BaseException:
        vm.close()
        raise
    return machine


def config_from_bundle(
    path: str | os.PathLike[str], networks: tuple[NetConfig, ...] = (), console_socket: Path | None = None
) -> MachineConfig:
    """The configuration that cold-boots bundle ``path`` from its own kernel and initrd: its
    vCPUs, RAM, command line and console, its disks as they were saved (each with a fresh
    overlay), ``networks`` for its network devices and ``console_socket`` for its socket console.

    The kernel, initrd and disks are written once into the cache, keyed by the bundle's digest.
    """
    from smolvmm.monitor.restore import base_disk, networks_for, open_bundle
    from smolvmm.monitor.snapshot import CONSOLE_ROLES_LABEL

    with open_bundle(path) as bundle:
        if bundle.config.arch != "x86_64":
            raise BundleError(f"the bundle is for {bundle.config.arch}; this monitor runs x86_64 guests")
        kernel = bundle.kernel
        if kernel is None:
            raise BundleError(f"{path} has no kernel to cold-boot (save it with `build --bootable`)")
        directory = cache_root() / "bundle-boot" / bundle.digest.hex()
        initrd = bundle.initrd
        labels = bundle.labels
        roles = labels.get(CONSOLE_ROLES_LABEL, "").split(",")
        devices = bundle.config.devices
        networks = networks_for(labels, sum(1 for d in devices if d.kind == "virtio-net"), networks)
        if "socket" in roles and console_socket is None:
            raise ConfigError("the bundle has a console socket device: pass --console-socket PATH")
        disks = tuple(
            DiskConfig(base_disk(bundle, d.params.disk), read_only=d.params.read_only)
            for d in devices
            if d.kind == "virtio-blk"
        )
        cmdline = re.sub(r"\s*\bsmolvmm\.(?:agent|dhcp)=\S+", "", bundle.config.cmdline)  # added again by the boot
        return MachineConfig(
            kernel=cached_file(directory / "vmlinuz", lambda partial: partial.write_bytes(kernel)),
            initrd=cached_file(directory / "initrd.img", lambda partial: partial.write_bytes(initrd))
            if initrd
            else None,
            cmdline=cmdline,
            vcpus=bundle.config.vcpu_count,
            memory=sum(r.size for r in bundle.config.ram),
            disks=disks,
            networks=networks,
            console="virtio" if "main" in roles else "serial",
            console_socket=console_socket if "socket" in roles else None,
        )
