"""The device tree an arm64 guest boots with: the counterpart of x86_64's ACPI tables.

It describes exactly the machine of ``layout.py``: RAM, the vCPUs (started through PSCI), the
GICv3, the architected timer, a PL011 UART (the console), a PL031 RTC and the virtio-mmio slots.
Bindings: Documentation/devicetree/bindings/ in Linux (arm/cpus.yaml, arm/psci.yaml,
interrupt-controller/arm,gic-v3.yaml, timer/arm,arch_timer.yaml, serial/pl011.yaml,
rtc/arm,pl031.yaml, virtio/mmio.yaml).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from smolvmm.arch.arm64 import dtb
from smolvmm.arch.arm64.dtb import Node, cells, strings, u64_cells
from smolvmm.arch.arm64.layout import Layout, MmioDevice

# Interrupt specifiers for a GICv3 with #interrupt-cells = 3: <kind number flags>.
GIC_SPI, GIC_PPI = 0, 1
IRQ_TYPE_EDGE_RISING = 1
IRQ_TYPE_LEVEL_HIGH = 4

# Architected timer PPIs (INTID - 16), in the order the binding lists them.
TIMER_PPIS = (13, 14, 11, 10)  # secure physical, non-secure physical, virtual, hypervisor

APB_CLOCK_HZ = 24_000_000


class Phandle(IntEnum):
    """The phandles of the nodes other nodes refer to."""

    GIC = 1
    APB_CLOCK = 2


@dataclass(frozen=True)
class Initrd:
    """Where the initrd lies in guest RAM."""

    start: int
    size: int


def machine_fdt(layout: Layout, mpidrs: Sequence[int], cmdline: str, initrd: Initrd | None = None) -> bytes:
    """The DTB for ``layout``; ``mpidrs[n]`` is vCPU n's MPIDR_EL1 (the cpu node's reg)."""
    if len(mpidrs) != layout.vcpus:
        raise ValueError(f"{len(mpidrs)} MPIDRs for {layout.vcpus} vCPUs")
    root = Node(
        "",
        {
            "compatible": strings("linux,dummy-virt"),
            "model": strings("smolvmm"),
            "#address-cells": cells(2),
            "#size-cells": cells(2),
            "interrupt-parent": cells(Phandle.GIC),
        },
    )
    uart_node = f"uart@{layout.uart.base:x}"
    chosen = root.child("chosen", {"bootargs": strings(cmdline), "stdout-path": strings(f"/{uart_node}")})
    if initrd is not None:
        chosen.properties["linux,initrd-start"] = u64_cells(initrd.start)
        chosen.properties["linux,initrd-end"] = u64_cells(initrd.start + initrd.size)
    root.child(
        f"memory@{layout.ram_end - layout.ram_size:x}",
        {"device_type": strings("memory"), "reg": u64_cells(layout.ram_end - layout.ram_size, layout.ram_size)},
    )
    _add_cpus(root, mpidrs)
    root.child("psci", {"compatible": strings("arm,psci-1.0", "arm,psci-0.2"), "method": strings("hvc")})
    _add_gic(root, layout)
    root.child(
        "timer",
        {
            "compatible": strings("arm,armv8-timer"),
            "interrupts": cells(*(c for ppi in TIMER_PPIS for c in (GIC_PPI, ppi, IRQ_TYPE_LEVEL_HIGH))),
            "always-on": b"",
        },
    )
    root.child(
        "apb-pclk",
        {
            "compatible": strings("fixed-clock"),
            "#clock-cells": cells(0),
            "clock-frequency": cells(APB_CLOCK_HZ),
            "clock-output-names": strings("clk24mhz"),
            "phandle": cells(Phandle.APB_CLOCK),
        },
    )
    root.child(
        uart_node,
        {
            "compatible": strings("arm,pl011", "arm,primecell"),
            **_mmio(layout.uart, IRQ_TYPE_LEVEL_HIGH),
            "clocks": cells(Phandle.APB_CLOCK, Phandle.APB_CLOCK),
            "clock-names": strings("uartclk", "apb_pclk"),
        },
    )
    root.child(
        f"rtc@{layout.rtc.base:x}",
        {
            "compatible": strings("arm,pl031", "arm,primecell"),
            **_mmio(layout.rtc, IRQ_TYPE_LEVEL_HIGH),
            "clocks": cells(Phandle.APB_CLOCK),
            "clock-names": strings("apb_pclk"),
        },
    )
    for device in layout.virtio:
        # Edge: the monitor signals a virtio interrupt by pulsing the line through an irqfd.
        root.child(
            f"virtio_mmio@{device.base:x}",
            {"compatible": strings("virtio,mmio"), **_mmio(device, IRQ_TYPE_EDGE_RISING), "dma-coherent": b""},
        )
    return dtb.encode(root)


def _mmio(device: MmioDevice, trigger: int) -> dict[str, bytes]:
    return {"reg": u64_cells(device.base, device.size), "interrupts": cells(GIC_SPI, device.spi, trigger)}


def _add_cpus(root: Node, mpidrs: Sequence[int]) -> None:
    # One address cell holds Aff2.Aff1.Aff0; layout.MAX_VCPUS keeps Aff3 zero.
    cpus = root.child("cpus", {"#address-cells": cells(1), "#size-cells": cells(0)})
    for mpidr in mpidrs:
        if mpidr >> 32 & 0xFF:
            raise ValueError(f"MPIDR {mpidr:#x} has a non-zero Aff3")
        affinity = mpidr & 0xFF_FFFF
        cpus.child(
            f"cpu@{affinity:x}",
            {
                "device_type": strings("cpu"),
                "compatible": strings("arm,arm-v8"),
                "enable-method": strings("psci"),
                "reg": cells(affinity),
            },
        )


def _add_gic(root: Node, layout: Layout) -> None:
    dist_base, dist_size = layout.gic_dist
    redist_base, redist_size = layout.gic_redist
    root.child(
        f"intc@{dist_base:x}",
        {
            "compatible": strings("arm,gic-v3"),
            "#interrupt-cells": cells(3),
            # No child nodes (no ITS), but dtc's interrupt_provider check wants the cells declared.
            "#address-cells": cells(2),
            "#size-cells": cells(2),
            "ranges": b"",
            "interrupt-controller": b"",
            "reg": u64_cells(dist_base, dist_size, redist_base, redist_size),
            "phandle": cells(Phandle.GIC),
        },
    )
