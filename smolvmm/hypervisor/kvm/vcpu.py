"""A KVM vCPU file descriptor: the shared kvm_run page, KVM_RUN, and the vCPU state ioctls."""

from __future__ import annotations

import errno
import functools
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smolformat.native import compiled
from smolvmm.hypervisor.interface import IoBus, Stop, StopKind
from smolvmm.hypervisor.kvm.bindings import ffi, libc
from smolvmm.hypervisor.kvm.ioctls import (
    KVM_EXIT_IO_OUT,
    KVM_MAX_CPUID_ENTRIES,
    KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
    Exit,
    Ioctl,
)
from smolvmm.hypervisor.kvm.state_io import get_struct, set_struct
from smolvmm.hypervisor.kvm.system import Kvm, KvmError, ioctl

CR0_PG = 1 << 31
_UNWRITTEN = 0xFFFFFFFF

_SYSTEM_EVENTS = {
    KVM_SYSTEM_EVENT_SHUTDOWN: Stop(StopKind.POWEROFF, "system event: shutdown"),
    KVM_SYSTEM_EVENT_RESET: Stop(StopKind.RESET, "system event: reset"),
    KVM_SYSTEM_EVENT_CRASH: Stop(StopKind.CRASH, "system event: guest crash"),
}


_REASON = struct.Struct("<I")
_REASON_AT = ffi.offsetof("struct kvm_run", "exit_reason")
_EXIT_AT = ffi.offsetof("struct kvm_run", "io")  # the union of exit details
_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
_MMIO_DATA_AT = _EXIT_AT + 8
_EXIT_IO, _EXIT_MMIO, _EXIT_INTR = int(Exit.KVM_EXIT_IO), int(Exit.KVM_EXIT_MMIO), int(Exit.KVM_EXIT_INTR)
_CONTINUE = (int(Exit.KVM_EXIT_HLT), int(Exit.KVM_EXIT_IRQ_WINDOW_OPEN))


@functools.cache
def native_module() -> Any | None:
    """run.c built (on first call), or None where it cannot be: Python then serves every exit."""
    source = Path(__file__).with_name("run.c").read_text()
    return compiled("_smolvmm_run", source[source.index("/* cdef:") : source.index("/* cdef end */")], source)


def _port_io(page: mmap.mmap, pio: IoBus) -> None:
    direction, size, port, count, at = _IO.unpack_from(page, _EXIT_AT)
    if size not in (1, 2, 4) or at + size * count > len(page):
        return
    if direction == KVM_EXIT_IO_OUT:
        for i in range(at, at + size * count, size):
            pio.write(port, size, int.from_bytes(page[i : i + size], "little"))
    else:
        for i in range(at, at + size * count, size):
            page[i : i + size] = pio.read(port, size).to_bytes(size, "little")


def _mmio_access(page: mmap.mmap, mmio: IoBus) -> None:
    address, data, length, is_write = _MMIO.unpack_from(page, _EXIT_AT)
    if length not in (1, 2, 4, 8):
        return
    if is_write:
        mmio.write(address, length, int.from_bytes(data[:length], "little"))
    else:
        page[_MMIO_DATA_AT : _MMIO_DATA_AT + length] = mmio.read(address, length).to_bytes(length, "little")


class KvmVcpu:
    """One vCPU. ``run`` must be called from the one thread that drives it.

    ``kvm`` is the /dev/kvm its VM came from: it says which CPUID and MSRs the host supports.
    """

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int, kvm: Kvm) -> None:
        self.fd = fd
        self.id = vcpu_id
        self._kvm = kvm
        self.page = mmap.mmap(fd, mmap_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.kvm_run = ffi.from_buffer("struct kvm_run *", self.page)
        self._native = native_module()  # built or loaded now: a jailed monitor opens no new files

    def run_once(self) -> Exit:
        """Enter the guest until the next exit. A signal or immediate_exit gives KVM_EXIT_INTR."""
        try:
            ioctl(self.fd, Ioctl.KVM_RUN)
        except KvmError as exc:
            if exc.errno in (errno.EINTR, errno.EAGAIN):
                return Exit.KVM_EXIT_INTR
            raise
        return Exit(self.kvm_run.exit_reason)

    def run(self, pio: IoBus, mmio: IoBus) -> Stop:
        """Run the guest, serving port and MMIO exits inline, until something else stops it.

        Every guest I/O access passes through here: the accesses ``mmio.words`` names are served
        in C without returning here (run.c); for the others the loop reads the exit straight from
        the run page (the checks of ``run_once``, without its wrapper and enum per exit).
        """
        native = self._native
        if native is None:
            return self._run(pio, mmio, None)
        words = [(gpa, native.ffi.cast("uint32_t *", word), clears) for gpa, word, clears in mmio.words]
        registers = native.ffi.new("struct smol_word_register[]", words)
        with native.ffi.from_buffer(self.page) as run_page:  # released on return: close() unmaps the page
            serve = functools.partial(native.lib.smol_vcpu_run, self.fd, run_page, registers, len(words))
            return self._run(pio, mmio, serve)

    def _run(self, pio: IoBus, mmio: IoBus, serve: Callable[[], int] | None) -> Stop:
        """``run``'s loop: ``serve`` enters the guest through run.c, else libc's ioctl does."""
        page, fd, kvm_ioctl = self.page, self.fd, libc.ioctl
        request, no_arg = ffi.cast("unsigned long", Ioctl.KVM_RUN), ffi.cast("unsigned long", 0)
        while True:
            if serve is not None:
                reason = serve()
            elif kvm_ioctl(fd, request, no_arg) < 0:
                reason = -ffi.errno
            else:
                reason = _REASON.unpack_from(page, _REASON_AT)[0]
            if reason < 0:
                if -reason in (errno.EINTR, errno.EAGAIN):
                    return Stop(StopKind.INTERRUPTED)
                raise KvmError(Ioctl.KVM_RUN, -reason)
            if reason == _EXIT_IO:
                _port_io(page, pio)
            elif reason == _EXIT_MMIO:
                _mmio_access(page, mmio)
            elif reason in _CONTINUE:
                continue
            elif reason == _EXIT_INTR:
                return Stop(StopKind.INTERRUPTED)
            elif reason == Exit.KVM_EXIT_SHUTDOWN:
                return Stop(StopKind.RESET, self._describe_triple_fault())
            elif reason == Exit.KVM_EXIT_SYSTEM_EVENT:
                kind = self.kvm_run.system_event.type
                return _SYSTEM_EVENTS.get(kind, Stop(StopKind.CRASH, f"system event {kind}"))
            else:
                return Stop(StopKind.CRASH, self._describe_failure(reason))

    def interrupt(self) -> None:
        self.kvm_run.immediate_exit = 1

    def clear_interrupt(self) -> None:
        self.kvm_run.immediate_exit = 0

    def _describe_triple_fault(self) -> str:
        regs = ffi.new("struct kvm_regs *")
        sregs = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, Ioctl.KVM_GET_REGS, regs)
        ioctl(self.fd, Ioctl.KVM_GET_SREGS, sregs)
        if not sregs.cr0 & CR0_PG:  # AMD resets the vCPU on shutdown: the faulting state is gone
            return f"vCPU {self.id}: triple fault"
        return f"vCPU {self.id}: triple fault at rip {regs.rip:#x} (rsp {regs.rsp:#x}, cr2 {sregs.cr2:#x})"

    def _describe_failure(self, reason: int) -> str:
        run = self.kvm_run
        if reason == Exit.KVM_EXIT_INTERNAL_ERROR:
            return f"vCPU {self.id}: KVM internal error, suberror {run.internal.suberror}"
        if reason == Exit.KVM_EXIT_FAIL_ENTRY:
            return (
                f"vCPU {self.id}: KVM entry failed, hardware reason {run.fail_entry.hardware_entry_failure_reason:#x}"
            )
        name = Exit(reason).name if reason in Exit.__members__.values() else f"reason {reason}"
        return f"vCPU {self.id}: unexpected exit {name}"

    def io_data(self) -> memoryview:
        """The data bytes of the current KVM_EXIT_IO (size * count bytes inside the run page)."""
        io = self.kvm_run.io
        start = io.data_offset
        return memoryview(self.page)[start : start + io.size * io.count]

    # Whole-struct state, as the bytes of the KVM structure.
    def get_regs(self) -> bytes:
        return get_struct(self.fd, Ioctl.KVM_GET_REGS, "struct kvm_regs")

    def set_regs(self, data: bytes) -> None:
        set_struct(self.fd, Ioctl.KVM_SET_REGS, "struct kvm_regs", data)

    def get_sregs(self) -> bytes:
        return get_struct(self.fd, Ioctl.KVM_GET_SREGS, "struct kvm_sregs")

    def set_sregs(self, data: bytes) -> None:
        set_struct(self.fd, Ioctl.KVM_SET_SREGS, "struct kvm_sregs", data)

    def get_fpu(self) -> bytes:
        return get_struct(self.fd, Ioctl.KVM_GET_FPU, "struct kvm_fpu")

    def set_fpu(self, data: bytes) -> None:
        set_struct(self.fd, Ioctl.KVM_SET_FPU, "struct kvm_fpu", data)

    def get_lapic(self) -> bytes:
        return get_struct(self.fd, Ioctl.KVM_GET_LAPIC, "struct kvm_lapic_state")

    def set_lapic(self, data: bytes) -> None:
        set_struct(self.fd, Ioctl.KVM_SET_LAPIC, "struct kvm_lapic_state", data)

    def get_xcrs(self) -> bytes:
        return get_struct(self.fd, Ioctl.KVM_GET_XCRS, "struct kvm_xcrs")

    def set_xcrs(self, data: bytes) -> None:
        set_struct(self.fd, Ioctl.KVM_SET_XCRS, "struct kvm_xcrs", data)

    def get_debugregs(self) -> bytes:
        return get_struct(self.fd, Ioctl.KVM_GET_DEBUGREGS, "struct kvm_debugregs")

    def set_debugregs(self, data: bytes) -> None:
        set_struct(self.fd, Ioctl.KVM_SET_DEBUGREGS, "struct kvm_debugregs", data)

    def get_vcpu_events(self) -> bytes:
        return get_struct(self.fd, Ioctl.KVM_GET_VCPU_EVENTS, "struct kvm_vcpu_events")

    def set_vcpu_events(self, data: bytes) -> None:
        set_struct(self.fd, Ioctl.KVM_SET_VCPU_EVENTS, "struct kvm_vcpu_events", data)

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        ioctl(self.fd, Ioctl.KVM_GET_MP_STATE, state)
        mp_state: int = state.mp_state
        return mp_state

    def set_mp_state(self, value: int) -> None:
        ioctl(self.fd, Ioctl.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": value}))

    def get_xsave(self, size: int) -> bytes:
        """The XSAVE area; ``size`` > 4096 uses KVM_GET_XSAVE2 (KVM_CAP_XSAVE2's value)."""
        extra = max(0, (size - 4096) // 4)
        area = ffi.new("struct kvm_xsave *", {"extra": extra})
        ioctl(self.fd, Ioctl.KVM_GET_XSAVE2 if extra else Ioctl.KVM_GET_XSAVE, area)
        return bytes(ffi.buffer(area, 4096 + 4 * extra))

    def set_xsave(self, data: bytes) -> None:
        """Load an XSAVE area of exactly this host's size (``Kvm.xsave_size``): KVM reads that many."""
        if len(data) != self._kvm.xsave_size:
            raise ValueError(f"XSAVE area of {len(data)} bytes; KVM takes {self._kvm.xsave_size}")
        extra = (len(data) - 4096) // 4
        area = ffi.new("struct kvm_xsave *", {"extra": extra})
        ffi.buffer(area, len(data))[:] = data
        ioctl(self.fd, Ioctl.KVM_SET_XSAVE, area)

    def get_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        """(index, value) for each MSR in ``indices`` that KVM could read."""
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        read = ioctl(self.fd, Ioctl.KVM_GET_MSRS, msrs)
        return [(msrs.entries[i].index, msrs.entries[i].data) for i in range(read)]

    def set_msrs(self, values: list[tuple[int, int]]) -> int:
        """Write MSRs in order; returns how many KVM accepted (it stops at the first it refuses)."""
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(values), "entries": len(values)})
        for i, (index, value) in enumerate(values):
            msrs.entries[i].index = index
            msrs.entries[i].data = value
        return ioctl(self.fd, Ioctl.KVM_SET_MSRS, msrs)

    def set_cpuid(self, entries: list[tuple[int, int, int, int, int, int, int]]) -> None:
        """KVM_SET_CPUID2 from (function, index, flags, eax, ebx, ecx, edx) tuples."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for i, (function, index, flags, eax, ebx, ecx, edx) in enumerate(entries):
            e = cpuid.entries[i]
            e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx = function, index, flags, eax, ebx, ecx, edx
        ioctl(self.fd, Ioctl.KVM_SET_CPUID2, cpuid)

    def get_cpuid(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """The vCPU's CPUID entries.

        Before Linux 6.x KVM leaves ``nent`` as the caller passed it on success, so unwritten
        entries are marked first and the written ones are those before the first mark.
        """
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": KVM_MAX_CPUID_ENTRIES, "entries": KVM_MAX_CPUID_ENTRIES})
        for i in range(KVM_MAX_CPUID_ENTRIES):
            cpuid.entries[i].function = cpuid.entries[i].index = _UNWRITTEN
        ioctl(self.fd, Ioctl.KVM_GET_CPUID2, cpuid)
        entries = []
        for e in (cpuid.entries[i] for i in range(cpuid.nent)):
            if e.function == e.index == _UNWRITTEN:
                break
            entries.append((e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx))
        return entries

    def get_tsc_khz(self) -> int:
        return ioctl(self.fd, Ioctl.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        ioctl(self.fd, Ioctl.KVM_SET_TSC_KHZ, khz)

    def close(self) -> None:
        if self.fd >= 0:
            del self.kvm_run
            self.page.close()
            os.close(self.fd)
            self.fd = -1
