"""The x86_64 boot setup read back from guest memory with the Linux boot protocol's own offsets.

Each machine runs what ``VirtualMachine.setup_boot`` runs (ACPI tables, ``boot.load_linux``,
``regs.write_boot_structures``, the BSP's registers from ``regs``) on plain GuestMemory with the
default guest's real bzImage and initrd. No guest runs and /dev/kvm is not needed. The offsets
below are transcribed from Documentation/arch/x86/boot.rst and arch/x86/include/uapi/asm/bootparam.h,
not imported from smolvmm, so a wrong offset in the loader fails here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from smolvmm.arch.x86_64 import acpi, cpuid, layout, regs
from smolvmm.arch.x86_64.image import KernelImage, parse_bzimage
from smolvmm.arch.x86_64.machine import ARCH as X86_64
from smolvmm.config import MIN_MEMORY
from smolvmm.errors import ImageError
from smolvmm.host.memory import PAGE_SIZE, GuestMemory
from smolvmm.hypervisor.kvm import x86_64 as kvm_x86
from smolvmm.hypervisor.kvm.bindings import ffi
from smolvmm.images.guest import default_guest

MIB = 1 << 20
GIB = 1 << 30
VCPUS = 3

# struct boot_params (the zero page)
ACPI_RSDP_ADDR = 0x070
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8
SENTINEL = 0x1EF
E820_TABLE = 0x2D0
E820_ENTRY_SIZE = 20
E820_MAX_ENTRIES_ZEROPAGE = 128
# struct setup_header, at the same offsets in the bzImage and in boot_params
SETUP_HEADER = 0x1F1
HEADER_END_BYTE = 0x201  # the jump's 8-bit displacement: the header ends at 0x202 + it
HDRS = 0x202
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
CODE32_START = 0x214
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
INITRD_ADDR_MAX = 0x22C
KERNEL_ALIGNMENT = 0x230
RELOCATABLE_KERNEL = 0x234
CMDLINE_SIZE = 0x238
PREF_ADDRESS = 0x258
INIT_SIZE = 0x260
LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
E820_RAM, E820_RESERVED = 1, 2
# The byte ranges of boot_params a boot loader writes; the rest is the kernel's header or zero.
LOADER_FIELDS = [
    (ACPI_RSDP_ADDR, 8),
    (E820_ENTRIES, 1),
    (TYPE_OF_LOADER, 1),
    (LOADFLAGS, 1),
    (RAMDISK_IMAGE, 4),
    (RAMDISK_SIZE, 4),
    (HEAP_END_PTR, 2),
    (CMD_LINE_PTR, 4),
]

PTE_P, PTE_RW, PTE_PS = 1 << 0, 1 << 1, 1 << 7
PTE_ADDR = 0x000F_FFFF_FFFF_F000
CR0_PE, CR0_PG, CR4_PAE, EFER_LME, EFER_LMA, RFLAGS_IF = 1 << 0, 1 << 31, 1 << 5, 1 << 8, 1 << 10, 1 << 9
BOOT_CS, BOOT_DS = 0x10, 0x18  # boot.rst: the 64-bit entry needs __BOOT_CS and __BOOT_DS
KVM_RESET_CR0 = 0x6000_0010  # CD | NW | ET, what a fresh KVM vCPU starts with


@dataclass
class Booted:
    """Guest memory after the boot setup, and what went into it."""

    memory: GuestMemory
    image: bytes
    kernel: KernelImage
    initrd: bytes
    cmdline: str
    entry: int
    acpi_size: int

    def u(self, fmt: str, offset: int) -> int:
        """A field of boot_params."""
        return struct.unpack_from(fmt, self.memory.read(layout.ZERO_PAGE_ADDR, PAGE_SIZE), offset)[0]

    def e820(self) -> list[tuple[int, int, int]]:
        page = self.memory.read(layout.ZERO_PAGE_ADDR, PAGE_SIZE)
        return [struct.unpack_from("<QQI", page, E820_TABLE + E820_ENTRY_SIZE * i) for i in range(page[E820_ENTRIES])]

    def runtime_window(self) -> tuple[int, int]:
        """[start, end) the kernel needs before it reads its memory map (boot.rst, init_size)."""
        load = layout.KERNEL_LOAD_ADDR
        if self.image[RELOCATABLE_KERNEL]:
            align = struct.unpack_from("<I", self.image, KERNEL_ALIGNMENT)[0]
            start = -(-max(load, struct.unpack_from("<Q", self.image, PREF_ADDRESS)[0]) // align) * align
        else:
            start = struct.unpack_from("<Q", self.image, PREF_ADDRESS)[0]
        return start, start + struct.unpack_from("<I", self.image, INIT_SIZE)[0]


def guest_files() -> tuple[bytes, bytes, str]:
    guest = default_guest()
    return guest.kernel.read_bytes(), guest.initrd.read_bytes(), guest.cmdline


def set_up(memory: GuestMemory, image: bytes, initrd: bytes, cmdline: str, vcpus: int = VCPUS) -> Booted:
    """What VirtualMachine.setup_boot writes to guest memory (through the x86_64 ``Arch``), with one
    virtio-mmio device."""
    start = X86_64.load_linux(memory, image, initrd, cmdline, vcpus, 1)
    assert start.argument == layout.ZERO_PAGE_ADDR
    base, gsi = layout.virtio_slot(0)
    _, tables = acpi.build_tables(vcpus, [(base, layout.VIRTIO_MMIO_SIZE, gsi)])
    return Booted(memory, image, parse_bzimage(image), initrd, cmdline, start.entry, len(tables))


@pytest.fixture(scope="module", params=[256 * MIB, 4 * GIB], ids=["256M", "4G-split"])
def booted(request: pytest.FixtureRequest) -> Iterator[Booted]:
    image, initrd, cmdline = guest_files()
    memory = GuestMemory.anonymous(layout.ram_regions(request.param))
    try:
        yield set_up(memory, image, initrd, cmdline)
    finally:
        memory.close()


def merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) spans, sorted, with touching or overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def within(span: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    return any(start <= span[0] and span[1] <= end for start, end in merged(spans))


def test_zero_page_is_the_setup_header_plus_loader_fields(booted: Booted) -> None:
    page = booted.memory.read(layout.ZERO_PAGE_ADDR, PAGE_SIZE)
    header_end = HDRS + booted.image[HEADER_END_BYTE]
    assert page[HDRS : HDRS + 4] == b"HdrS" and page[SENTINEL] == 0
    loader = {o for offset, size in LOADER_FIELDS for o in range(offset, offset + size)}
    loader |= set(range(E820_TABLE, E820_TABLE + E820_ENTRY_SIZE * page[E820_ENTRIES]))
    for offset in set(range(PAGE_SIZE)) - loader:
        expected = booted.image[offset] if SETUP_HEADER <= offset < header_end else 0
        assert page[offset] == expected, f"boot_params byte {offset:#x}"


def test_loader_fields(booted: Booted) -> None:
    assert booted.u("<B", TYPE_OF_LOADER) == 0xFF  # boot.rst: a loader with no assigned id
    flags = booted.u("<B", LOADFLAGS)
    assert flags == booted.image[LOADFLAGS] | LOADED_HIGH | CAN_USE_HEAP
    assert booted.u("<H", HEAP_END_PTR) == 0xFE00  # with CAN_USE_HEAP: end of setup heap - 0x200
    assert booted.u("<I", CODE32_START) == layout.KERNEL_LOAD_ADDR


def test_command_line(booted: Booted) -> None:
    pointer = booted.u("<I", CMD_LINE_PTR)
    assert pointer == layout.CMDLINE_ADDR and booted.u("<I", EXT_CMD_LINE_PTR) == 0
    limit = struct.unpack_from("<I", booted.image, CMDLINE_SIZE)[0]
    text = booted.memory.read(pointer, limit + 1)
    assert text.index(b"\0") == len(booted.cmdline) <= limit
    assert text[: len(booted.cmdline)].decode() == booted.cmdline


@pytest.mark.parametrize("extra, fits", [(0, True), (1, False)])
def test_command_line_limit_is_cmdline_size(extra: int, fits: bool) -> None:
    """cmdline_size counts the bytes before the NUL: exactly that many fit, one more is refused."""
    image, initrd, _ = guest_files()
    cmdline = "x" * (struct.unpack_from("<I", image, CMDLINE_SIZE)[0] + extra)
    memory = GuestMemory.anonymous(layout.ram_regions(128 * MIB))
    try:
        if fits:
            set_up(memory, image, initrd, cmdline)
            assert memory.read(layout.CMDLINE_ADDR, len(cmdline) + 1) == cmdline.encode() + b"\0"
        else:
            with pytest.raises(ImageError, match="command line"):
                set_up(memory, image, initrd, cmdline)
    finally:
        memory.close()


def test_e820_is_exactly_ram_with_the_legacy_area_reserved(booted: Booted) -> None:
    entries = booted.e820()
    assert 0 < len(entries) <= E820_MAX_ENTRIES_ZEROPAGE
    spans = sorted((addr, addr + size) for addr, size, _ in entries)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"e820 entries overlap: {entries}"
    assert {kind for _, _, kind in entries} <= {E820_RAM, E820_RESERVED}
    ram = merged([(r.gpa, r.end) for r in booted.memory.regions])
    usable = merged([(a, a + s) for a, s, kind in entries if kind == E820_RAM])
    reserved = merged([(a, a + s) for a, s, kind in entries if kind == E820_RESERVED])
    legacy = (layout.EBDA_START, 0x100000)  # EBDA, VGA, option ROMs and BIOS, where the ACPI tables are
    assert reserved == [legacy]
    assert merged(usable + reserved) == ram, "the map must cover every RAM region, and nothing else"
    assert usable == [(0, legacy[0])] + [(max(r.gpa, legacy[1]), r.end) for r in booted.memory.regions]
    assert within((layout.ACPI_TABLES_ADDR, layout.ACPI_TABLES_ADDR + booted.acpi_size), reserved)


def test_kernel_is_loaded_where_the_entry_point_says(booted: Booted) -> None:
    protected_mode = booted.image[(booted.image[SETUP_HEADER] or 4) * 512 + 512 :]
    assert booted.memory.read(layout.KERNEL_LOAD_ADDR, len(protected_mode)) == protected_mode
    assert booted.entry == layout.KERNEL_LOAD_ADDR + 0x200  # boot.rst: 64-bit entry is load address + 0x200


def test_initrd(booted: Booted) -> None:
    address, size = booted.u("<I", RAMDISK_IMAGE), booted.u("<I", RAMDISK_SIZE)
    assert booted.u("<I", EXT_RAMDISK_IMAGE) == booted.u("<I", EXT_RAMDISK_SIZE) == 0
    assert size == len(booted.initrd) and address % PAGE_SIZE == 0
    assert booted.memory.read(address, size) == booted.initrd
    assert address + size - 1 <= struct.unpack_from("<I", booted.image, INITRD_ADDR_MAX)[0]
    usable = [(a, a + s) for a, s, kind in booted.e820() if kind == E820_RAM]
    assert within((address, address + size), usable)
    kernel = (layout.KERNEL_LOAD_ADDR, layout.KERNEL_LOAD_ADDR + len(booted.kernel.protected_mode))
    for start, end in (kernel, booted.runtime_window()):
        assert address + size <= start or end <= address, "the initrd overlaps the kernel"


def placed(booted: Booted) -> dict[str, tuple[int, int]]:
    """Everything the loader put in guest memory, as [start, end)."""
    return {
        "gdt": (layout.GDT_ADDR, layout.GDT_ADDR + 8 * len(regs.GDT)),
        "zero page": (layout.ZERO_PAGE_ADDR, layout.ZERO_PAGE_ADDR + PAGE_SIZE),
        "stack page": (layout.BOOT_STACK_POINTER - 0xFF0, layout.BOOT_STACK_POINTER),
        "page tables": (layout.PML4_ADDR, layout.PD_ADDR + PAGE_SIZE),
        "command line": (layout.CMDLINE_ADDR, layout.CMDLINE_ADDR + len(booted.cmdline) + 1),
        "acpi": (layout.ACPI_TABLES_ADDR, layout.ACPI_TABLES_ADDR + booted.acpi_size),
        "kernel": (layout.KERNEL_LOAD_ADDR, layout.KERNEL_LOAD_ADDR + len(booted.kernel.protected_mode)),
        "initrd": (booted.u("<I", RAMDISK_IMAGE), booted.u("<I", RAMDISK_IMAGE) + len(booted.initrd)),
    }


def test_boot_structures_are_disjoint_and_in_ram(booted: Booted) -> None:
    spans = sorted(placed(booted).items(), key=lambda item: item[1])
    for (a, (_, a_end)), (b, (b_start, _)) in zip(spans, spans[1:]):
        assert a_end <= b_start, f"{a} overlaps {b}"
    ram = [(a, a + s) for a, s, kind in booted.e820() if kind == E820_RAM]
    for name, span in spans:
        if name != "acpi":
            assert within(span, ram), f"{name} is not in usable RAM"
    start, end = booted.runtime_window()
    assert within((start, end), ram), "the kernel's init_size window is not RAM"


def translate(memory: GuestMemory, cr3: int, address: int) -> int | None:
    """A 4-level walk of the guest's page tables (2 MiB or 4 KiB leaves); None if not mapped."""
    table = cr3 & PTE_ADDR
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = memory.read_u64(table + 8 * ((address >> shift) & 0x1FF))
        if not entry & PTE_P:
            return None
        if level in (1, 2) and entry & PTE_PS:
            size = 1 << shift
            return (entry & PTE_ADDR & ~(size - 1)) | (address & (size - 1))
        table = entry & PTE_ADDR
    return table | (address & 0xFFF)


def test_page_tables_identity_map_the_first_gib(booted: Booted) -> None:
    memory = booted.memory
    pml4 = struct.unpack("<512Q", memory.read(layout.PML4_ADDR, PAGE_SIZE))
    pdpt = struct.unpack("<512Q", memory.read(layout.PDPT_ADDR, PAGE_SIZE))
    pd = struct.unpack("<512Q", memory.read(layout.PD_ADDR, PAGE_SIZE))
    assert pml4 == (layout.PDPT_ADDR | PTE_P | PTE_RW,) + (0,) * 511
    assert pdpt == (layout.PD_ADDR | PTE_P | PTE_RW,) + (0,) * 511
    assert pd == tuple((i << 21) | PTE_P | PTE_RW | PTE_PS for i in range(512))
    for address in (0, 0x1234_5678, GIB - 1):
        assert translate(memory, layout.PML4_ADDR, address) == address
    assert translate(memory, layout.PML4_ADDR, GIB) is None
    # boot.rst, 64-bit boot: the kernel's init_size range, the zero page and the command line are identity-mapped.
    for name, (start, end) in [*placed(booted).items(), ("runtime window", booted.runtime_window())]:
        if name != "initrd":
            assert translate(memory, layout.PML4_ADDR, start) == start, name
            assert translate(memory, layout.PML4_ADDR, end - 1) == end - 1, name


def descriptor(raw: int) -> dict[str, int]:
    """The fields of an 8-byte segment descriptor, named as struct kvm_segment names them."""
    access, flags = (raw >> 40) & 0xFF, (raw >> 52) & 0xF
    return {
        "base": ((raw >> 16) & 0xFF_FFFF) | ((raw >> 56) << 24),
        "limit": (raw & 0xFFFF) | ((raw >> 48) & 0xF) << 16,
        "type": access & 0xF,
        "s": (access >> 4) & 1,
        "dpl": (access >> 5) & 3,
        "present": access >> 7,
        "avl": flags & 1,
        "l": (flags >> 1) & 1,
        "db": (flags >> 2) & 1,
        "g": flags >> 3,
    }


def boot_sregs() -> Any:
    """The BSP's struct kvm_sregs, from what a fresh KVM vCPU holds."""
    sregs = ffi.new("struct kvm_sregs *")
    sregs.cr0 = KVM_RESET_CR0
    ffi.buffer(sregs)[:] = kvm_x86.boot_sregs(bytes(ffi.buffer(sregs)))
    return sregs


def test_gdt_has_flat_64_bit_code_and_data(booted: Booted) -> None:
    sregs = boot_sregs()
    gdt = booted.memory.read(sregs.gdt.base, sregs.gdt.limit + 1)
    code, data = (descriptor(struct.unpack_from("<Q", gdt, selector)[0]) for selector in (BOOT_CS, BOOT_DS))
    assert code == {
        "base": 0,
        "limit": 0xFFFFF,
        "type": 0xB,
        "s": 1,
        "dpl": 0,
        "present": 1,
        "avl": 0,
        "l": 1,
        "db": 0,
        "g": 1,
    }  # execute/read, long mode
    assert data == {
        "base": 0,
        "limit": 0xFFFFF,
        "type": 0x3,
        "s": 1,
        "dpl": 0,
        "present": 1,
        "avl": 0,
        "l": 0,
        "db": 1,
        "g": 1,
    }  # read/write, 4 GiB
    # The vCPU's segment registers hold what loading these selectors would.
    for segment, selector in [(sregs.cs, BOOT_CS)] + [(s, BOOT_DS) for s in (sregs.ds, sregs.es, sregs.ss)]:
        fields = descriptor(struct.unpack_from("<Q", gdt, selector)[0])
        assert segment.selector == selector
        assert segment.limit == (fields.pop("limit") << 12) | 0xFFF
        assert {name: getattr(segment, name) for name in fields} == fields


def test_bsp_registers_enter_long_mode_at_the_64_bit_entry(booted: Booted) -> None:
    general = ffi.new("struct kvm_regs *")
    ffi.buffer(general)[:] = kvm_x86.boot_regs(booted.entry, layout.ZERO_PAGE_ADDR)
    assert general.rip == booted.entry == layout.KERNEL_LOAD_ADDR + 0x200
    assert general.rsi == layout.ZERO_PAGE_ADDR
    assert general.rflags & RFLAGS_IF == 0 and general.rflags & 0x2  # interrupts off; bit 1 always set
    sregs = boot_sregs()
    assert sregs.cr0 & (CR0_PE | CR0_PG) == CR0_PE | CR0_PG
    assert sregs.cr4 & CR4_PAE and sregs.efer & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
    assert sregs.cr3 == layout.PML4_ADDR
    assert sregs.cs.l == 1 and sregs.cs.db == 0
    assert translate(booted.memory, sregs.cr3, general.rip) == general.rip
    assert translate(booted.memory, sregs.cr3, general.rsp - 8) == general.rsp - 8


def madt_local_apics(memory: GuestMemory, rsdp: int) -> list[tuple[int, int, int]]:
    """(processor uid, APIC id, flags) of each MADT local APIC, found from the RSDP in guest memory."""
    assert memory.read(rsdp, 8) == b"RSD PTR "
    xsdt = memory.read_u64(rsdp + 24)
    assert memory.read(xsdt, 4) == b"XSDT"
    for i in range((memory.read_u32(xsdt + 4) - 36) // 8):
        table = memory.read_u64(xsdt + 36 + 8 * i)
        if memory.read(table, 4) == b"APIC":
            body = memory.read(table, memory.read_u32(table + 4))
            assert sum(body) % 256 == 0
            break
    else:
        raise AssertionError("no MADT in the XSDT")
    apics, offset = [], 44
    while offset < len(body):
        kind, length = body[offset], body[offset + 1]
        if kind == 0:
            assert length == 8
            apics.append(struct.unpack_from("<BBI", body, offset + 2))
        offset += length
    return apics


def test_madt_found_from_boot_params_lists_each_vcpu(booted: Booted) -> None:
    rsdp = booted.u("<Q", ACPI_RSDP_ADDR)
    assert madt_local_apics(booted.memory, rsdp) == [(i, i, 1) for i in range(VCPUS)]


@pytest.mark.parametrize("vcpus", [1, 2, 64])
def test_madt_apic_ids_match_each_vcpus_cpuid(vcpus: int) -> None:
    """One enabled local APIC per vCPU, ids 0..n-1: the ids each vCPU's CPUID reports."""
    rsdp, tables = acpi.build_tables(vcpus, [])
    memory = GuestMemory.anonymous([(0, layout.ACPI_TABLES_END)])
    try:
        memory.write(layout.ACPI_TABLES_ADDR, tables)
        assert madt_local_apics(memory, rsdp) == [(i, i, 1) for i in range(vcpus)]
    finally:
        memory.close()
    supported = [(1, 0, 0, 0, 0, 0, 0), (0xB, 0, 1, 0, 0, 0, 0), (0xB, 1, 1, 0, 0, 0, 0)]
    for vcpu in range(vcpus):
        table = cpuid.vcpu_cpuid(supported, vcpu, vcpus)
        leaves = {(f, i): (eax, ebx, ecx, edx) for f, i, _, eax, ebx, ecx, edx in table}
        assert leaves[1, 0][1] >> 24 == vcpu  # initial APIC id
        assert leaves[0xB, 0][3] == leaves[0xB, 1][3] == vcpu  # x2APIC id


@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_amd_cache_leaves_say_every_vcpu_shares_the_last_level_cache(vcpus: int) -> None:
    """KVM's AMD leaves as the nested machine reports them (no TOPOEXT, the host's sharing counts):
    the guest must find one L3 across its vCPUs and its own L1/L2 per core, as Linux reads them
    (cacheinfo_amd_init_llc_id: LLC id = APIC id >> order of the L3's sharing count)."""
    supported = [
        (0x80000001, 0, 0, 0x00830F10, 0, 0x75, 0),
        (0x80000008, 0, 0, 0x3028, 0x02000000, 0, 0),
        (0x8000001D, 0, 1, 0x121, 0x01C0003F, 0x3F, 1),  # L1d, shared by 1
        (0x8000001D, 1, 1, 0x122, 0x01C0003F, 0x3F, 1),  # L1i
        (0x8000001D, 2, 1, 0x4143, 0x01C0003F, 0x3FF, 0),  # L2, the host's: shared by 2
        (0x8000001D, 3, 1, 0x163, 0x03C0003F, 0x3FFF, 6),  # L3, the host's: shared by 1
        (0x8000001D, 4, 1, 0, 0, 0, 0),
        (0x8000001E, 0, 0, 0, 0, 0, 0),
    ]
    llc_ids, core_ids = set(), set()
    for vcpu in range(vcpus):
        leaves = {(f, i): (a, b, c, d) for f, i, _, a, b, c, d in cpuid.vcpu_cpuid(supported, vcpu, vcpus)}
        assert leaves[0x80000001, 0][2] & cpuid.TOPOEXT_BIT
        assert leaves[0x80000008, 0][2] & 0xFF == vcpus - 1
        assert leaves[0x80000008, 0][:2] == (0x3028, 0x02000000)  # address sizes and features kept
        sharing = [((leaves[0x8000001D, i][0] >> 14) & 0xFFF) + 1 for i in range(4)]
        assert sharing == [1, 1, 1, vcpus]
        assert leaves[0x8000001D, 3][1:] == (0x03C0003F, 0x3FFF, 6)  # size and associativity kept
        assert leaves[0x8000001D, 4] == (0, 0, 0, 0)
        llc_ids.add(vcpu >> (sharing[3] - 1).bit_length())
        eax, ebx, ecx, _ = leaves[0x8000001E, 0]
        assert (eax, ecx & 0xFF, (ebx >> 8) & 0xFF) == (vcpu, 0, 0)  # APIC id, node 0, one thread per core
        core_ids.add(ebx & 0xFF)
    assert len(llc_ids) == 1 and len(core_ids) == vcpus


def test_intel_cache_leaf_shares_only_the_last_level_and_sets_no_amd_bits() -> None:
    host_l2 = (4, 2, 1, 0x0400_4143, 0, 0, 0)  # the host's L2, two hyperthreads share it
    host_l3 = (4, 3, 1, 0x0403_C163, 0, 0, 0)
    table = cpuid.vcpu_cpuid([(0x80000001, 0, 0, 0, 0, 0, 0), host_l2, host_l3], 1, 4)
    (_, _, _, _, _, ecx, _), l2, l3 = table
    assert ecx == 0  # no TOPOEXT without AMD's cache leaves
    assert ((l2[3] >> 14) & 0xFFF, (l3[3] >> 14) & 0xFFF) == (0, 3)
    assert l2[3] >> 26 == l3[3] >> 26 == 3  # cores per package less one
    assert l3[3] & 0x3FFF == 0x0163


def test_the_processor_name_is_the_hosts_where_kvm_reports_none() -> None:
    blank = [(leaf, 0, 0, 0, 0, 0, 0) for leaf in cpuid.BRAND_LEAVES]

    def name(table: list[cpuid.CpuidEntry]) -> bytes:
        return b"".join(struct.pack("<4I", *entry[3:]) for entry in table if entry[0] in cpuid.BRAND_LEAVES)

    assert name(cpuid.vcpu_cpuid(blank, 1, 2, brand="AMD EPYC 7B13 64-Core Processor")) == (
        b"AMD EPYC 7B13 64-Core Processor".ljust(48, b"\0")
    )
    assert name(cpuid.vcpu_cpuid(blank, 0, 1, brand="x" * 60)) == b"x" * 47 + b"\0"  # always NUL-terminated
    assert name(cpuid.vcpu_cpuid(blank, 0, 1)) == bytes(48)
    kvms = [(0x80000002, 0, 0, 0x20444D41, 0, 0, 0), *blank[1:]]  # a KVM that names the processor itself
    assert name(cpuid.vcpu_cpuid(kvms, 0, 1, brand="other")) == b"AMD ".ljust(48, b"\0")


def test_the_tsc_deadline_timer_is_offered_only_where_kvm_emulates_it() -> None:
    supported = [(1, 0, 0, 0, 0, 0, 0)]
    for offered in (True, False):
        ((_, _, _, _, _, ecx, _),) = cpuid.vcpu_cpuid(supported, 0, 1, tsc_deadline=offered)
        assert bool(ecx & cpuid.TSC_DEADLINE_BIT) == offered
        assert ecx & cpuid.HYPERVISOR_BIT


def test_lapic_lint_pins_as_a_pc_leaves_them() -> None:
    lapic = bytearray(1024)
    struct.pack_into("<I", lapic, 0x350, 0x0001_0700)  # masked, some other delivery mode
    struct.pack_into("<I", lapic, 0x360, 0x0001_0000)
    lapic = regs.lapic_with_lint(bytes(lapic))
    assert struct.unpack_from("<I", lapic, 0x350)[0] == 0x0001_0700  # ExtINT (7), mask bit kept
    assert struct.unpack_from("<I", lapic, 0x360)[0] == 0x0001_0400  # NMI (4)


def test_small_ram_is_refused_unless_the_kernel_window_fits() -> None:
    """boot.rst (init_size): a relocatable kernel first moves to align_up(max(load, pref_address),
    kernel_alignment) and needs init_size bytes there. RAM too small for that must be refused,
    and the initrd must stay clear of it."""
    image, initrd, cmdline = guest_files()
    broken = []
    for ram in range(MIN_MEMORY, 128 * MIB + 1, 2 * MIB):
        memory = GuestMemory.anonymous(layout.ram_regions(ram))
        try:
            setup = set_up(memory, image, initrd, cmdline)
        except ImageError:
            continue
        else:
            start, end = setup.runtime_window()
            address = setup.u("<I", RAMDISK_IMAGE)
            if end > ram or start < address + len(initrd) and address < end:
                broken.append(ram // MIB)
        finally:
            memory.close()
    assert not broken, f"accepted, but the kernel cannot fit beside the initrd with these MiB of RAM: {broken}"
