"""A KVM VM file descriptor: memory slots, in-kernel irqchip and PIT, irqfd/ioeventfd, VM-wide state."""

from __future__ import annotations

import os

from .bindings import ffi
from .ioctls import (
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_PIT_SPEAKER_DUMMY,
    Ioctl,
)
from .system import ioctl

KVM_IOEVENTFD_FLAG_DEASSIGN = 4
KVM_IRQFD_FLAG_DEASSIGN = 1


def get_struct(fd: int, request: Ioctl, ctype: str, **init: int) -> bytes:
    """Issue a GET ioctl into a fresh ``ctype`` and return its bytes."""
    obj = ffi.new(f"{ctype} *", init or None)
    ioctl(fd, request, obj)
    return bytes(ffi.buffer(obj))


def set_struct(fd: int, request: Ioctl, ctype: str, data: bytes) -> None:
    """Issue a SET ioctl with ``data`` laid out as ``ctype``."""
    obj = ffi.new(f"{ctype} *")
    if len(data) != ffi.sizeof(obj[0]):
        raise ValueError(f"{ctype} needs {ffi.sizeof(obj[0])} bytes, got {len(data)}")
    ffi.buffer(obj)[:] = data
    ioctl(fd, request, obj)


class KvmVm:
    """One VM: owns its fd until close()."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def set_memory_region(self, slot: int, gpa: int, size: int, host_address: int, flags: int = 0) -> None:
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {"slot": slot, "flags": flags, "guest_phys_addr": gpa, "memory_size": size, "userspace_addr": host_address},
        )
        ioctl(self.fd, Ioctl.KVM_SET_USER_MEMORY_REGION, region)

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

    def ioeventfd(self, eventfd: int, address: int, length: int, datamatch: int | None, *, deassign: bool = False) -> None:
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

    def create_vcpu(self, vcpu_id: int) -> int:
        return ioctl(self.fd, Ioctl.KVM_CREATE_VCPU, vcpu_id)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
