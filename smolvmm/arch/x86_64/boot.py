"""Loading a bzImage per the Linux x86 boot protocol (Documentation/arch/x86/boot.rst), 64-bit entry.

The protected-mode kernel is copied to 1 MiB, the setup header is copied into a fresh
``boot_params`` (the zero page) and completed with the command line, the initrd and the e820 map.
"""

from __future__ import annotations

import struct

from smolvmm.arch.x86_64 import layout
from smolvmm.arch.x86_64.image import SETUP_HEADER_OFFSET, KernelImage
from smolvmm.errors import ImageError
from smolvmm.host.memory import PAGE_SIZE, GuestMemory

LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
E820_RAM = 1
E820_RESERVED = 2

# boot_params field offsets (arch/x86/include/uapi/asm/bootparam.h)
BP_ACPI_RSDP_ADDR = 0x070
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0
# setup header fields the loader fills in, relative to the start of boot_params
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228


def e820_map(ram: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries: conventional RAM below the EBDA, then every RAM region above 1 MiB."""
    entries = [(0, layout.EBDA_START, E820_RAM), (layout.EBDA_START, 0x100000 - layout.EBDA_START, E820_RESERVED)]
    for gpa, size in ram:
        start = max(gpa, 0x100000)
        if gpa + size > start:
            entries.append((start, gpa + size - start, E820_RAM))
    return entries


def load_linux(
    memory: GuestMemory,
    kernel: KernelImage,
    cmdline: str,
    initrd: bytes | memoryview | None,
    rsdp_addr: int,
) -> int:
    """Place kernel, command line, initrd and boot_params in guest RAM; returns the 64-bit entry point."""
    low_ram_end = memory.regions[0].end
    kernel_end = kernel.end(layout.KERNEL_LOAD_ADDR)
    if kernel_end > low_ram_end:
        raise ImageError(f"guest RAM is too small for this kernel: it needs {kernel_end >> 20} MiB below 4 GiB")
    memory.write(layout.KERNEL_LOAD_ADDR, kernel.protected_mode)

    encoded = cmdline.encode() + b"\0"
    limit = min(layout.CMDLINE_MAX, kernel.cmdline_size + 1)
    if len(encoded) > limit:
        raise ImageError(f"kernel command line is {len(encoded) - 1} bytes; this kernel takes at most {limit - 1}")
    memory.write(layout.CMDLINE_ADDR, encoded)

    params = bytearray(PAGE_SIZE)
    params[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(kernel.setup_header)] = kernel.setup_header
    params[HDR_TYPE_OF_LOADER] = 0xFF
    params[HDR_LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<H", params, HDR_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", params, HDR_CMD_LINE_PTR, layout.CMDLINE_ADDR)
    struct.pack_into("<Q", params, BP_ACPI_RSDP_ADDR, rsdp_addr)

    if initrd is not None and len(initrd):
        top = min(low_ram_end, kernel.initrd_addr_max + 1, layout.MMIO_GAP_START)
        address = (top - len(initrd)) & ~(PAGE_SIZE - 1)
        if address < kernel_end:
            raise ImageError(f"initrd of {len(initrd)} bytes does not fit in guest RAM beside the kernel")
        memory.write(address, initrd)
        struct.pack_into("<I", params, HDR_RAMDISK_IMAGE, address)
        struct.pack_into("<I", params, HDR_RAMDISK_SIZE, len(initrd))

    entries = e820_map([(r.gpa, r.size) for r in memory.regions])
    params[BP_E820_ENTRIES] = len(entries)
    for i, (addr, size, kind) in enumerate(entries):
        struct.pack_into("<QQI", params, BP_E820_TABLE + 20 * i, addr, size, kind)
    memory.write(layout.ZERO_PAGE_ADDR, params)
    return layout.KERNEL_LOAD_ADDR + 0x200
