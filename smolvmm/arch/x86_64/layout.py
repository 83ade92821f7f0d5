"""The x86_64 guest-physical memory map.

```
0x0000_0500  GDT                      0x0009_fc00  end of conventional RAM (EBDA above)
0x0000_7000  boot_params (zero page)  0x000e_0000  ACPI tables (RSDP is found by scanning here)
0x0000_8ff0  initial stack            0x0010_0000  protected-mode kernel (1 MiB)
0x0000_9000  PML4, PDPT at 0xa000,    ...          initrd at the top of low RAM
             PD at 0xb000             0xd000_0000  virtio-mmio windows (4 KiB each)
0x0002_0000  kernel command line      0xfec0_0000  IOAPIC, 0xfee0_0000 LAPIC
```
RAM above 0xd000_0000 is placed from 4 GiB upwards, so the 32-bit hole stays free for devices.
"""

from __future__ import annotations

from dataclasses import dataclass

from smolvmm.errors import ConfigError

GDT_ADDR = 0x500
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_POINTER = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
EBDA_START = 0x9FC00
ACPI_TABLES_ADDR = 0xE0000
ACPI_TABLES_END = 0x100000
KERNEL_LOAD_ADDR = 0x100000
MMIO_GAP_START = 0xD000_0000
MMIO_GAP_END = 0x1_0000_0000
VIRTIO_MMIO_BASE = MMIO_GAP_START
VIRTIO_MMIO_SIZE = 0x1000
VIRTIO_IRQ_BASE = 5
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000

# Legacy ports and their ISA interrupts.
COM1_PORT = 0x3F8
COM1_IRQ = 4
I8042_PORT = 0x60
I8042_IRQ = 1
ACPI_SLEEP_PORT = 0x3C0  # FADT sleep control (write) and status (read) registers


def ram_regions(size: int) -> list[tuple[int, int]]:
    """(gpa, size) regions for ``size`` bytes of RAM, leaving the 32-bit MMIO gap free."""
    if size <= MMIO_GAP_START:
        return [(0, size)]
    return [(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]


def virtio_slot(index: int) -> tuple[int, int]:
    """(mmio base, gsi) of the ``index``-th virtio-mmio device."""
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE, VIRTIO_IRQ_BASE + index


MAX_VCPUS = 64  # CPUID leaf 4 holds cores per package - 1 in 6 bits (cpuid.py)
IOAPIC_PINS = 24
MAX_VIRTIO = IOAPIC_PINS - VIRTIO_IRQ_BASE  # one IOAPIC pin each


@dataclass(frozen=True)
class Layout:
    """The guest-physical map of one machine; build it with ``layout()``."""

    vcpus: int
    ram_size: int
    virtio_count: int

    @property
    def ram(self) -> list[tuple[int, int]]:
        """(gpa, size) of each RAM region."""
        return ram_regions(self.ram_size)

    @property
    def virtio(self) -> list[tuple[int, int, int]]:
        """(mmio base, size, gsi) of the virtio-mmio slots in use, in slot order."""
        slots = [virtio_slot(n) for n in range(self.virtio_count)]
        return [(base, VIRTIO_MMIO_SIZE, gsi) for base, gsi in slots]


def layout(vcpus: int, ram_size: int, virtio_count: int) -> Layout:
    """The memory map for a machine, or ConfigError naming the value out of range."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ConfigError(f"x86_64 machines have 1 to {MAX_VCPUS} vCPUs, not {vcpus}")
    if not 0 <= virtio_count <= MAX_VIRTIO:
        raise ConfigError(f"x86_64 machines have at most {MAX_VIRTIO} virtio devices, not {virtio_count}")
    return Layout(vcpus, ram_size, virtio_count)
