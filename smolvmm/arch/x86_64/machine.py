"""The x86_64 machine the monitor builds: legacy devices on I/O ports, virtio-mmio in the 32-bit
hole, Linux entered at its 64-bit entry with ACPI tables describing the rest."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from smolvmm.arch.interface import AdmittedVcpu, BootEntry, HostOffer, PlatformDevice
from smolvmm.arch.x86_64 import acpi, layout, regs, state
from smolvmm.host.memory import GuestMemory


@dataclass(frozen=True)
class X86_64:
    """x86_64 for the monitor (``smolvmm.arch.interface.Arch``)."""

    name: str = "x86_64"
    platform_devices: tuple[PlatformDevice, ...] = (
        PlatformDevice("uart16550", "pio", layout.COM1_PORT, 8, layout.COM1_IRQ),
        PlatformDevice("i8042", "pio", layout.I8042_PORT, 5, layout.I8042_IRQ),
        PlatformDevice("acpi-sleep", "pio", layout.ACPI_SLEEP_PORT, 1, 0),  # no interrupt: the guest writes it
    )

    def ram_regions(self, size: int) -> list[tuple[int, int]]:
        return layout.ram_regions(size)

    def virtio_slot(self, index: int) -> tuple[int, int]:
        return layout.virtio_slot(index)

    def load_linux(
        self,
        memory: GuestMemory,
        kernel: bytes,
        initrd: bytes | None,
        cmdline: str,
        vcpus: int,
        virtio_count: int,
    ) -> BootEntry:
        """A bzImage at 1 MiB with its boot_params, the ACPI tables, GDT and page tables; the
        BSP enters at the 64-bit entry with boot_params in rsi."""
        from smolvmm.arch.x86_64 import boot  # a cold boot's alone: a restore does without
        from smolvmm.arch.x86_64.image import parse_bzimage

        machine = layout.layout(vcpus, sum(region.size for region in memory.regions), virtio_count)
        image = parse_bzimage(kernel)
        rsdp, tables = acpi.build_tables(vcpus, machine.virtio)
        memory.write(layout.ACPI_TABLES_ADDR, tables)
        entry = boot.load_linux(memory, image, cmdline, initrd, rsdp)
        regs.write_boot_structures(memory)
        return BootEntry(entry, layout.ZERO_PAGE_ADDR)

    def admit_vcpu_state(self, record: Mapping[str, Any], offer: HostOffer, *, strict: bool) -> AdmittedVcpu:
        return state.admit_vcpu(record, offer, strict=strict)

    def admit_vm_state(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return state.admit_vm(record)


ARCH = X86_64()
