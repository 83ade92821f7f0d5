"""Initial x86_64 vCPU state for the Linux 64-bit boot entry: long mode, flat segments, identity paging."""

from __future__ import annotations

import struct
from typing import Any

from smolvmm.arch.x86_64 import layout
from smolvmm.host.memory import GuestMemory
from smolvmm.hypervisor.kvm.bindings import ffi

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

CODE_SELECTOR = 0x10  # __BOOT_CS
DATA_SELECTOR = 0x18  # __BOOT_DS
TSS_SELECTOR = 0x20
# Descriptors: null, null, 64-bit code, flat data, busy TSS (each 4 GiB with 4 KiB granularity).
GDT = (0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x008F8B000000FFFF)


def write_boot_structures(memory: GuestMemory) -> None:
    """The GDT and page tables identity-mapping the first 1 GiB with 2 MiB pages."""
    memory.write(layout.GDT_ADDR, struct.pack(f"<{len(GDT)}Q", *GDT))
    memory.write_u64(layout.PML4_ADDR, layout.PDPT_ADDR | 0x3)
    memory.write_u64(layout.PDPT_ADDR, layout.PD_ADDR | 0x3)
    memory.write(layout.PD_ADDR, struct.pack("<512Q", *((i << 21) | 0x83 for i in range(512))))


def _segment(seg: Any, selector: int, type_: int, code: bool) -> None:  # seg: cffi cdata, untyped
    seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, type_
    seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 0
    seg.l, seg.db = (1, 0) if code else (0, 1)


def boot_sregs(current: bytes) -> bytes:
    """The BSP's special registers for the 64-bit entry, starting from KVM's current values."""
    sregs = ffi.new("struct kvm_sregs *")
    ffi.buffer(sregs)[:] = current
    _segment(sregs.cs, CODE_SELECTOR, 0xB, code=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, DATA_SELECTOR, 0x3, code=False)
    _segment(sregs.tr, TSS_SELECTOR, 0xB, code=False)
    sregs.tr.s, sregs.tr.db = 0, 0
    sregs.gdt.base, sregs.gdt.limit = layout.GDT_ADDR, len(GDT) * 8 - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 |= CR4_PAE
    sregs.efer |= EFER_LME | EFER_LMA
    return bytes(ffi.buffer(sregs))


def boot_regs(entry: int, boot_params: int) -> bytes:
    """General registers at the 64-bit entry: rip = entry, rsi = boot_params, interrupts off."""
    regs = ffi.new("struct kvm_regs *")
    regs.rip = entry
    regs.rsi = boot_params
    regs.rsp = regs.rbp = layout.BOOT_STACK_POINTER
    regs.rflags = 0x2
    return bytes(ffi.buffer(regs))


def boot_fpu() -> bytes:
    fpu = ffi.new("struct kvm_fpu *")
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    return bytes(ffi.buffer(fpu))


def lapic_with_lint(current: bytes) -> bytes:
    """LINT0 as ExtINT (the 8259 PIC's path) and LINT1 as NMI, as a PC's firmware leaves them."""
    lapic = bytearray(current)
    for offset, mode in ((0x350, 0x7), (0x360, 0x4)):
        value = struct.unpack_from("<I", lapic, offset)[0]
        struct.pack_into("<I", lapic, offset, (value & ~0x700) | (mode << 8))
    return bytes(lapic)
