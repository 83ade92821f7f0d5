"""One machine plan, from a ``MachineConfig`` (cold boot) or a bundle (restore), and the one place
that wires a machine from it.

A plan is plain data: the vCPUs, the RAM regions, the console, the command line and every virtio
device in slot order with its host side (disk files, network wire, console role). Cold boot and
restore differ only in what they put into guest RAM and registers afterwards (a kernel, or the
saved state); the machine itself is assembled by ``assemble`` for both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import smolformat
from smolvmm.agent.channel import AgentPort
from smolvmm.arch.machines import arch_named, host_arch
from smolvmm.config import MachineConfig, NetConfig, bundle_disk, console_roles, networks_for
from smolvmm.devices.uart import UartState
from smolvmm.devices.virtio.block import VirtioBlock
from smolvmm.devices.virtio.console import VirtioConsole
from smolvmm.devices.virtio.device import VirtioDevice
from smolvmm.devices.virtio.net import VirtioNet
from smolvmm.devices.virtio.ports import UnixSocketPort
from smolvmm.devices.virtio.rng import VirtioRng
from smolvmm.errors import BundleError, ConfigError
from smolvmm.host.memory import GuestMemory
from smolvmm.hypervisor.interface import Hypervisor
from smolvmm.monitor.console import VirtioConsoleInput
from smolvmm.monitor.dhcp import DHCP_ARG
from smolvmm.monitor.exit import MachineExit
from smolvmm.monitor.usernet import UnpluggedBackend, open_backend, open_vhost, user_networking_unavailable
from smolvmm.monitor.vm import StartedVm, VirtualMachine

ConsoleRole = Literal["main", "agent", "socket"]


@dataclass(frozen=True)
class ConsolePort:
    """A virtio console: the machine's console (``main``), the guest agent's, or a Unix socket's."""

    role: ConsoleRole
    socket: Path | None = None  # for ``socket``


@dataclass(frozen=True)
class Disk:
    """A virtio-blk disk: the read-only ``base`` under a writable ``overlay`` (temporary if None)."""

    base: Path
    read_only: bool
    overlay: Path | None
    serial: str


@dataclass(frozen=True)
class Network:
    """A virtio-net card on ``net``'s wire with MAC ``mac`` (random if None); ``unplugged`` says
    why it has no wire (a card saved on user networking, restored where the host cannot give it)."""

    net: NetConfig
    mac: bytes | None
    unplugged: str | None = None


@dataclass(frozen=True)
class Entropy:
    """A virtio-rng device."""


Device = ConsolePort | Disk | Network | Entropy


@dataclass(frozen=True)
class RestoreOverrides:
    """What a restore may change: host-side resources, never guest-visible state."""

    networks: tuple[NetConfig, ...] = ()
    console_socket: Path | None = None
    overlays: tuple[Path | None, ...] = ()


@dataclass(frozen=True)
class MachinePlan:
    """A machine as plain data: its architecture, vCPUs, RAM regions (gpa, size), console, command
    line and virtio devices in slot order; ``config`` is what ``Machine.config`` shows."""

    arch: str
    vcpus: int
    ram: tuple[tuple[int, int], ...]
    console: Literal["serial", "virtio"]
    cmdline: str
    devices: tuple[Device, ...]
    config: MachineConfig

    @property
    def unplugged(self) -> str | None:
        """Why the restore left its network cards without a wire, if it did."""
        return next((d.unplugged for d in self.devices if isinstance(d, Network) and d.unplugged), None)

    @property
    def has_agent(self) -> bool:
        """Whether the machine has the guest agent's console port."""
        return ConsolePort("agent") in self.devices

    @classmethod
    def from_config(cls, config: MachineConfig, cmdline: str) -> MachinePlan:
        """The machine ``config`` describes, of this host's architecture, booting with ``cmdline``
        (its console and agent are added here). Slots: the main console first (so it is hvc0), the guest agent's console
        (next hvc), then disks (the first is /dev/vda), networks, the console socket, entropy."""
        devices: list[Device] = [ConsolePort("main")] if config.console == "virtio" else []
        devices.append(ConsolePort("agent"))
        devices += [
            Disk(disk.path, disk.read_only, disk.overlay, f"smolvmm-disk{index}")
            for index, disk in enumerate(config.disks)
        ]
        devices += [Network(net, net.mac) for net in config.networks]
        if config.console_socket is not None:
            devices.append(ConsolePort("socket", config.console_socket))
        devices.append(Entropy())
        arch = host_arch()
        return cls(
            arch=arch.name,
            vcpus=config.vcpus,
            ram=tuple(arch.ram_regions(config.memory)),
            console=config.console,
            cmdline=boot_cmdline(cmdline, config),
            devices=tuple(devices),
            config=config,
        )

    @classmethod
    def from_bundle(cls, bundle: smolformat.Bundle, overrides: RestoreOverrides) -> MachinePlan:
        """The machine saved in ``bundle``, its host sides from ``overrides``; ConfigError when the
        bundle needs a host resource not given, BundleError for a device this monitor lacks."""
        config = bundle.config
        roles = console_roles(bundle)
        saved_nets = sum(1 for d in config.devices if d.kind == "virtio-net")
        networks = list(networks_for(bundle.labels, saved_nets, overrides.networks))
        # Cards nobody asked for by name (the bundle's own user networks) do without a wire here,
        # as a container runs on a host without a network; one asked for fails if it cannot have one.
        unplugged = None if overrides.networks or not networks else user_networking_unavailable()
        devices: list[Device] = []
        for entry in config.devices:
            if entry.bus != "mmio":
                continue
            if entry.kind == "virtio-blk":
                index = entry.params.disk
                overlay = overrides.overlays[index] if index < len(overrides.overlays) else None
                devices.append(Disk(bundle_disk(bundle, index), entry.params.read_only, overlay, entry.params.serial))
            elif entry.kind == "virtio-net":
                net = networks.pop(0)
                devices.append(Network(net, net.mac or entry.params.mac, unplugged))
            elif entry.kind == "virtio-console":
                role = roles.pop(0)
                if role in ("main", "agent"):
                    devices.append(ConsolePort(cast(ConsoleRole, role)))
                elif role == "socket" and overrides.console_socket is not None:
                    devices.append(ConsolePort("socket", overrides.console_socket))
                else:
                    raise ConfigError("the bundle has a console socket device: pass --console-socket PATH")
            elif entry.kind == "virtio-rng":
                devices.append(Entropy())
            else:
                raise BundleError(f"the bundle has a {entry.kind} device this monitor cannot restore")
        memory = sum(r.size for r in config.ram)
        return cls(
            arch=config.arch,
            vcpus=config.vcpu_count,
            ram=tuple((r.gpa, r.size) for r in config.ram),
            console="virtio" if ConsolePort("main") in devices else "serial",
            cmdline=config.cmdline,
            devices=tuple(devices),
            config=MachineConfig(vcpus=config.vcpu_count, memory=memory),
        )


def with_console(cmdline: str, console: str) -> str:
    """``cmdline`` with its console= replaced by hvc0 when the machine's console is virtio."""
    if console == "serial":
        return cmdline
    return re.sub(r"\bconsole=\S+", "", cmdline).strip() + " console=hvc0"


def boot_cmdline(cmdline: str, config: MachineConfig) -> str:
    """``cmdline`` for ``config``'s machine: its console, the agent's port, DHCP for user networks
    and the config's extra arguments."""
    cmdline = with_console(cmdline, config.console)
    # The agent's console comes right after the main one: hvc1 when the console is virtio.
    cmdline += f" smolvmm.agent=hvc{1 if config.console == 'virtio' else 0}"
    dhcp = [f"eth{index}" for index, net in enumerate(config.networks) if net.mode == "user"]
    if dhcp:  # the guest asks passt for its address (a TAP network is the user's to address)
        cmdline += f" {DHCP_ARG}={','.join(dhcp)}"
    if config.extra_cmdline:
        cmdline = f"{cmdline} {config.extra_cmdline}"
    return cmdline


@dataclass
class Assembled:
    """A machine wired from its plan, before anything is loaded into it: the VM (with every
    device attached, in plan order) and the guest agent's port."""

    vm: VirtualMachine
    agent: AgentPort


def assemble(
    plan: MachinePlan,
    memory: GuestMemory,
    on_exit: Callable[[MachineExit], None],
    uart_state: UartState | None = None,
    hypervisor: Hypervisor | None = None,
    started: StartedVm | None = None,
) -> Assembled:
    """Create the VM of ``plan`` on ``memory`` and ``hypervisor`` (this host's when None), or
    take the one ``started`` on them, all of which it then owns, and attach its devices."""
    main = VirtioConsoleInput() if plan.console == "virtio" else None
    agent = AgentPort()
    try:
        arch = arch_named(plan.arch)
        vm = VirtualMachine(
            memory, plan.vcpus, on_exit, main, uart_state, hypervisor=hypervisor, arch=arch, started=started
        )
    except BaseException:
        agent.close()
        raise
    try:
        for device in plan.devices:
            virtio, role = _device(device, main, agent)
            vm.add_virtio(virtio, role)
    except BaseException:
        vm.close()
        agent.close()  # if no console device took it yet (closing twice is harmless)
        raise
    return Assembled(vm, agent)


def _device(device: Device, main: VirtioConsoleInput | None, agent: AgentPort) -> tuple[VirtioDevice, str | None]:
    """The device model for one planned device, with its console role."""
    if isinstance(device, Disk):
        return VirtioBlock(device.base, device.read_only, device.overlay, serial=device.serial), None
    if isinstance(device, Network):
        if device.unplugged is not None:
            return VirtioNet(UnpluggedBackend(), device.mac), None
        backend = open_backend(device.net)
        try:
            vhost = open_vhost(device.net)
        except BaseException:
            backend.close()
            raise
        return VirtioNet(backend, device.mac, vhost), None
    if isinstance(device, Entropy):
        return VirtioRng(), None
    if device.role == "main":
        assert main is not None  # a plan with a main console port has the virtio console
        return VirtioConsole(main), "main"
    if device.role == "agent":
        return VirtioConsole(agent), "agent"
    assert device.socket is not None
    return VirtioConsole(UnixSocketPort(device.socket)), "socket"
