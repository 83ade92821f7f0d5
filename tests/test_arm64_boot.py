"""arm64 Image header parsing, boot placement and the boot vCPU's registers.

The header is synthesised the way a Debian 6.1 arm64 kernel lays it out (EFI stub "MZ" in code0,
a branch in code1, text_offset 0, flags = 4K pages + place anywhere, PE header at 0x40). A real
Debian arm64 kernel is not fetched: its package is ~60 MB and this host's apt is not set up for
arm64 packages.
"""

from __future__ import annotations

import struct

import pytest

from smolvmm.arch.arm64 import boot, image, layout, regs
from smolvmm.errors import ConfigError, ImageError
from smolvmm.host.memory import GuestMemory

MIB = 1 << 20


def _image(
    *,
    image_size: int = 0x2A3_0000,
    flags: int = 0b1010,
    text_offset: int = 0,
    magic: bytes = b"ARM\x64",
    length: int = 0x1000,
) -> bytes:
    header = struct.pack(
        "<IIQQQQQQ4sI", 0xFA40_5A4D, 0x1400_0000 | 0x4000, text_offset, image_size, flags, 0, 0, 0, magic, 0x40
    )
    pe = b"PE\0\0" + bytes(20)
    data = header + pe
    return data + bytes(length - len(data))


def test_parses_a_debian_style_header() -> None:
    header = image.parse_image(_image())
    assert header == image.ImageHeader(
        text_offset=0, image_size=0x2A3_0000, page_size=image.PageSize.SIZE_4K, anywhere=True, pe_offset=0x40
    )
    assert image.parse_image(_image(flags=0b0110)).page_size == image.PageSize.SIZE_64K
    assert image.parse_image(_image(flags=0)).anywhere is False


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x1f\x8b\x08\x00" + bytes(100), "gzip"),
        (b"\x7fELF" + bytes(100), "ELF"),
        (_image()[:40], "40 bytes, shorter than the 64-byte"),
        (_image(magic=b"ARM\x65"), "not an arm64 Image: bytes 0x38"),
        (_image(flags=0b1011), "big-endian"),
        (_image(image_size=0), "older than Linux 3.17"),
        (_image(image_size=0x800), "occupies only 2048"),
        (_image(text_offset=0x80010), "not page aligned"),
        (_image()[:0x42], "truncated: its PE header at 0x40"),
    ],
)
def test_rejects_bad_images_with_a_precise_message(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        image.parse_image(data, name="vmlinuz")


def test_placement_follows_the_boot_protocol() -> None:
    machine = layout.layout(1, 256 * MIB, 0)
    header = image.parse_image(_image(text_offset=0x8_0000))
    plan = boot.plan_boot(machine, header, initrd_size=5 * MIB + 123)
    assert plan.kernel == layout.RAM_START + 0x8_0000 and layout.RAM_START % (2 * MIB) == 0
    assert plan.kernel_end == plan.kernel + header.image_size
    assert plan.dtb == machine.ram_end - 2 * MIB and plan.dtb % (2 * MIB) == 0
    assert plan.initrd % 4096 == 0 and plan.initrd + plan.initrd_size <= plan.dtb
    assert plan.dtb - (plan.initrd + plan.initrd_size) < 4096
    assert plan.initrd >= plan.kernel_end


def test_ram_too_small_is_a_config_error() -> None:
    machine = layout.layout(1, 64 * MIB, 0)
    header = image.parse_image(_image(image_size=40 * MIB))
    message = r"64 MiB of RAM cannot hold the kernel \(40 MiB running\), the initrd \(30 MiB\)"
    with pytest.raises(ConfigError, match=message):
        boot.plan_boot(machine, header, initrd_size=30 * MIB)


def test_load_writes_each_image_where_planned() -> None:
    machine = layout.layout(1, 64 * MIB, 0)
    kernel = _image()
    plan = boot.plan_boot(machine, image.parse_image(kernel), initrd_size=3)
    memory = GuestMemory.anonymous([(layout.RAM_START, machine.ram_size)])
    boot.load_linux(memory, plan, kernel, b"ird", b"\xd0\x0d\xfe\xed")
    assert memory.read(plan.kernel, len(kernel)) == kernel
    assert memory.read(plan.initrd, 3) == b"ird"
    assert memory.read(plan.dtb, 4) == b"\xd0\x0d\xfe\xed"
    with pytest.raises(ImageError, match="at most 2 MiB"):
        boot.load_linux(memory, plan, kernel, b"ird", bytes(2 * MIB + 1))
    with pytest.raises(ImageError, match="not the 3 planned"):
        boot.load_linux(memory, plan, kernel, b"initrd", b"")


def test_boot_registers() -> None:
    machine = layout.layout(1, 64 * MIB, 0)
    plan = boot.plan_boot(machine, image.parse_image(_image()), initrd_size=0)
    values = boot.boot_registers(plan)
    assert values == {"x0": plan.dtb, "x1": 0, "x2": 0, "x3": 0, "pc": plan.kernel, "pstate": 0x3C5}
    assert set(values) <= set(regs.CORE), "boot registers are named as the one-reg table names them"
