"""Assembling a machine for a cold boot: kernel, initrd and command line onto a fresh VM."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .arch.x86_64 import layout
from .config import MachineConfig
from .memory import GuestMemory
from .vm import VirtualMachine

if TYPE_CHECKING:
    from .machine import Machine


def boot_files(config: MachineConfig) -> tuple[Path, Path | None, str]:
    """(kernel, initrd, cmdline): the config's own, or the default guest's (built on first use)."""
    if config.kernel is not None:
        cmdline = config.cmdline if config.cmdline is not None else "console=ttyS0 reboot=k panic=-1"
        return config.kernel, config.initrd, cmdline
    from .images import default_guest

    guest = default_guest()
    return guest.kernel, guest.initrd, config.cmdline if config.cmdline is not None else guest.cmdline


def create_for_boot(cls: type[Machine], config: MachineConfig) -> Machine:
    kernel, initrd, cmdline = boot_files(config)
    if config.extra_cmdline:
        cmdline = f"{cmdline} {config.extra_cmdline}"
    memory = GuestMemory.anonymous(layout.ram_regions(config.memory))
    machine: Machine | None = None
    vm = VirtualMachine(memory, config.vcpus, lambda exit: machine._record_exit(exit) if machine else None)
    try:
        vm.setup_boot(kernel, initrd, cmdline)
        machine = cls(vm, config, [])
    except BaseException:
        vm.close()
        raise
    return machine
