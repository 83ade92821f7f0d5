"""Minimal ACPI tables: RSDP, XSDT, a hardware-reduced FADT, a DSDT with \\_S5, and a MADT.

The MADT lists one local APIC per vCPU (that is how the guest finds its CPUs), and the
FADT's sleep control register at ``layout.ACPI_SLEEP_PORT`` is how a guest ``poweroff``
reaches the monitor: Linux writes SLP_TYP(\\_S5)<<2 | SLP_EN there (ACPI 6.x §4.8.3.7).
"""

from __future__ import annotations

import struct

from smolvmm.arch.x86_64 import aml, layout

OEM_ID = b"SMOLVM"
OEM_TABLE_ID = b"SMOLVMM "
CREATOR_ID = b"SMOL"
S5_SLEEP_TYPE = 5
SLEEP_ENABLE = 1 << 5

FADT_HW_REDUCED_ACPI = 1 << 20
BOOT_ARCH_LEGACY_DEVICES = 1 << 0  # a UART on the ISA ports; no 8042 flag: the kernel skips probing it
BOOT_ARCH_NO_VGA = 1 << 2
BOOT_ARCH_NO_CMOS_RTC = 1 << 5
GAS_SYSTEM_IO = 1


def _checksum(data: bytes | bytearray) -> int:
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    length = 36 + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1)
    table = bytearray(header + body)
    table[9] = _checksum(table)
    return bytes(table)


def _gas(port: int) -> bytes:
    """A Generic Address Structure for one byte-wide I/O port."""
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, 8, 0, 1, port)


def virtio_mmio_device(index: int, base: int, size: int, gsi: int) -> bytes:
    """A virtio-mmio transport as Linux's virtio_mmio driver finds it on ACPI systems (_HID LNRO0005)."""
    return aml.device(
        f"V{index:03X}",
        aml.name("_HID", aml.string("LNRO0005")),
        aml.name("_UID", aml.integer(index)),
        aml.name("_CCA", aml.integer(1)),
        aml.name("_CRS", aml.resource_template(aml.memory32_fixed(base, size), aml.interrupt(gsi))),
    )


def com1() -> bytes:
    """The 16550A, so the kernel maps its interrupt: hardware-reduced ACPI has no legacy ISA IRQs."""
    return aml.device(
        "COM1",
        aml.name("_HID", aml.eisa_id("PNP0501")),
        aml.name("_UID", aml.integer(1)),
        aml.name("_CRS", aml.resource_template(aml.io_port(layout.COM1_PORT, 8), aml.irq_no_flags(layout.COM1_IRQ))),
    )


def dsdt(devices: list[tuple[int, int, int]]) -> bytes:
    """\\_S5 for poweroff and, under \\_SB, COM1 and one node per virtio-mmio (base, size, gsi)."""
    s5 = aml.name("_S5_", aml.package(*(aml.integer(v) for v in (S5_SLEEP_TYPE, 0, 0, 0))))
    nodes = [com1()] + [virtio_mmio_device(i, base, size, gsi) for i, (base, size, gsi) in enumerate(devices)]
    return _table(b"DSDT", 2, s5 + aml.scope("\\_SB_", *nodes))


def fadt(dsdt_addr: int) -> bytes:
    body = bytearray(276 - 36)

    def put(offset: int, fmt: str, *values: object) -> None:
        struct.pack_into(fmt, body, offset - 36, *values)

    put(40, "<I", dsdt_addr)
    put(109, "<H", BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_NO_VGA | BOOT_ARCH_NO_CMOS_RTC)
    put(112, "<I", FADT_HW_REDUCED_ACPI)
    put(131, "<B", 0)  # FADT minor version: ACPI 6.0
    put(140, "<Q", dsdt_addr)
    body[244 - 36 : 256 - 36] = _gas(layout.ACPI_SLEEP_PORT)
    body[256 - 36 : 268 - 36] = _gas(layout.ACPI_SLEEP_PORT)
    put(268, "<8s", b"SMOLVMM\0")
    return _table(b"FACP", 6, bytes(body))


def madt(vcpus: int) -> bytes:
    body = struct.pack("<II", layout.LAPIC_ADDR, 1)  # flags: PCAT_COMPAT (there is an 8259 PIC)
    for cpu in range(vcpus):
        body += struct.pack("<BBBBI", 0, 8, cpu, cpu, 1)  # processor local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, 0, 0, layout.IOAPIC_ADDR, 0)  # IOAPIC, GSI base 0
    return _table(b"APIC", 4, body)


def build_tables(
    vcpus: int, virtio: list[tuple[int, int, int]], base: int = layout.ACPI_TABLES_ADDR
) -> tuple[int, bytes]:
    """Lay out every table from ``base``; returns (RSDP address, bytes to write at ``base``).

    ``virtio`` lists the (mmio base, size, gsi) of each virtio-mmio device.
    """
    blob = bytearray()

    def place(table: bytes) -> int:
        address = base + len(blob)
        blob.extend(table)
        blob.extend(b"\0" * (-len(blob) % 16))
        return address

    rsdp_addr = place(bytes(36))
    dsdt_addr = place(dsdt(virtio))
    fadt_addr = place(fadt(dsdt_addr))
    madt_addr = place(madt(vcpus))
    xsdt_addr = place(_table(b"XSDT", 1, struct.pack("<QQ", fadt_addr, madt_addr)))
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_addr, 0, b"\0" * 3))
    rsdp[8] = _checksum(rsdp[:20])
    rsdp[32] = _checksum(rsdp)
    blob[: len(rsdp)] = rsdp
    if base + len(blob) > layout.ACPI_TABLES_END:
        raise ValueError(f"ACPI tables for {vcpus} vCPUs do not fit below 1 MiB")
    return rsdp_addr, bytes(blob)


def sleep_request(value: int) -> bool:
    """Whether a guest write to the sleep control register asks for S5 (power off)."""
    return bool(value & SLEEP_ENABLE) and (value >> 2) & 0x7 == S5_SLEEP_TYPE
