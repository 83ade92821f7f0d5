"""x86_64 on KVM: the vCPU and VM of the hypervisor interface, their state as smolformat records it.

``X86Vcpu`` and ``X86Vm`` add the interface's boot state, save/restore and clock hold to the
plain KVM file descriptor wrappers (``kvm.vcpu``, ``kvm.vm``), which know no architecture's order.

Save order follows Firecracker (MP_STATE first: reading it can change the LAPIC; VCPU_EVENTS
last). Restore: CPUID, MP_STATE, REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC (after SREGS, before
MSRs), then, once guest RAM is registered, MSRs and VCPU_EVENTS.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from smolformat import x86_64 as fmt
from smolvmm.arch.x86_64 import cpuid, layout, msrs, regs
from smolvmm.arch.x86_64.state import rearm_tsc_deadline, saved_msr_indices, tsc_needs_scaling
from smolvmm.errors import BundleError, HypervisorError
from smolvmm.hypervisor.interface import StateRecord
from smolvmm.hypervisor.kvm.bindings import ffi
from smolvmm.hypervisor.kvm.ioctls import KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Cap, Ioctl
from smolvmm.hypervisor.kvm.system import Kvm, ioctl
from smolvmm.hypervisor.kvm.vcpu import KvmVcpu
from smolvmm.hypervisor.kvm.vm import KvmVm

_CPUID_FIELDS = itemgetter("function", "index", "flags", "eax", "ebx", "ecx", "edx")
_MSR_FIELDS = itemgetter("index", "data")
KVM_CLOCK_REALTIME = 1 << 2


def read_msrs(vcpu: KvmVcpu, indices: list[int]) -> list[tuple[int, int]]:
    """Every readable MSR of ``indices``; KVM_GET_MSRS stops at the first it cannot read, so skip it."""
    values: list[tuple[int, int]] = []
    remaining = list(indices)
    while remaining:
        read = vcpu.get_msrs(remaining)
        values.extend(read)
        remaining = remaining[len(read) + 1 :]
    return values


def save_vcpu(vcpu: KvmVcpu, supported_msrs: list[int], xsave_size: int) -> dict[str, Any]:
    """One vCPU's state as a ``smolformat.x86_64.VcpuState`` value."""
    state: dict[str, Any] = {"mp_state": {"mp_state": vcpu.get_mp_state()}}
    state["regs"] = fmt.KvmRegs.parse(vcpu.get_regs())
    state["sregs"] = fmt.KvmSregs.parse(vcpu.get_sregs())
    state["fpu"] = fmt.KvmFpu.parse(vcpu.get_fpu())
    state["xsave"] = vcpu.get_xsave(xsave_size)
    state["xcrs"] = fmt.KvmXcrs.parse(vcpu.get_xcrs())
    state["debugregs"] = fmt.KvmDebugregs.parse(vcpu.get_debugregs())
    state["lapic"] = {"regs": vcpu.get_lapic()}
    state["tsc_khz"] = vcpu.get_tsc_khz()
    state["cpuid"] = [
        {"function": f, "index": i, "flags": fl, "eax": a, "ebx": b, "ecx": c, "edx": d, "padding": [0, 0, 0]}
        for f, i, fl, a, b, c, d in vcpu.get_cpuid()
    ]
    values = read_msrs(vcpu, saved_msr_indices(supported_msrs))
    state["msrs"] = [{"index": i, "reserved": 0, "data": v} for i, v in values]
    state["vcpu_events"] = fmt.KvmVcpuEvents.parse(vcpu.get_vcpu_events())
    return state


def _segment(seg: Any, selector: int, type_: int, code: bool) -> None:
    seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, type_
    seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 0
    seg.l, seg.db = (1, 0) if code else (0, 1)


def boot_sregs(current: bytes) -> bytes:
    """The BSP's special registers for the 64-bit entry (``arch.x86_64.regs``), from KVM's current values."""
    sregs = ffi.new("struct kvm_sregs *")
    ffi.buffer(sregs)[:] = current
    _segment(sregs.cs, regs.CODE_SELECTOR, regs.CODE_TYPE, code=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, regs.DATA_SELECTOR, regs.DATA_TYPE, code=False)
    _segment(sregs.tr, regs.TSS_SELECTOR, regs.TSS_TYPE, code=False)
    sregs.tr.s, sregs.tr.db = 0, 0
    sregs.gdt.base, sregs.gdt.limit = layout.GDT_ADDR, len(regs.GDT) * 8 - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 |= regs.CR0_PE | regs.CR0_ET | regs.CR0_PG
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 |= regs.CR4_PAE
    sregs.efer |= regs.EFER_LME | regs.EFER_LMA
    return bytes(ffi.buffer(sregs))


def boot_regs(entry: int, boot_params: int) -> bytes:
    """General registers at the 64-bit entry: rip = entry, rsi = boot_params, interrupts off."""
    general = ffi.new("struct kvm_regs *")
    general.rip = entry
    general.rsi = boot_params
    general.rsp = general.rbp = layout.BOOT_STACK_POINTER
    general.rflags = regs.BOOT_RFLAGS
    return bytes(ffi.buffer(general))


def boot_fpu() -> bytes:
    """The FPU as FNINIT leaves it, SSE exceptions masked."""
    fpu = ffi.new("struct kvm_fpu *")
    fpu.fcw = regs.FPU_CONTROL_WORD
    fpu.mxcsr = regs.MXCSR_DEFAULT
    return bytes(ffi.buffer(fpu))


def boot_vcpu(vcpu: KvmVcpu, kvm: Kvm, vcpus: int, entry: int, boot_params: int) -> None:
    """A fresh vCPU's boot state: CPUID, MSRs, LAPIC LINT pins, FPU; the BSP at the 64-bit entry."""
    tsc_deadline = bool(kvm.check_extension(Cap.KVM_CAP_TSC_DEADLINE_TIMER))
    vcpu.set_cpuid(cpuid.vcpu_cpuid(kvm.supported_cpuid, vcpu.id, vcpus, tsc_deadline, cpuid.host_brand()))
    vcpu.set_msrs(msrs.BOOT_MSRS)
    vcpu.set_lapic(regs.lapic_with_lint(vcpu.get_lapic()))
    vcpu.set_fpu(boot_fpu())
    if vcpu.id == 0:
        vcpu.set_sregs(boot_sregs(vcpu.get_sregs()))
        vcpu.set_regs(boot_regs(entry, boot_params))


def restore_vcpu(vcpu: KvmVcpu, state: StateRecord, host_msrs: list[int] | None = None) -> Callable[[], int]:
    """Put a saved ``VcpuState`` into a fresh vCPU, in two steps: this call loads every register
    that names no guest page; the step it returns, called once guest RAM is registered, loads the
    MSRs (kvmclock's, PV EOI's and steal time's name pages KVM resolves as they are set) and the
    pending events, and returns how many saved MSRs were skipped.

    With ``host_msrs`` (for a restore that is only measured, never run), saved MSRs this host's
    KVM does not list or refuses are skipped instead of failing the restore.
    """
    saved_khz = state["tsc_khz"]
    host_tsc_khz = vcpu.get_tsc_khz()
    if tsc_needs_scaling(saved_khz, host_tsc_khz):
        try:
            vcpu.set_tsc_khz(saved_khz)
        except HypervisorError as exc:
            raise BundleError(
                f"the bundle's TSC runs at {saved_khz} kHz, this host's at {host_tsc_khz} kHz, "
                f"and KVM cannot scale it ({exc})"
            ) from exc
    vcpu.set_cpuid(list(map(_CPUID_FIELDS, state["cpuid"])))
    vcpu.set_mp_state(state["mp_state"]["mp_state"])
    vcpu.set_regs(fmt.KvmRegs.build(state["regs"]))
    vcpu.set_sregs(fmt.KvmSregs.build(state["sregs"]))
    vcpu.set_xsave(state["xsave"])
    vcpu.set_xcrs(fmt.KvmXcrs.build(state["xcrs"]))
    vcpu.set_debugregs(fmt.KvmDebugregs.build(state["debugregs"]))
    vcpu.set_lapic(state["lapic"]["regs"])
    values = list(map(_MSR_FIELDS, state["msrs"]))
    saved = len(values)
    if host_msrs is not None:
        known = set(host_msrs)
        values = [(i, v) for i, v in values if i in known]
    values = rearm_tsc_deadline(values)
    events = fmt.KvmVcpuEvents.build(state["vcpu_events"])

    def with_guest_ram() -> int:
        remaining, applied = values, 0
        while remaining:
            written = vcpu.set_msrs(remaining)
            applied += written
            if written == len(remaining):
                break
            if host_msrs is None:
                raise BundleError(f"KVM refused MSR {remaining[written][0]:#x} of vCPU {vcpu.id}: the host CPU differs")
            remaining = remaining[written + 1 :]
        vcpu.set_vcpu_events(events)
        return saved - applied

    return with_guest_ram


def read_clock(vm: KvmVm) -> Any:
    """kvmclock as it reads now, a ``smolformat.x86_64.KvmClockData`` value."""
    return fmt.KvmClockData.parse(vm.get_clock())


def set_clock_unadvanced(vm: KvmVm, clock: Any) -> None:
    """Make kvmclock carry on from ``clock`` (a ``KvmClockData`` value), whatever time has passed
    since it was read (no KVM_CLOCK_REALTIME: KVM would add the elapsed time)."""
    vm.set_clock(fmt.KvmClockData.build({**clock, "flags": 0}))


def save_vm(vm: KvmVm) -> dict[str, Any]:
    """The in-kernel PICs, IOAPIC, PIT and kvmclock as a ``smolformat.x86_64.VmState`` value."""
    clock = read_clock(vm)
    if not clock.flags & KVM_CLOCK_REALTIME:
        clock.realtime = time.time_ns()  # so a restore knows when the clock was read
    return {
        "pic_master": fmt.KvmPicState.parse(vm.get_irqchip(KVM_IRQCHIP_PIC_MASTER)[: fmt.KvmPicState.sizeof()]),
        "pic_slave": fmt.KvmPicState.parse(vm.get_irqchip(KVM_IRQCHIP_PIC_SLAVE)[: fmt.KvmPicState.sizeof()]),
        "ioapic": fmt.KvmIoapicState.parse(vm.get_irqchip(KVM_IRQCHIP_IOAPIC)[: fmt.KvmIoapicState.sizeof()]),
        "pit": fmt.KvmPitState2.parse(vm.get_pit()),
        "clock": clock,
    }


def _chip(data: bytes) -> bytes:
    return data.ljust(512, b"\0")


def restore_vm(vm: KvmVm, state: StateRecord) -> None:
    """Restore the VM-wide state. kvmclock resumes where it was saved: the guest sees no gap
    (its wall clock is set by the guest agent, see smolvmm.agent.channel)."""
    vm.set_pit(fmt.KvmPitState2.build(state["pit"]))
    set_clock_unadvanced(vm, state["clock"])
    vm.set_irqchip(KVM_IRQCHIP_PIC_MASTER, _chip(fmt.KvmPicState.build(state["pic_master"])))
    vm.set_irqchip(KVM_IRQCHIP_PIC_SLAVE, _chip(fmt.KvmPicState.build(state["pic_slave"])))
    vm.set_irqchip(KVM_IRQCHIP_IOAPIC, _chip(fmt.KvmIoapicState.build(state["ioapic"])))


class X86Vcpu(KvmVcpu):
    """An x86_64 vCPU: boots at the 64-bit entry, saves and restores in Firecracker's order."""

    def set_boot_state(self, *, vcpus: int, entry: int, argument: int) -> None:
        boot_vcpu(self, self._kvm, vcpus, entry, argument)

    def save_state(self) -> StateRecord:
        return save_vcpu(self, self._kvm.msr_index_list, self._kvm.xsave_size)

    def restore_state(self, state: StateRecord, *, strict: bool = True) -> Callable[[], int]:
        return restore_vcpu(self, state, None if strict else self._kvm.msr_index_list)


class X86Vm(KvmVm):
    """An x86_64 VM: its state is the in-kernel PICs, IOAPIC, PIT and kvmclock."""

    _held_clock: Any = None

    def create_vcpu(self, index: int) -> X86Vcpu:
        return X86Vcpu(ioctl(self.fd, Ioctl.KVM_CREATE_VCPU, index), index, self._vcpu_mmap_size, self._kvm)

    def save_state(self) -> StateRecord:
        return save_vm(self)

    def restore_state(self, state: StateRecord) -> None:
        restore_vm(self, state)

    def hold_clock(self) -> None:
        self._held_clock = read_clock(self)

    def release_clock(self) -> None:
        if self._held_clock is not None:
            set_clock_unadvanced(self, self._held_clock)
            self._held_clock = None
