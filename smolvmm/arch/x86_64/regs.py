"""Initial x86_64 vCPU state for the Linux 64-bit boot entry: long mode, flat segments, identity paging.

The values as plain data; the hypervisor backend writes them into its own register layouts
(KVM: ``smolvmm.hypervisor.kvm.x86_64``)."""

from __future__ import annotations

import struct

from smolvmm.arch.x86_64 import layout
from smolvmm.host.memory import GuestMemory

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
CODE_TYPE = 0xB  # execute/read, accessed
DATA_TYPE = 0x3  # read/write, accessed
TSS_TYPE = 0xB  # busy 64-bit TSS
BOOT_RFLAGS = 0x2  # the reserved bit; interrupts off
FPU_CONTROL_WORD = 0x37F  # FNINIT's x87 control word
MXCSR_DEFAULT = 0x1F80  # every SSE exception masked


def write_boot_structures(memory: GuestMemory) -> None:
    """The GDT and page tables identity-mapping the first 1 GiB with 2 MiB pages."""
    memory.write(layout.GDT_ADDR, struct.pack(f"<{len(GDT)}Q", *GDT))
    memory.write_u64(layout.PML4_ADDR, layout.PDPT_ADDR | 0x3)
    memory.write_u64(layout.PDPT_ADDR, layout.PD_ADDR | 0x3)
    memory.write(layout.PD_ADDR, struct.pack("<512Q", *((i << 21) | 0x83 for i in range(512))))


def lapic_with_lint(current: bytes) -> bytes:
    """LINT0 as ExtINT (the 8259 PIC's path) and LINT1 as NMI, as a PC's firmware leaves them."""
    lapic = bytearray(current)
    for offset, mode in ((0x350, 0x7), (0x360, 0x4)):
        value = struct.unpack_from("<I", lapic, offset)[0]
        struct.pack_into("<I", lapic, offset, (value & ~0x700) | (mode << 8))
    return bytes(lapic)
