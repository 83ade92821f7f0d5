"""An in-memory hypervisor that plays KVM's part behind ``smolvmm.hypervisor.interface``.

For unit tests of the monitor's own logic (ordering, error paths, cleanup) that need no guest:
guest code never runs here. Each vCPU's ``run`` plays a script of steps instead (port and MMIO
accesses dispatched to the monitor's buses, guest memory writes, register changes, stops), and
otherwise idles as a halted vCPU does with an in-kernel irqchip, until ``interrupt()``. Every call
is recorded in order in one journal; calls can be made to fail; the documented contract (state
read only while vCPUs are out of the guest, state restored before the first run) is checked,
and each breach recorded in ``DoubleHost.violations``.

This never replaces the real-KVM tests (``@pytest.mark.kvm``, tests/test_snapshot_native.py,
tests/test_machine_native.py ...): it cannot show that KVM takes these records or runs a guest.
"""

from __future__ import annotations

import copy
import ctypes
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from smolformat import x86_64 as fmt
from smolvmm.arch.interface import HostOffer
from smolvmm.arch.x86_64 import layout
from smolvmm.devices.bus import Bus
from smolvmm.errors import HypervisorError
from smolvmm.hypervisor.interface import Capabilities, Hypervisor, StateRecord, Stop, StopKind, Vcpu, Vm

PAGE = 4096
MP_RUNNABLE, MP_UNINITIALIZED = 0, 1
XSAVE_SIZE = 4096
TSC_KHZ = 2_400_000
OFFERED_CPUID = {(0, 0): (0xD, 0x756E6547, 0x6C65746E, 0x49656E69), (1, 0): (0x306A9, 0x800, 0x80A02001, 0x178BFBFF)}
OFFERED_MSRS = frozenset({0x10, 0x174, 0xC0000080, 0xC0000081, 0x4B564D01})


class ContractError(AssertionError):
    """The monitor broke the hypervisor interface's contract (also kept in ``violations``)."""


# -- what a vCPU's guest does, step by step ---------------------------------------------------


@dataclass(frozen=True)
class PortIo:
    """A port access (``value`` None: a read), served through the monitor's port bus."""

    port: int
    size: int
    value: int | None = None


@dataclass(frozen=True)
class MmioIo:
    """An MMIO access (``value`` None: a read); a write an ioeventfd matches signals it instead."""

    address: int
    size: int
    value: int | None = None


@dataclass(frozen=True)
class WriteMemory:
    """The guest stores ``data`` at ``gpa`` (marks the pages dirty where the slot logs them)."""

    gpa: int
    data: bytes


@dataclass(frozen=True)
class SetRegisters:
    """The guest's execution leaves these general registers (``struct kvm_regs`` fields) so."""

    values: dict[str, int]


@dataclass(frozen=True)
class Return:
    """``run`` returns ``stop`` (INTERRUPTED without ``interrupt()``: a stray signal's EINTR)."""

    stop: Stop


@dataclass(frozen=True)
class Raise:
    """The run call itself fails (an ioctl error)."""

    error: BaseException


@dataclass(frozen=True)
class Busy:
    """The vCPU stays in one access (a slow device handler) until ``done`` is set: ``interrupt()``
    cannot cut it short."""

    done: threading.Event


Step = PortIo | MmioIo | WriteMemory | SetRegisters | Return | Raise | Busy


# -- the journal -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One journal entry: ``who`` (``hypervisor``, ``vm``, ``vcpu1``, or what a test journals), ``what``, arguments."""

    who: str
    what: str
    args: tuple[Any, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.who}.{self.what}"


@dataclass
class DoubleHost:
    """Hypervisors opened by the monitor (``open`` stands in for ``open_hypervisor``), their
    objects, the shared journal, injected failures and contract breaches."""

    flavour: str = "kvm-hardware"  # a flavour restore accepts, so bundles round-trip through the double
    capabilities: Capabilities = field(default_factory=lambda: Capabilities(ioeventfd=True, irqfd=True, irqchip=True))
    journal: list[Call] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    failures: dict[str, BaseException] = field(default_factory=dict)  # call name -> raised on that call
    hypervisors: list[DoubleHypervisor] = field(default_factory=list)
    vms: list[DoubleVm] = field(default_factory=list)
    host_ns: int = 1_000_000_000  # the host's clock, moved only by ``host_time_passes``
    slot_seconds: float = 0.0  # how long registering a RAM slot takes (KVM takes milliseconds)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self) -> DoubleHypervisor:
        self.record("hypervisor", "open")
        hypervisor = DoubleHypervisor(self)
        self.hypervisors.append(hypervisor)
        return hypervisor

    def record(self, who: str, what: str, *args: Any) -> None:
        """Journal a call, then raise the failure injected for it, if any."""
        call = Call(who, what, args)
        with self._lock:
            self.journal.append(call)
            failure = self.failures.pop(call.name, None)
        if failure is not None:
            raise failure

    def breach(self, message: str) -> None:
        with self._lock:
            self.violations.append(message)
        raise ContractError(message)

    def names(self, *prefixes: str) -> list[str]:
        """The journal's call names, only those starting with one of ``prefixes`` if given."""
        with self._lock:
            names = [call.name for call in self.journal]
        return [n for n in names if not prefixes or n.startswith(prefixes)]

    def host_time_passes(self, ns: int) -> None:
        self.host_ns += ns

    @property
    def vm(self) -> DoubleVm:
        """The newest VM."""
        return self.vms[-1]

    def open_objects(self) -> list[str]:
        """Every hypervisor, VM and vCPU not closed yet."""
        objects: list[Any] = [*self.hypervisors, *self.vms, *(v for vm in self.vms for v in vm.vcpus)]
        return [repr(o) for o in objects if not o.closed]


class DoubleHypervisor:
    def __init__(self, host: DoubleHost) -> None:
        self.host = host
        self.flavour = host.flavour
        self.capabilities = host.capabilities
        self.closed = False

    @property
    def offer(self) -> HostOffer:
        return HostOffer(XSAVE_SIZE, OFFERED_CPUID, OFFERED_MSRS)

    def create_vm(self) -> DoubleVm:
        self.host.record("hypervisor", "create_vm")
        vm = DoubleVm(self.host, self.offer)
        self.host.vms.append(vm)
        return vm

    def close(self) -> None:
        self.host.record("hypervisor", "close")
        self.closed = True

    def __repr__(self) -> str:
        return "hypervisor"


@dataclass
class Slot:
    gpa: int
    size: int
    host_address: int
    log_dirty: bool
    dirty: set[int] = field(default_factory=set)  # page numbers within the slot


class DoubleVm:
    def __init__(self, host: DoubleHost, offer: HostOffer) -> None:
        self.host = host
        self.offer = offer
        self.slots: dict[int, Slot] = {}
        self.vcpus: list[DoubleVcpu] = []
        self.irqfds: dict[int, int] = {}  # eventfd -> gsi
        self.ioeventfds: dict[tuple[int, int, int | None], int] = {}  # (address, length, datamatch) -> eventfd
        self.lines: dict[int, int] = {}  # gsi -> level
        self.pulses: dict[int, int] = {}  # gsi -> interrupts raised (irqfd pulses and rising edges)
        self.clock_offset = 0  # guest clock = host clock - offset
        self.held_clock: int | None = None
        self.closed = False

    # guest clock (kvmclock): follows the host's clock unless held
    @property
    def guest_ns(self) -> int:
        return self.host.host_ns - self.clock_offset

    def _vcpus_in_guest(self) -> list[int]:
        return [v.id for v in self.vcpus if v.in_run]

    def map_memory(self, slot: int, gpa: int, size: int, host_address: int, *, log_dirty: bool = False) -> None:
        self.host.record("vm", "map_memory", slot, gpa, size, log_dirty)
        if slot in self.slots or any(s.gpa < gpa + size and gpa < s.gpa + s.size for s in self.slots.values()):
            raise HypervisorError(f"KVM_SET_USER_MEMORY_REGION slot {slot}: File exists")
        if gpa % PAGE or size % PAGE or host_address % PAGE or not host_address:
            raise HypervisorError(f"KVM_SET_USER_MEMORY_REGION slot {slot}: Invalid argument")
        time.sleep(self.host.slot_seconds)
        self.slots[slot] = Slot(gpa, size, host_address, log_dirty)

    def dirty_pages(self, slot: int, size: int) -> bytes:
        self.host.record("vm", "dirty_pages", slot)
        found = self.slots.get(slot)
        if found is None or not found.log_dirty:
            raise HypervisorError(f"KVM_GET_DIRTY_LOG slot {slot}: No such file or directory")
        bitmap = bytearray(-(-size // PAGE // 8))
        for page in found.dirty:
            bitmap[page // 8] |= 1 << (page % 8)
        found.dirty.clear()
        return bytes(bitmap)

    def guest_write(self, gpa: int, data: bytes) -> None:
        """Store ``data`` into guest RAM through its host mapping, as the guest would."""
        for slot in self.slots.values():
            if slot.gpa <= gpa and gpa + len(data) <= slot.gpa + slot.size:
                ctypes.memmove(slot.host_address + gpa - slot.gpa, data, len(data))
                first, last = (gpa - slot.gpa) // PAGE, (gpa - slot.gpa + len(data) - 1) // PAGE
                if slot.log_dirty:
                    slot.dirty.update(range(first, last + 1))
                return
        raise HypervisorError(f"guest write at {gpa:#x}: no memory slot there (KVM_EXIT_MMIO)")

    def create_vcpu(self, index: int) -> DoubleVcpu:
        self.host.record("vm", "create_vcpu", index)
        if any(v.id == index for v in self.vcpus):
            raise HypervisorError(f"KVM_CREATE_VCPU {index}: File exists")
        vcpu = DoubleVcpu(self, index)
        self.vcpus.append(vcpu)
        return vcpu

    def irq_line(self, gsi: int, level: int) -> None:
        self.host.record("vm", "irq_line", gsi, level)
        if level and not self.lines.get(gsi):
            self.pulses[gsi] = self.pulses.get(gsi, 0) + 1
        self.lines[gsi] = level

    def irqfd(self, eventfd: int, gsi: int) -> None:
        self.host.record("vm", "irqfd", gsi)
        os.fstat(eventfd)  # EBADF as KVM_IRQFD gives
        self.irqfds[eventfd] = gsi

    def ioeventfd(self, eventfd: int, address: int, length: int, datamatch: int | None) -> None:
        self.host.record("vm", "ioeventfd", address, length, datamatch)
        os.fstat(eventfd)
        self.ioeventfds[(address, length, datamatch)] = eventfd

    def take_interrupts(self, gsi: int) -> int:
        """Interrupts raised on ``gsi`` since the last call: irqfd writes (drained, as KVM
        consumes them) and rising edges of ``irq_line``."""
        count = self.pulses.pop(gsi, 0)
        for fd, line in self.irqfds.items():
            if line == gsi:
                try:
                    count += os.eventfd_read(fd)
                except BlockingIOError:
                    pass
        return count

    def mmio_write(self, address: int, size: int, value: int, mmio: Bus) -> None:
        """A guest MMIO write: an ioeventfd takes it without an exit, else the bus serves it."""
        fd = self.ioeventfds.get((address, size, value), self.ioeventfds.get((address, size, None)))
        if fd is not None:
            os.eventfd_write(fd, 1)
        else:
            mmio.write(address, size, value)

    def save_state(self) -> StateRecord:
        self.host.record("vm", "save_state")
        if running := self._vcpus_in_guest():
            self.host.breach(f"VM state read while vCPU {running} run")
        zero = _zeroed
        clock = self.held_clock if self.held_clock is not None else self.guest_ns
        return {
            "pic_master": zero(fmt.KvmPicState),
            "pic_slave": zero(fmt.KvmPicState),
            "ioapic": {**zero(fmt.KvmIoapicState), "base_address": layout.IOAPIC_ADDR},
            "pit": zero(fmt.KvmPitState2),
            "clock": {**zero(fmt.KvmClockData), "clock": clock},
        }

    def restore_state(self, state: StateRecord) -> None:
        self.host.record("vm", "restore_state")
        if ran := [v.id for v in self.vcpus if v.has_run]:
            self.host.breach(f"VM state restored after vCPU {ran} ran")
        if state["ioapic"]["base_address"] != layout.IOAPIC_ADDR:
            raise HypervisorError("KVM_SET_IRQCHIP: Invalid argument")
        # as KVM_SET_CLOCK without KVM_CLOCK_REALTIME: the guest clock carries on from the saved value
        self.clock_offset = self.host.host_ns - state["clock"]["clock"]

    def hold_clock(self) -> None:
        self.host.record("vm", "hold_clock")
        if running := self._vcpus_in_guest():
            self.host.breach(f"clock held while vCPU {running} run")
        self.held_clock = self.guest_ns

    def release_clock(self) -> None:
        self.host.record("vm", "release_clock")
        if self.held_clock is not None:
            self.clock_offset = self.host.host_ns - self.held_clock
            self.held_clock = None

    def close(self) -> None:
        self.host.record("vm", "close")
        if running := self._vcpus_in_guest():
            self.host.breach(f"VM closed while vCPU {running} run")
        self.closed = True

    def __repr__(self) -> str:
        return f"vm{self.host.vms.index(self)}"


class DoubleVcpu:
    def __init__(self, vm: DoubleVm, index: int) -> None:
        self.vm = vm
        self.host = vm.host
        self.id = index
        self.name = f"vcpu{index}"
        self.state = fresh_vcpu_state(index, vm.offer)
        self.script: deque[Step] = deque()
        self.in_run = False
        self.has_run = False
        self.closed = False
        self._interrupted = False
        self._cond = threading.Condition()

    def feed(self, *steps: Step) -> None:
        """Append steps for the guest on this vCPU to take (from any thread)."""
        with self._cond:
            self.script.extend(steps)
            self._cond.notify_all()

    def run(self, pio: Bus, mmio: Bus) -> Stop:
        self.host.record(self.name, "run")
        if self.closed:
            raise HypervisorError("KVM_RUN: Bad file descriptor")
        self._needs_ram("run")
        self.in_run = self.has_run = True
        stop = Stop(StopKind.CRASH, "not returned")
        try:
            stop = self._run(pio, mmio)
            return stop
        finally:
            self.in_run = False
            self.host.record(self.name, "left", stop.kind.value)

    def _run(self, pio: Bus, mmio: Bus) -> Stop:
        while True:
            with self._cond:
                while not self._interrupted and not self.script:
                    self._cond.wait()  # halted: the in-kernel LAPIC would wake it; here only a kick does
                if self._interrupted:
                    return Stop(StopKind.INTERRUPTED)
                step = self.script.popleft()
            if isinstance(step, PortIo):
                if step.value is None:
                    self.host.record(self.name, "port_read", step.port, pio.read(step.port, step.size))
                else:
                    pio.write(step.port, step.size, step.value)
            elif isinstance(step, MmioIo):
                if step.value is None:
                    self.host.record(self.name, "mmio_read", step.address, mmio.read(step.address, step.size))
                else:
                    self.vm.mmio_write(step.address, step.size, step.value, mmio)
            elif isinstance(step, WriteMemory):
                self.vm.guest_write(step.gpa, step.data)
            elif isinstance(step, SetRegisters):
                self.state["regs"].update(step.values)
            elif isinstance(step, Busy):
                step.done.wait()
            elif isinstance(step, Return):
                return step.stop
            else:
                raise step.error

    def interrupt(self) -> None:
        self.host.record(self.name, "interrupt")
        with self._cond:
            self._interrupted = True
            self._cond.notify_all()

    def clear_interrupt(self) -> None:
        self.host.record(self.name, "clear_interrupt")
        with self._cond:
            self._interrupted = False

    def _needs_ram(self, what: str) -> None:
        """KVM resolves guest addresses in some vCPU state (MSRs naming guest pages) as it is set."""
        if not self.vm.slots:
            self.host.breach(f"{self.name}: {what} before guest RAM was registered")

    def set_boot_state(self, *, vcpus: int, entry: int, argument: int) -> None:
        self.host.record(self.name, "set_boot_state", vcpus, entry, argument)
        self._needs_ram("boot state set")
        if self.has_run:
            self.host.breach(f"{self.name}: boot state set after it ran")
        self.state["mp_state"] = {"mp_state": MP_RUNNABLE if self.id == 0 else MP_UNINITIALIZED}
        if self.id == 0:
            self.state["regs"].update(rip=entry, rsi=argument)

    def save_state(self) -> StateRecord:
        self.host.record(self.name, "save_state")
        if self.in_run:
            self.host.breach(f"{self.name}: state read while it runs")
        return copy.deepcopy(self.state)

    def restore_state(self, state: StateRecord, *, strict: bool = True) -> Callable[[], int]:
        self.host.record(self.name, "restore_state", strict)
        if self.has_run:
            self.host.breach(f"{self.name}: state restored after it ran")
        if len(state["xsave"]) != XSAVE_SIZE:
            raise HypervisorError(f"KVM_SET_XSAVE of {len(state['xsave'])} bytes: Invalid argument")

        def with_guest_ram() -> int:
            self.host.record(self.name, "restore_msrs")
            self._needs_ram("MSRs restored")
            if self.has_run:
                self.host.breach(f"{self.name}: MSRs restored after it ran")
            msrs = [m for m in state["msrs"] if m["index"] in OFFERED_MSRS]
            if strict and len(msrs) != len(state["msrs"]):
                raise HypervisorError(f"{self.name}: KVM refused an MSR")
            self.state = {name: copy.deepcopy(state[name]) for name in state if not name.startswith("_")}
            self.state["regs"] = dict(self.state["regs"])
            return len(state["msrs"]) - len(msrs)

        return with_guest_ram

    def close(self) -> None:
        self.host.record(self.name, "close")
        if self.in_run:
            self.host.breach(f"{self.name}: closed while it runs")
        self.closed = True

    def __repr__(self) -> str:
        return self.name


def _zeroed(construct: Any) -> dict[str, Any]:
    """A fixed-size KVM structure with every field zero, as a plain dict."""
    plain: dict[str, Any] = _plain(construct.parse(bytes(construct.sizeof())))
    return plain


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def fresh_vcpu_state(index: int, offer: HostOffer) -> dict[str, Any]:
    """A just-created x86_64 vCPU's state as ``smolformat.x86_64.VcpuState`` records it: every
    CPUID leaf and MSR the host offers, an XSAVE area of the host's size, the rest zero."""
    return {
        "mp_state": {"mp_state": MP_UNINITIALIZED},
        "regs": _zeroed(fmt.KvmRegs),
        "sregs": _zeroed(fmt.KvmSregs),
        "fpu": _zeroed(fmt.KvmFpu),
        "xsave": bytes(offer.xsave_size),
        "xcrs": {**_zeroed(fmt.KvmXcrs), "nr_xcrs": 1},
        "debugregs": _zeroed(fmt.KvmDebugregs),
        "lapic": {"regs": bytes(fmt.KVM_APIC_REG_SIZE)},
        "tsc_khz": TSC_KHZ,
        "cpuid": [
            {"function": f, "index": i, "flags": 0, "eax": a, "ebx": b, "ecx": c, "edx": d, "padding": [0, 0, 0]}
            for (f, i), (a, b, c, d) in sorted(offer.cpuid.items())
        ],
        "msrs": [{"index": i, "reserved": 0, "data": index} for i in sorted(offer.msrs)],
        "vcpu_events": _zeroed(fmt.KvmVcpuEvents),
    }


if TYPE_CHECKING:

    def _implements_the_interface(
        hypervisor: DoubleHypervisor, vm: DoubleVm, vcpu: DoubleVcpu
    ) -> tuple[Hypervisor, Vm, Vcpu]:
        """Never called: mypy checks here that the double implements the interface it stands in for."""
        return hypervisor, vm, vcpu
