"""Assembling a machine for a cold boot: kernel, initrd and command line onto a fresh VM."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from smolvmm.agent.channel import AgentPort
from smolvmm.arch.x86_64 import layout
from smolvmm.config import MachineConfig
from smolvmm.devices.virtio.block import VirtioBlock
from smolvmm.devices.virtio.console import VirtioConsole
from smolvmm.devices.virtio.device import VirtioDevice
from smolvmm.devices.virtio.net import VirtioNet
from smolvmm.devices.virtio.ports import UnixSocketPort
from smolvmm.devices.virtio.rng import VirtioRng
from smolvmm.host.memory import GuestMemory
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
