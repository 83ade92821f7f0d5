"""The x86 Linux ``bzImage`` setup header (Documentation/arch/x86/boot.rst, "The real-mode kernel header").

A bzImage is the real-mode setup sectors followed by the protected-mode kernel; the setup
header at 0x1F1 says how many setup sectors there are, which boot protocol the kernel speaks
and whether it has a 64-bit entry point. Offsets are from the start of the image (and of
``boot_params``, which embeds the header at the same offset).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from smolvmm.errors import ImageError

SETUP_HEADER_OFFSET = 0x1F1
HDRS_MAGIC = b"HdrS"
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags says whether a 64-bit entry point exists
XLF_KERNEL_64 = 1 << 0

HDR_SETUP_SECTS = 0x1F1
HDR_VERSION = 0x206
HDR_INITRD_ADDR_MAX = 0x22C
HDR_KERNEL_ALIGNMENT = 0x230
HDR_XLOADFLAGS = 0x236
HDR_CMDLINE_SIZE = 0x238
HDR_PREF_ADDRESS = 0x258
HDR_INIT_SIZE = 0x260


@dataclass(frozen=True)
class KernelImage:
    """A parsed bzImage: its setup header bytes and the protected-mode kernel."""

    setup_header: bytes
    protected_mode: memoryview
    version: int
    init_size: int
    initrd_addr_max: int
    cmdline_size: int
    pref_address: int
    kernel_alignment: int

    def end(self, load_address: int) -> int:
        """Where the kernel's memory ends when loaded at ``load_address``: it first moves to
        align_up(max(load address, pref_address), kernel_alignment) and needs ``init_size``
        bytes from there (boot.rst, ``init_size``), beside its own image at the load address."""
        alignment = max(self.kernel_alignment, 1)
        start = -(-max(load_address, self.pref_address) // alignment) * alignment
        return max(load_address + len(self.protected_mode), start + self.init_size)


def parse_bzimage(image: bytes | memoryview) -> KernelImage:
    """Check a bzImage and split it into its setup header and protected-mode kernel."""
    data = memoryview(image)
    if len(data) < 0x270:
        raise ImageError(f"kernel image is too short ({len(data)} bytes) to be a bzImage")
    if bytes(data[0x202:0x206]) != HDRS_MAGIC:
        if bytes(data[:4]) == b"\x7fELF":
            raise ImageError("kernel is an ELF vmlinux, not a bzImage: pass arch/x86/boot/bzImage")
        raise ImageError("kernel is not a bzImage (no 'HdrS' setup header)")
    version = struct.unpack_from("<H", data, HDR_VERSION)[0]
    if version < MIN_PROTOCOL:
        raise ImageError(f"kernel boot protocol {version >> 8}.{version & 0xFF} is too old (need 2.12)")
    if not struct.unpack_from("<H", data, HDR_XLOADFLAGS)[0] & XLF_KERNEL_64:
        raise ImageError("kernel has no 64-bit entry point (XLF_KERNEL_64 is clear)")
    setup_sects = data[HDR_SETUP_SECTS] or 4
    pm_offset = (setup_sects + 1) * 512
    if pm_offset >= len(data):
        raise ImageError("kernel image is truncated: no protected-mode code after the setup sectors")
    header_end = 0x202 + data[0x201]
    return KernelImage(
        setup_header=bytes(data[SETUP_HEADER_OFFSET:header_end]),
        protected_mode=data[pm_offset:],
        version=version,
        init_size=struct.unpack_from("<I", data, HDR_INIT_SIZE)[0],
        initrd_addr_max=struct.unpack_from("<I", data, HDR_INITRD_ADDR_MAX)[0],
        cmdline_size=struct.unpack_from("<I", data, HDR_CMDLINE_SIZE)[0],
        pref_address=struct.unpack_from("<Q", data, HDR_PREF_ADDRESS)[0],
        kernel_alignment=struct.unpack_from("<I", data, HDR_KERNEL_ALIGNMENT)[0],
    )
