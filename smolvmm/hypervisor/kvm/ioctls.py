"""KVM ioctl request numbers and constants, computed as ``<linux/kvm.h>`` computes them."""

from __future__ import annotations

import enum

from smolvmm.hypervisor.kvm.bindings import ffi

_KVMIO = 0xAE
_WRITE, _READ = 1, 2


def _ioc(direction: int, nr: int, struct: str | None) -> int:
    size = ffi.sizeof(struct) if struct else 0
    return (direction << 30) | (size << 16) | (_KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, None)


def _ior(nr: int, struct: str) -> int:
    return _ioc(_READ, nr, struct)


def _iow(nr: int, struct: str) -> int:
    return _ioc(_WRITE, nr, struct)


def _iowr(nr: int, struct: str) -> int:
    return _ioc(_READ | _WRITE, nr, struct)


class Ioctl(enum.IntEnum):
    """Every ioctl the backend issues; the name is what errors report."""

    KVM_GET_API_VERSION = _io(0x00)
    KVM_CREATE_VM = _io(0x01)
    KVM_GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
    KVM_CHECK_EXTENSION = _io(0x03)
    KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
    KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")
    KVM_CREATE_VCPU = _io(0x41)
    KVM_GET_DIRTY_LOG = _iow(0x42, "struct kvm_dirty_log")
    KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
    KVM_SET_TSS_ADDR = _io(0x47)
    KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "uint64_t")
    KVM_CREATE_IRQCHIP = _io(0x60)
    KVM_IRQ_LINE = _iow(0x61, "struct kvm_irq_level")
    KVM_GET_IRQCHIP = _iowr(0x62, "struct kvm_irqchip")
    KVM_SET_IRQCHIP = _ior(0x63, "struct kvm_irqchip")
    KVM_IRQFD = _iow(0x76, "struct kvm_irqfd")
    KVM_CREATE_PIT2 = _iow(0x77, "struct kvm_pit_config")
    KVM_IOEVENTFD = _iow(0x79, "struct kvm_ioeventfd")
    KVM_SET_CLOCK = _iow(0x7B, "struct kvm_clock_data")
    KVM_GET_CLOCK = _ior(0x7C, "struct kvm_clock_data")
    KVM_RUN = _io(0x80)
    KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
    KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
    KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
    KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
    KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
    KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
    KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
    KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
    KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
    KVM_SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
    KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
    KVM_GET_CPUID2 = _iowr(0x91, "struct kvm_cpuid2")
    KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
    KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
    KVM_GET_PIT2 = _ior(0x9F, "struct kvm_pit_state2")
    KVM_SET_PIT2 = _iow(0xA0, "struct kvm_pit_state2")
    KVM_GET_VCPU_EVENTS = _ior(0x9F, "struct kvm_vcpu_events")
    KVM_SET_VCPU_EVENTS = _iow(0xA0, "struct kvm_vcpu_events")
    KVM_GET_DEBUGREGS = _ior(0xA1, "struct kvm_debugregs")
    KVM_SET_DEBUGREGS = _iow(0xA2, "struct kvm_debugregs")
    KVM_SET_TSC_KHZ = _io(0xA2)
    KVM_GET_TSC_KHZ = _io(0xA3)
    KVM_ENABLE_CAP = _iow(0xA3, "struct kvm_enable_cap")
    KVM_GET_XSAVE = _ior(0xA4, "struct kvm_xsave")
    KVM_SET_XSAVE = _iow(0xA5, "struct kvm_xsave")
    KVM_GET_XCRS = _ior(0xA6, "struct kvm_xcrs")
    KVM_SET_XCRS = _iow(0xA7, "struct kvm_xcrs")
    KVM_KVMCLOCK_CTRL = _io(0xAD)
    KVM_GET_XSAVE2 = _ior(0xCF, "struct kvm_xsave")


class Cap(enum.IntEnum):
    """KVM_CHECK_EXTENSION capability numbers the backend asks about."""

    KVM_CAP_IRQCHIP = 0
    KVM_CAP_USER_MEMORY = 3
    KVM_CAP_SET_TSS_ADDR = 4
    KVM_CAP_EXT_CPUID = 7
    KVM_CAP_NR_VCPUS = 9
    KVM_CAP_PIT2 = 33
    KVM_CAP_IRQFD = 32
    KVM_CAP_IOEVENTFD = 36
    KVM_CAP_ADJUST_CLOCK = 39
    KVM_CAP_VCPU_EVENTS = 41
    KVM_CAP_PIT_STATE2 = 35
    KVM_CAP_DEBUGREGS = 50
    KVM_CAP_XSAVE = 55
    KVM_CAP_XCRS = 56
    KVM_CAP_TSC_CONTROL = 60
    KVM_CAP_GET_TSC_KHZ = 61
    KVM_CAP_MAX_VCPUS = 66
    KVM_CAP_TSC_DEADLINE_TIMER = 72
    KVM_CAP_IMMEDIATE_EXIT = 136
    KVM_CAP_XSAVE2 = 208


class Exit(enum.IntEnum):
    """kvm_run.exit_reason values."""

    KVM_EXIT_UNKNOWN = 0
    KVM_EXIT_EXCEPTION = 1
    KVM_EXIT_IO = 2
    KVM_EXIT_HYPERCALL = 3
    KVM_EXIT_DEBUG = 4
    KVM_EXIT_HLT = 5
    KVM_EXIT_MMIO = 6
    KVM_EXIT_IRQ_WINDOW_OPEN = 7
    KVM_EXIT_SHUTDOWN = 8
    KVM_EXIT_FAIL_ENTRY = 9
    KVM_EXIT_INTR = 10
    KVM_EXIT_SET_TPR = 11
    KVM_EXIT_TPR_ACCESS = 12
    KVM_EXIT_NMI = 16
    KVM_EXIT_INTERNAL_ERROR = 17
    KVM_EXIT_SYSTEM_EVENT = 24


KVM_API_VERSION = 12
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_PIT_SPEAKER_DUMMY = 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MAX_CPUID_ENTRIES = 256
KVM_CLOCK_TSC_STABLE = 2
