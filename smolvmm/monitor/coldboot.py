"""Cold boot: a machine planned from its ``MachineConfig``, with its kernel, initrd and command
line loaded into fresh RAM."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from smolvmm.config import MachineConfig
from smolvmm.host.memory import GuestMemory
from smolvmm.monitor.exit import MachineExit
from smolvmm.monitor.plan import Assembled, MachinePlan, assemble
from smolvmm.monitor.timings import Timings


def boot_files(config: MachineConfig) -> tuple[Path, Path | None, str]:
    """(kernel, initrd, cmdline): the config's own, or the default or minimal guest's (built on first use)."""
    if isinstance(config.kernel, Path):
        cmdline = config.cmdline if config.cmdline is not None else "console=ttyS0 reboot=k panic=-1"
        return config.kernel, config.initrd, cmdline
    from smolvmm.images.guest import default_guest, minimal_guest

    guest = default_guest() if config.kernel is None else minimal_guest()
    return guest.kernel, guest.initrd, config.cmdline if config.cmdline is not None else guest.cmdline


@dataclass
class Booting:
    """A machine assembled for a cold boot, its kernel loaded and its vCPUs at the boot entry."""

    assembled: Assembled
    plan: MachinePlan
    kernel: Path
    initrd: Path | None

    def read_boot_files(self) -> tuple[bytes, bytes | None]:
        """The kernel and initrd it boots from (for a bootable snapshot)."""
        return self.kernel.read_bytes(), self.initrd.read_bytes() if self.initrd else None


def prepare_boot(config: MachineConfig, on_exit: Callable[[MachineExit], None], timings: Timings) -> Booting:
    """Plan ``config``'s machine, assemble it and load its kernel; nothing runs yet."""
    kernel, initrd, cmdline = boot_files(config)
    plan = MachinePlan.from_config(config, cmdline)
    assembled = assemble(plan, GuestMemory.anonymous(list(plan.ram)), on_exit)
    try:
        assembled.vm.setup_boot(kernel, initrd, plan.cmdline)
    except BaseException:
        assembled.vm.close()
        raise
    timings.mark("load_kernel")
    timings.mark("devices")
    return Booting(assembled, plan, kernel, initrd)
