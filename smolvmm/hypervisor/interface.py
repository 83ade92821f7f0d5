"""The narrow interface between the monitor and a hypervisor.

The monitor (``smolvmm.vm``, ``smolvmm.vcpu``, ``smolvmm.machine``) sees only these
operations; ``smolvmm.hypervisor.kvm`` implements them on Linux KVM, and
docs/hypervisor-hvf.md says how macOS Hypervisor.framework would. Architecture state
(registers, interrupt controllers, clocks) is read and written by the per-arch state code
(``smolvmm.arch.<arch>.state``), which is written against one backend.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from ..devices.bus import Bus

CpuidEntry = tuple[int, int, int, int, int, int, int]  # function, index, flags, eax, ebx, ecx, edx


class StopKind(enum.Enum):
    """Why ``Vcpu.run`` returned to the monitor (port and MMIO accesses never return)."""

    INTERRUPTED = "interrupted"  # asked to by ``interrupt()`` (pause, stop), or a signal
    POWEROFF = "poweroff"  # the guest asked the platform to power off
    RESET = "reset"  # the guest reset the CPU (triple fault, reset request)
    CRASH = "crash"  # the hypervisor cannot continue this guest; ``detail`` says why


@dataclass(frozen=True)
class Stop:
    kind: StopKind
    detail: str = ""


class Vcpu(Protocol):
    """One virtual CPU, driven by exactly one thread."""

    id: int

    def run(self, pio: Bus, mmio: Bus) -> Stop:
        """Run the guest, serving port and MMIO accesses from ``pio``/``mmio`` inline, until it stops."""

    def interrupt(self) -> None:
        """Make ``run`` return INTERRUPTED as soon as possible, or at once if it is entered later.

        A backend whose run call blocks needs the caller to also signal the running thread.
        """

    def clear_interrupt(self) -> None:
        """Let ``run`` enter the guest again."""

    def close(self) -> None: ...


class Vm(Protocol):
    """One virtual machine: memory slots, vCPUs, interrupt and notification plumbing."""

    def map_memory(self, slot: int, gpa: int, size: int, host_address: int, *, log_dirty: bool = False) -> None:
        """Back guest-physical ``[gpa, gpa + size)`` with host memory at ``host_address``."""

    def dirty_pages(self, slot: int, size: int) -> bytes:
        """A bitmap of the pages of ``slot`` written since the last call (needs ``log_dirty``)."""

    def create_vcpu(self, index: int) -> Vcpu: ...

    def irqfd(self, eventfd: int, gsi: int) -> None:
        """Each write to ``eventfd`` pulses interrupt line ``gsi`` without a trip through the monitor."""

    def ioeventfd(self, eventfd: int, address: int, length: int, datamatch: int | None) -> None:
        """A guest MMIO write of ``datamatch`` to ``address`` signals ``eventfd`` instead of exiting."""

    def irq_line(self, gsi: int, level: int) -> None: ...

    def close(self) -> None: ...


class Hypervisor(Protocol):
    """An open hypervisor: what it is, what it supports, and VM creation."""

    flavour: str  # recorded in bundles, e.g. "kvm-hardware" or "kvm-pvm"

    def create_vm(self) -> Vm:
        """A new VM with the platform's in-kernel interrupt controllers and timers."""

    def supported_cpuid(self) -> list[CpuidEntry]: ...

    def saved_msrs(self) -> list[int]:
        """The MSR indices a snapshot saves for each vCPU."""

    def xsave_size(self) -> int:
        """Bytes of a vCPU's extended (XSAVE) state."""

    def close(self) -> None: ...
