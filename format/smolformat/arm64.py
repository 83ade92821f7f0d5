"""arm64 KVM state: core registers in the layout of arm64 ``struct kvm_regs``, the rest as lists.

System registers are KVM one-reg ``(id, value)`` pairs (KVM_GET_ONE_REG ids); the vGICv3 state is
``(offset, value)`` lists as read through the KVM_DEV_ARM_VGIC_GRP_* device attributes.
``VcpuState`` and ``VmState`` are the payloads of the VCPU_STATE and VM_STATE sections.
"""

from __future__ import annotations

from construct import Array, Bytes, Default, Int8ul, Int32ul, Int64ul, Struct

from .limits import bounded
from .packed import Packed, PackedArray

MAX_ONE_REGS = 4096
MAX_GIC_REGS = 1 << 16
MAX_TIMERS = 8

UserPtRegs = Packed(
    Struct(
        "regs" / Array(31, Int64ul),
        "sp" / Int64ul,
        "pc" / Int64ul,
        "pstate" / Int64ul,
    )
)

# vregs are __uint128_t, kept as 16 little-endian bytes each; the struct is 16-byte aligned.
UserFpsimdState = Packed(
    Struct(
        "vregs" / Array(32, Bytes(16)),
        "fpsr" / Int32ul,
        "fpcr" / Int32ul,
        "reserved" / Array(2, Int32ul),
    )
)

KvmRegs = Packed(
    Struct(
        "regs" / UserPtRegs,
        "sp_el1" / Int64ul,
        "elr_el1" / Int64ul,
        "spsr" / Array(5, Int64ul),
        "padding" / Bytes(8),
        "fp_regs" / UserFpsimdState,
    )
)

OneReg = Packed(Struct("id" / Int64ul, "value" / Int64ul))

GicReg = Packed(Struct("offset" / Int32ul, "value" / Int64ul))

TIMER_VIRTUAL = 0
TIMER_PHYSICAL = 1
ArchTimer = Packed(Struct("timer" / Int8ul, "cntvoff" / Int64ul, "ctl" / Int64ul, "cval" / Int64ul))

VcpuState = Struct(
    "mp_state" / Int32ul,
    "core" / KvmRegs,
    "sys_regs" / PackedArray(bounded(Int32ul, MAX_ONE_REGS), OneReg),
    "timers" / PackedArray(bounded(Int8ul, MAX_TIMERS), ArchTimer),
    "gic_redistributor" / PackedArray(bounded(Int32ul, MAX_GIC_REGS), GicReg),
    "gic_cpu_sysregs" / PackedArray(bounded(Int32ul, MAX_ONE_REGS), OneReg),
)

VmState = Struct(
    "gic_nr_irqs" / Int32ul,
    "gic_distributor" / PackedArray(bounded(Int32ul, MAX_GIC_REGS), GicReg),
    # SPI line levels (KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO): offset = first INTID, value = 32-bit bitmap
    "gic_line_levels" / Default(PackedArray(bounded(Int32ul, MAX_GIC_REGS), GicReg), []),
)
