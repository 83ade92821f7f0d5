"""The ACPI tables the guest reads: checksums, and iasl's disassembly of what we generate."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from smolvmm.arch.x86_64 import acpi, layout

VIRTIO = [(0xD000_0000, 0x1000, 5), (0xD000_1000, 0x1000, 6)]


def _tables() -> dict[bytes, bytes]:
    rsdp_addr, blob = acpi.build_tables(3, VIRTIO)
    assert rsdp_addr == layout.ACPI_TABLES_ADDR
    rsdp = blob[:36]
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    xsdt_off = struct.unpack_from("<Q", rsdp, 24)[0] - layout.ACPI_TABLES_ADDR
    tables = {}
    xsdt_len = struct.unpack_from("<I", blob, xsdt_off + 4)[0]
    for i in range(36, xsdt_len, 8):
        off = struct.unpack_from("<Q", blob, xsdt_off + i)[0] - layout.ACPI_TABLES_ADDR
        length = struct.unpack_from("<I", blob, off + 4)[0]
        tables[blob[off : off + 4]] = blob[off : off + length]
    fadt = tables[b"FACP"]
    dsdt_off = struct.unpack_from("<Q", fadt, 140)[0] - layout.ACPI_TABLES_ADDR
    tables[b"DSDT"] = blob[dsdt_off : dsdt_off + struct.unpack_from("<I", blob, dsdt_off + 4)[0]]
    return tables


def test_every_table_checksums_to_zero() -> None:
    tables = _tables()
    assert set(tables) == {b"FACP", b"APIC", b"DSDT"}
    for table in tables.values():
        assert sum(table) % 256 == 0


def _disassemble(tmp_path: Path, name: str, table: bytes) -> str:
    if not shutil.which("iasl"):
        pytest.fail("iasl is needed: run tools/setup (Debian package acpica-tools)")
    path = tmp_path / f"{name}.dat"
    path.write_bytes(table)
    subprocess.run(["iasl", "-d", str(path)], check=True, capture_output=True)
    return path.with_suffix(".dsl").read_text()


def test_iasl_reads_madt_fadt_and_dsdt(tmp_path: Path) -> None:
    tables = _tables()
    madt = _disassemble(tmp_path, "apic", tables[b"APIC"])
    assert madt.count("Subtable Type : 00 [Processor Local APIC]") == 3
    assert "Subtable Type : 01 [I/O APIC]" in madt and "FEC00000" in madt
    fadt = _disassemble(tmp_path, "facp", tables[b"FACP"])
    assert "Hardware Reduced (V5) : 1" in fadt
    assert fadt.count("Address : 00000000000003C0") == 2  # sleep control and status registers
    dsdt = _disassemble(tmp_path, "dsdt", tables[b"DSDT"])
    assert "Name (_S5, Package (0x04)" in dsdt and "0x05," in dsdt
    assert dsdt.count('Name (_HID, "LNRO0005")') == 2
    for base, _, gsi in VIRTIO:
        assert f"0x{base:08X},         // Address Base" in dsdt
        assert f"0x{gsi:08X}," in dsdt


def test_poweroff_request_decoding() -> None:
    assert acpi.sleep_request((5 << 2) | (1 << 5))
    assert not acpi.sleep_request(5 << 2)  # SLP_EN clear
    assert not acpi.sleep_request((3 << 2) | (1 << 5))  # S3, not S5
