"""x86_64 KVM state, declared byte for byte in the layout of ``<linux/kvm.h>``/``<asm/kvm.h>``.

Field names follow the header; padding is explicit. A monitor converts with
``KvmRegs.parse(bytes(ffi.buffer(regs)))`` and ``ffi.buffer(regs)[:] = KvmRegs.build(value)``.
``VcpuState`` and ``VmState`` are the payloads of the VCPU_STATE and VM_STATE sections.
"""

from __future__ import annotations

from construct import (
    Array,
    Bytes,
    Construct,
    GreedyBytes,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64sl,
    Int64ul,
    Prefixed,
    Struct,
)

from .limits import bounded
from .packed import Packed, PackedArray

KVM_NR_INTERRUPTS = 256
KVM_MAX_XCRS = 16
KVM_APIC_REG_SIZE = 0x400
KVM_IOAPIC_NUM_PINS = 24
# KVM_GET_XSAVE2 reports its size via KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2); AMX makes it ~11 KiB.
MAX_XSAVE_SIZE = 1 << 20
MAX_CPUID_ENTRIES = 256
MAX_MSRS = 4096


def _u64s(*names: str) -> list[Construct]:
    return [name / Int64ul for name in names]


def _u8s(*names: str) -> list[Construct]:
    return [name / Int8ul for name in names]


KvmRegs = Packed(
    Struct(
        *_u64s("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"),
        *_u64s("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"),
    )
)

KvmSegment = Packed(
    Struct(
        "base" / Int64ul,
        "limit" / Int32ul,
        "selector" / Int16ul,
        *_u8s("type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable", "padding"),
    )
)

KvmDtable = Packed(Struct("base" / Int64ul, "limit" / Int16ul, "padding" / Array(3, Int16ul)))

KvmSregs = Packed(
    Struct(
        *[name / KvmSegment for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")],
        "gdt" / KvmDtable,
        "idt" / KvmDtable,
        *_u64s("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"),
        "interrupt_bitmap" / Array((KVM_NR_INTERRUPTS + 63) // 64, Int64ul),
    )
)

KvmFpu = Packed(
    Struct(
        "fpr" / Array(8, Bytes(16)),
        "fcw" / Int16ul,
        "fsw" / Int16ul,
        "ftwx" / Int8ul,
        "pad1" / Int8ul,
        "last_opcode" / Int16ul,
        "last_ip" / Int64ul,
        "last_dp" / Int64ul,
        "xmm" / Array(16, Bytes(16)),
        "mxcsr" / Int32ul,
        "pad2" / Int32ul,
    )
)

KvmXcr = Packed(Struct("xcr" / Int32ul, "reserved" / Int32ul, "value" / Int64ul))

KvmXcrs = Packed(
    Struct(
        "nr_xcrs" / Int32ul,
        "flags" / Int32ul,
        "xcrs" / Array(KVM_MAX_XCRS, KvmXcr),
        "padding" / Array(16, Int64ul),
    )
)

KvmMsrEntry = Packed(Struct("index" / Int32ul, "reserved" / Int32ul, "data" / Int64ul))

KvmLapicState = Packed(Struct("regs" / Bytes(KVM_APIC_REG_SIZE)))

KvmVcpuEvents = Packed(
    Struct(
        "exception" / Struct(*_u8s("injected", "nr", "has_error_code", "pending"), "error_code" / Int32ul),
        "interrupt" / Struct(*_u8s("injected", "nr", "soft", "shadow")),
        "nmi" / Struct(*_u8s("injected", "pending", "masked", "pad")),
        "sipi_vector" / Int32ul,
        "flags" / Int32ul,
        "smi" / Struct(*_u8s("smm", "pending", "smm_inside_nmi", "latched_init")),
        "triple_fault" / Struct(*_u8s("pending")),
        "reserved" / Bytes(26),
        "exception_has_payload" / Int8ul,
        "exception_payload" / Int64ul,
    )
)

KvmMpState = Packed(Struct("mp_state" / Int32ul))

KvmDebugregs = Packed(
    Struct(
        "db" / Array(4, Int64ul),
        *_u64s("dr6", "dr7", "flags"),
        "reserved" / Array(9, Int64ul),
    )
)

KvmCpuidEntry2 = Packed(
    Struct(
        *[name / Int32ul for name in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")],
        "padding" / Array(3, Int32ul),
    )
)

KvmPicState = Packed(
    Struct(
        *_u8s("last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll"),
        *_u8s("special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi"),
        *_u8s("special_fully_nested_mode", "init4", "elcr", "elcr_mask"),
    )
)

# redirtbl entries are the union's ``bits`` view: the bitfield view is the guest's business.
KvmIoapicState = Packed(
    Struct(
        "base_address" / Int64ul,
        *[name / Int32ul for name in ("ioregsel", "id", "irr", "pad")],
        "redirtbl" / Array(KVM_IOAPIC_NUM_PINS, Int64ul),
    )
)

KvmPitChannelState = Packed(
    Struct(
        "count" / Int32ul,
        "latched_count" / Int16ul,
        *_u8s("count_latched", "status_latched", "status", "read_state", "write_state"),
        *_u8s("write_latch", "rw_mode", "mode", "bcd", "gate"),
        "count_load_time" / Int64sl,
    )
)

KvmPitState2 = Packed(
    Struct(
        "channels" / Array(3, KvmPitChannelState),
        "flags" / Int32ul,
        "reserved" / Array(9, Int32ul),
    )
)

KvmClockData = Packed(
    Struct(
        "clock" / Int64ul,
        "flags" / Int32ul,
        "pad0" / Int32ul,
        "realtime" / Int64ul,
        "host_tsc" / Int64ul,
        "pad" / Array(4, Int32ul),
    )
)

# Ordered as Firecracker saves them; the restore order is the monitor's (see the spec).
VcpuState = Struct(
    "mp_state" / KvmMpState,
    "regs" / KvmRegs,
    "sregs" / KvmSregs,
    "fpu" / KvmFpu,
    "xsave" / Prefixed(bounded(Int32ul, MAX_XSAVE_SIZE), GreedyBytes),
    "xcrs" / KvmXcrs,
    "debugregs" / KvmDebugregs,
    "lapic" / KvmLapicState,
    "tsc_khz" / Int32ul,
    "cpuid" / PackedArray(bounded(Int32ul, MAX_CPUID_ENTRIES), KvmCpuidEntry2),
    "msrs" / PackedArray(bounded(Int32ul, MAX_MSRS), KvmMsrEntry),
    "vcpu_events" / KvmVcpuEvents,
)

VmState = Struct(
    "pic_master" / KvmPicState,
    "pic_slave" / KvmPicState,
    "ioapic" / KvmIoapicState,
    "pit" / KvmPitState2,
    "clock" / KvmClockData,
)
