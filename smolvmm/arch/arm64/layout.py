"""The arm64 guest-physical memory map.

```
0x0000_0000 .. GIC redistributors    unused (no firmware: the kernel is loaded directly)
GIC redistributors .. 0x3FFF_0000    GICv3 redistributors, 128 KiB per vCPU, growing down
0x3FFF_0000 .. 0x4000_0000           GICv3 distributor, 64 KiB
0x4000_0000 .. 0x4000_1000           PL011 UART, SPI 1
0x4000_1000 .. 0x4000_2000           PL031 RTC, SPI 2
0x4001_0000 + 4 KiB * n              virtio-mmio slot n (n < 32), SPI 16 + n
0x8000_0000 .. + RAM size            RAM (at most up to 1 TiB)
```

Why these addresses:
- RAM starts at 2 GiB, as on Firecracker: every device sits below 4 GiB, so 32-bit DMA masks and
  32-bit MMIO addresses work, and the 2 MiB-aligned base the arm64 boot protocol asks for is the
  first byte of RAM. RAM ends by 1 TiB because KVM's default guest IPA size is 40 bits.
- The GIC frames end at 1 GiB and grow down with the vCPU count, so the device window at 1 GiB
  never moves; both frame kinds are 64 KiB aligned as KVM requires.
- UART and RTC first, then virtio-mmio: each device gets its own 4 KiB page so each can be
  trapped alone; SPIs 1, 2 and 16.. match QEMU's virt board, which guests and people know.
- 96 interrupts (32 private + 64 SPIs) cover every SPI above; KVM wants a multiple of 32.
"""

from __future__ import annotations

from dataclasses import dataclass

from smolvmm.arch.arm64.gic import DIST_SIZE, FIRST_SPI, REDIST_SIZE
from smolvmm.errors import ConfigError

MIB = 1 << 20
GIB = 1 << 30

RAM_START = 0x8000_0000
RAM_END_MAX = 1 << 40
GIC_DIST_BASE = GIB - DIST_SIZE
MMIO_START = GIB
MMIO_SLOT_SIZE = 0x1000
UART_BASE, UART_SPI = MMIO_START, 1
RTC_BASE, RTC_SPI = MMIO_START + MMIO_SLOT_SIZE, 2
VIRTIO_BASE, VIRTIO_FIRST_SPI, VIRTIO_SLOTS = MMIO_START + 0x1_0000, 16, 32
NR_IRQS = FIRST_SPI + 64

MAX_VCPUS = 256  # keeps MPIDR Aff2 (and Aff3) zero and the redistributors within 32 MiB
RAM_ALIGN = 2 * MIB
MIN_RAM = 64 * MIB


@dataclass(frozen=True)
class MmioDevice:
    """A device's register window and its SPI number (the INTID is 32 + spi)."""

    base: int
    size: int
    spi: int


@dataclass(frozen=True)
class Layout:
    """The guest-physical map of one machine; build it with ``layout()``."""

    vcpus: int
    ram_size: int
    virtio_count: int

    @property
    def ram_end(self) -> int:
        return RAM_START + self.ram_size

    @property
    def ram(self) -> list[tuple[int, int]]:
        """(gpa, size) of each RAM region."""
        return ram_regions(self.ram_size)

    @property
    def gic_dist(self) -> tuple[int, int]:
        """(base, size) of the GICv3 distributor."""
        return GIC_DIST_BASE, DIST_SIZE

    @property
    def gic_redist(self) -> tuple[int, int]:
        """(base, size) of the contiguous redistributor frames, one pair per vCPU."""
        size = REDIST_SIZE * self.vcpus
        return GIC_DIST_BASE - size, size

    @property
    def uart(self) -> MmioDevice:
        return MmioDevice(UART_BASE, MMIO_SLOT_SIZE, UART_SPI)

    @property
    def rtc(self) -> MmioDevice:
        return MmioDevice(RTC_BASE, MMIO_SLOT_SIZE, RTC_SPI)

    @property
    def virtio(self) -> list[MmioDevice]:
        """The virtio-mmio slots in use, in slot order."""
        slots = [virtio_slot(n) for n in range(self.virtio_count)]
        return [MmioDevice(base, MMIO_SLOT_SIZE, spi) for base, spi in slots]


def layout(vcpus: int, ram_size: int, virtio_count: int) -> Layout:
    """The memory map for a machine, or ConfigError naming the value out of range."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ConfigError(f"arm64 machines have 1 to {MAX_VCPUS} vCPUs, not {vcpus}")
    if ram_size % RAM_ALIGN or not MIN_RAM <= ram_size <= RAM_END_MAX - RAM_START:
        raise ConfigError(
            f"arm64 RAM must be a multiple of 2 MiB from {MIN_RAM // MIB} MiB to "
            f"{(RAM_END_MAX - RAM_START) // MIB} MiB, not {ram_size} bytes"
        )
    if not 0 <= virtio_count <= VIRTIO_SLOTS:
        raise ConfigError(f"arm64 machines have at most {VIRTIO_SLOTS} virtio devices, not {virtio_count}")
    return Layout(vcpus, ram_size, virtio_count)


def ram_regions(size: int) -> list[tuple[int, int]]:
    """(gpa, size) regions for ``size`` bytes of RAM: one, from ``RAM_START``."""
    return [(RAM_START, size)]


def virtio_slot(index: int) -> tuple[int, int]:
    """(mmio base, SPI) of the ``index``-th virtio-mmio device."""
    return VIRTIO_BASE + index * MMIO_SLOT_SIZE, VIRTIO_FIRST_SPI + index
