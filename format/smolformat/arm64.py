"""arm64 KVM state: core registers in the layout of arm64 ``struct kvm_regs``, the rest as lists.

System registers are KVM one-reg ``(id, value)`` pairs (KVM_GET_ONE_REG ids); the vGICv3 state is
lists of registers as read through the KVM_DEV_ARM_VGIC_GRP_* device attributes (see
smolvmm/arch/arm64/gic.py for which, and in which order to restore them).
``VcpuState`` and ``VmState`` are the payloads of the VCPU_STATE and VM_STATE sections.
"""

from __future__ import annotations

from construct import Array, Bytes, Int32ul, Int64ul, PrefixedArray, Struct

from .limits import bounded
from .packed import Packed

MAX_ONE_REGS = 4096
MAX_GIC_REGS = 1 << 16

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

# A VGIC register: ``offset`` is the KVM device attribute without its MPIDR field (a register
# offset for distributor/redistributor registers, the first INTID for line levels).
GicReg = Packed(Struct("offset" / Int32ul, "value" / Int64ul))

# A GIC CPU interface register: ``encoding`` is its sysreg encoding (the attribute's low 16 bits).
GicSysreg = Packed(Struct("encoding" / Int32ul, "value" / Int64ul))

# The EL1 virtual and physical timers. KVM (Linux 6.1) exposes no CNTVOFF register: the virtual
# count stands for it (writing it back makes KVM set CNTVOFF = host counter - count).
ArchTimerState = Packed(
    Struct(
        "virtual_count" / Int64ul,
        "virtual_ctl" / Int64ul,
        "virtual_cval" / Int64ul,
        "physical_ctl" / Int64ul,
        "physical_cval" / Int64ul,
    )
)

VcpuState = Struct(
    "mp_state" / Int32ul,
    "core" / KvmRegs,
    "sys_regs" / PrefixedArray(bounded(Int32ul, MAX_ONE_REGS), OneReg),
    "timer" / ArchTimerState,
    "gic_redistributor" / PrefixedArray(bounded(Int32ul, MAX_GIC_REGS), GicReg),
    "gic_cpu_sysregs" / PrefixedArray(bounded(Int32ul, MAX_ONE_REGS), GicSysreg),
)

VmState = Struct(
    "gic_nr_irqs" / Int32ul,
    "gic_distributor" / PrefixedArray(bounded(Int32ul, MAX_GIC_REGS), GicReg),
    "gic_line_levels" / PrefixedArray(bounded(Int32ul, MAX_GIC_REGS), GicReg),
)
