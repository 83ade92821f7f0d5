"""The arm64 machine the monitor builds: a GICv3, a PL011 UART and a PL031 RTC below 1 GiB,
virtio-mmio above them, RAM from 2 GiB, Linux entered with its device tree in x0."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from smolvmm.arch.arm64 import layout, regs, state
from smolvmm.arch.interface import AdmittedVcpu, BootEntry, HostOffer, PlatformDevice
from smolvmm.host.memory import GuestMemory


@dataclass(frozen=True)
class Arm64:
    """arm64 for the monitor (``smolvmm.arch.interface.Arch``)."""

    name: str = "arm64"
    platform_devices: tuple[PlatformDevice, ...] = (
        PlatformDevice("pl011", "mmio", layout.UART_BASE, layout.MMIO_SLOT_SIZE, layout.UART_SPI),
        PlatformDevice("pl031", "mmio", layout.RTC_BASE, layout.MMIO_SLOT_SIZE, layout.RTC_SPI),
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
        """The Image at the start of RAM, the initrd and the device tree at its top; the boot
        vCPU enters the Image with the device tree's address in x0 (secondaries wait for PSCI)."""
        from smolvmm.arch.arm64 import boot, fdt  # a cold boot's alone: a restore does without
        from smolvmm.arch.arm64.image import parse_image

        machine = layout.layout(vcpus, sum(region.size for region in memory.regions), virtio_count)
        header = parse_image(kernel)
        initrd = initrd or b""
        plan = boot.plan_boot(machine, header, len(initrd))
        mpidrs = [regs.kvm_mpidr(index) for index in range(vcpus)]
        placed = fdt.Initrd(plan.initrd, len(initrd)) if initrd else None
        boot.load_linux(memory, plan, kernel, initrd, fdt.machine_fdt(machine, mpidrs, cmdline, placed))
        return BootEntry(plan.kernel, plan.dtb)

    def admit_vcpu_state(self, record: Mapping[str, Any], offer: HostOffer, *, strict: bool) -> AdmittedVcpu:
        return state.admit_vcpu(record, offer, strict=strict)

    def admit_vm_state(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return state.admit_vm(record)


ARCH = Arm64()
