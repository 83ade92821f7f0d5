"""A KVM VM file descriptor: memory slots, in-kernel irqchip and PIT, irqfd/ioeventfd, the VM state ioctls."""

from __future__ import annotations

import os

from smolvmm.hypervisor.kvm.bindings import ffi
from smolvmm.hypervisor.kvm.ioctls import (
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_PIT_SPEAKER_DUMMY,
    Ioctl,
)
from smolvmm.hypervisor.kvm.state_io import get_struct, set_struct
from smolvmm.hypervisor.kvm.system import Kvm, ioctl
from smolvmm.hypervisor.kvm.vcpu import KvmVcpu

KVM_IOEVENTFD_FLAG_DEASSIGN = 4
KVM_IRQFD_FLAG_DEASSIGN = 1
KVM_MEM_LOG_DIRTY_PAGES = 1
PAGE_SIZE = 4096


class KvmVm:
    """One VM of ``kvm``: owns its fd until close()."""

    def __init__(self, fd: int, kvm: Kvm) -> None:
        self.fd = fd
        self._kvm = kvm
        self._vcpu_mmap_size = kvm.vcpu_mmap_size()

    def map_memory(self, slot: int, gpa: int, size: int, host_address: int, *, log_dirty: bool = False) -> None:
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0,
                "guest_phys_addr": gpa,
                "memory_size": size,
                "userspace_addr": host_address,
            },
        )
        ioctl(self.fd, Ioctl.KVM_SET_USER_MEMORY_REGION, region)

    def dirty_pages(self, slot: int, size: int) -> bytes:
        """KVM_GET_DIRTY_LOG: one bit per page of the slot, set if written since the last call."""
        pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
        bitmap = ffi.new("uint64_t[]", (pages + 63) // 64)
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot, "dirty_bitmap": int(ffi.cast("uintptr_t", bitmap))})
        ioctl(self.fd, Ioctl.KVM_GET_DIRTY_LOG, log)
        return bytes(ffi.buffer(bitmap))[: (pages + 7) // 8]

    def set_tss_address(self, address: int) -> None:
        ioctl(self.fd, Ioctl.KVM_SET_TSS_ADDR, address)

    def set_identity_map_address(self, address: int) -> None:
        ioctl(self.fd, Ioctl.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", address))

    def create_irqchip(self) -> None:
        ioctl(self.fd, Ioctl.KVM_CREATE_IRQCHIP)

    def create_pit(self) -> None:
        ioctl(self.fd, Ioctl.KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *", {"flags": KVM_PIT_SPEAKER_DUMMY}))

    def irq_line(self, gsi: int, level: int) -> None:
        ioctl(self.fd, Ioctl.KVM_IRQ_LINE, ffi.new("struct kvm_irq_level *", {"irq": gsi, "level": level}))

    def irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False) -> None:
        """Writes to ``eventfd`` pulse ``gsi`` in the in-kernel irqchip."""
        flags = KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        ioctl(self.fd, Ioctl.KVM_IRQFD, ffi.new("struct kvm_irqfd *", {"fd": eventfd, "gsi": gsi, "flags": flags}))

    def ioeventfd(
        self, eventfd: int, address: int, length: int, datamatch: int | None, *, deassign: bool = False
    ) -> None:
        """Guest MMIO writes to ``address`` signal ``eventfd`` in the kernel instead of exiting."""
        flags = (KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0) | (
            KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0
        )
        request = ffi.new(
            "struct kvm_ioeventfd *",
            {"datamatch": datamatch or 0, "addr": address, "len": length, "fd": eventfd, "flags": flags},
        )
        ioctl(self.fd, Ioctl.KVM_IOEVENTFD, request)

    def get_irqchip(self, chip_id: int) -> bytes:
        """The 512-byte state of one in-kernel interrupt controller (PIC master/slave, IOAPIC)."""
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        ioctl(self.fd, Ioctl.KVM_GET_IRQCHIP, chip)
        return bytes(ffi.buffer(chip.chip))

    def set_irqchip(self, chip_id: int, state: bytes) -> None:
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        ffi.buffer(chip.chip)[:] = state
        ioctl(self.fd, Ioctl.KVM_SET_IRQCHIP, chip)

    def get_pit(self) -> bytes:
        return get_struct(self.fd, Ioctl.KVM_GET_PIT2, "struct kvm_pit_state2")

    def set_pit(self, state: bytes) -> None:
        set_struct(self.fd, Ioctl.KVM_SET_PIT2, "struct kvm_pit_state2", state)

    def get_clock(self) -> bytes:
        return get_struct(self.fd, Ioctl.KVM_GET_CLOCK, "struct kvm_clock_data")

    def set_clock(self, state: bytes) -> None:
        set_struct(self.fd, Ioctl.KVM_SET_CLOCK, "struct kvm_clock_data", state)

    def create_vcpu(self, index: int) -> KvmVcpu:
        return KvmVcpu(ioctl(self.fd, Ioctl.KVM_CREATE_VCPU, index), index, self._vcpu_mmap_size, self._kvm)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
