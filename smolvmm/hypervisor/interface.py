"""The narrow interface between the monitor and a hypervisor.

The monitor (``smolvmm.monitor.vm``, ``smolvmm.monitor.vcpu``, ``smolvmm.monitor.machine``, ``smolvmm.monitor.snapshot``,
``smolvmm.monitor.restore``) sees only these operations; ``smolvmm.hypervisor.kvm`` implements them on
Linux KVM, and docs/hypervisor-hvf.md says how macOS Hypervisor.framework would. Architecture
state (registers, interrupt controllers, timers, clocks) crosses the interface as the bundle
format's records, so the monitor stores and restores it without knowing how the backend reads it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from smolvmm.arch.interface import HostOffer

StateRecord = Mapping[str, Any]
"""A ``smolformat.<arch>.VcpuState`` or ``VmState`` value: the payload of a bundle's VCPU_STATE
or VM_STATE section, as smolformat builds and parses it."""


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


@dataclass(frozen=True)
class Capabilities:
    """What the hypervisor does without a trip through the monitor."""

    ioeventfd: bool  # ``Vm.ioeventfd``: a guest MMIO write signals an eventfd without an exit
    irqfd: bool  # ``Vm.irqfd``: an eventfd write raises an interrupt line without the monitor
    irqchip: bool  # the interrupt controllers are emulated by the hypervisor, their state in save_state


class IoBus(Protocol):
    """What ``Vcpu.run`` needs of a port or MMIO bus (``smolvmm.devices.bus.Bus`` is one): the value
    of a ``size``-byte read at a guest address, and a ``size``-byte write of ``value``; and the
    registers it may serve itself, from words in host memory (``Bus.add_word``)."""

    @property
    def words(self) -> Sequence[tuple[int, int, bool]]: ...

    def read(self, address: int, size: int) -> int: ...

    def write(self, address: int, size: int, value: int) -> None: ...


class Vcpu(Protocol):
    """One virtual CPU, driven by exactly one thread."""

    id: int

    def run(self, pio: IoBus, mmio: IoBus) -> Stop:
        """Run the guest, serving port and MMIO accesses from ``pio``/``mmio`` inline, until it stops."""

    def interrupt(self) -> None:
        """Make ``run`` return INTERRUPTED as soon as possible, or at once if it is entered later.

        A backend whose run call blocks needs the caller to also signal the running thread.
        """

    def clear_interrupt(self) -> None:
        """Let ``run`` enter the guest again."""

    def set_boot_state(self, *, vcpus: int, entry: int, argument: int) -> None:
        """The state a directly loaded kernel starts in, for a machine of ``vcpus`` vCPUs.

        vCPU 0 starts at ``entry`` with ``argument`` in the boot protocol's register (x86_64:
        boot_params in rsi; arm64: the device tree in x0); the others wait for the guest to
        start them (INIT-SIPI, PSCI CPU_ON).
        """

    def save_state(self) -> StateRecord:
        """Every register of this vCPU (and its per-CPU interrupt controller and timer state)."""

    def restore_state(self, state: StateRecord, *, strict: bool = True) -> Callable[[], int]:
        """Load ``save_state``'s record into a vCPU that has not run, in two steps: this call loads
        the registers that name no guest page, before guest RAM is registered; the step it
        returns loads the rest once it is (x86_64: MSRs such as kvmclock's name guest pages) and
        returns how many saved registers were skipped. Without ``strict`` (a restore that is only
        measured, never run), registers this host does not have are skipped instead of failing."""

    def close(self) -> None: ...


class Vm(Protocol):
    """One virtual machine: memory slots, vCPUs, interrupt and notification plumbing, VM-wide state."""

    def map_memory(self, slot: int, gpa: int, size: int, host_address: int, *, log_dirty: bool = False) -> None:
        """Back guest-physical ``[gpa, gpa + size)`` with host memory at ``host_address``."""

    def dirty_pages(self, slot: int, size: int) -> bytes:
        """A bitmap of the pages of ``slot`` written since the last call (needs ``log_dirty``)."""

    def create_vcpu(self, index: int) -> Vcpu: ...

    def irq_line(self, gsi: int, level: int) -> None:
        """Drive interrupt line ``gsi`` (x86_64: a GSI; arm64: an SPI) to ``level``."""

    def irqfd(self, eventfd: int, gsi: int) -> None:
        """Each write to ``eventfd`` pulses line ``gsi`` (needs ``Capabilities.irqfd``)."""

    def ioeventfd(self, eventfd: int, address: int, length: int, datamatch: int | None) -> None:
        """A guest MMIO write of ``datamatch`` to ``address`` signals ``eventfd`` instead of
        exiting (needs ``Capabilities.ioeventfd``)."""

    def save_state(self) -> StateRecord:
        """The VM-wide state: interrupt controllers, platform timers, the guest clock."""

    def restore_state(self, state: StateRecord) -> None:
        """Load ``save_state``'s record, before any vCPU runs; the guest clock carries on from it."""

    def hold_clock(self) -> None:
        """While every vCPU is parked: note the guest clock, so ``release_clock`` hides the pause."""

    def release_clock(self) -> None:
        """Before the vCPUs run again: the guest clock carries on from where ``hold_clock`` read it
        (nothing if it was not held)."""

    def close(self) -> None: ...


class Hypervisor(Protocol):
    """An open hypervisor: what it is, what it does in the kernel, and VM creation."""

    flavour: str  # recorded in bundles, e.g. "kvm-hardware" or "kvm-pvm"
    capabilities: Capabilities

    @property
    def offer(self) -> HostOffer:
        """What saved vCPU state this host's hypervisor takes (see ``HostOffer``)."""

    def create_vm(self) -> Vm:
        """A new VM with the platform's interrupt controllers and timers."""

    def close(self) -> None: ...
