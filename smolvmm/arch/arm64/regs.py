"""The arm64 vCPU register set as KVM one-reg ids (KVM_GET_ONE_REG / KVM_SET_ONE_REG).

An id is ``KVM_REG_ARM64 | size | group | index`` (include/uapi/linux/kvm.h and
arch/arm64/include/uapi/asm/kvm.h):

- core registers (group 0x10): the index is the register's byte offset in
  ``struct kvm_regs`` divided by 4;
- system registers (group 0x13): the index is the instruction encoding
  op0:op1:CRn:CRm:op2 packed into bits 15..0;
- firmware pseudo-registers (group 0x14): KVM's PSCI version and SMCCC workaround levels.

The tests check every id here against the kernel's uapi headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

KVM_REG_ARM64 = 0x6000_0000_0000_0000
KVM_REG_SIZE_SHIFT = 52
KVM_REG_SIZE_U32 = 2 << KVM_REG_SIZE_SHIFT
KVM_REG_SIZE_U64 = 3 << KVM_REG_SIZE_SHIFT
KVM_REG_SIZE_U128 = 4 << KVM_REG_SIZE_SHIFT
KVM_REG_ARM_CORE = 0x0010 << 16
KVM_REG_ARM64_SYSREG = 0x0013 << 16
KVM_REG_ARM_FW = 0x0014 << 16


@dataclass(frozen=True)
class OneReg:
    """One register as KVM names it: the architectural name and its one-reg id."""

    name: str
    id: int

    @property
    def size(self) -> int:
        """Width of the register's value in bytes (the id's size field)."""
        return 1 << ((self.id >> KVM_REG_SIZE_SHIFT) & 0xF)


# Byte offsets in struct kvm_regs: struct user_pt_regs {regs[31], sp, pc, pstate} (sp is SP_EL0),
# then sp_el1, elr_el1, spsr[5], then struct user_fpsimd_state {vregs[32] (128-bit), fpsr, fpcr},
# which is 16-byte aligned because of its __uint128_t members.
_USER_PT_REGS_SIZE = 34 * 8
_SP_EL1 = _USER_PT_REGS_SIZE
_SPSR = _SP_EL1 + 2 * 8
KVM_NR_SPSR = 5
_FP_REGS = (_SPSR + KVM_NR_SPSR * 8 + 15) & ~15
_FPSR = _FP_REGS + 32 * 16


def _core(name: str, offset: int, size: int = KVM_REG_SIZE_U64) -> OneReg:
    return OneReg(name, KVM_REG_ARM64 | size | KVM_REG_ARM_CORE | offset // 4)


CORE_REGISTERS: tuple[OneReg, ...] = (
    *(_core(f"x{n}", n * 8) for n in range(31)),
    _core("sp", 31 * 8),
    _core("pc", 32 * 8),
    _core("pstate", 33 * 8),
    _core("sp_el1", _SP_EL1),
    _core("elr_el1", _SP_EL1 + 8),
    *(_core(f"spsr[{n}]", _SPSR + n * 8) for n in range(KVM_NR_SPSR)),
    *(_core(f"v{n}", _FP_REGS + n * 16, KVM_REG_SIZE_U128) for n in range(32)),
    _core("fpsr", _FPSR, KVM_REG_SIZE_U32),
    _core("fpcr", _FPSR + 4, KVM_REG_SIZE_U32),
)
"""Every core register, in struct kvm_regs order. ``sp`` is SP_EL0; ``spsr[0]`` is SPSR_EL1
(the other four are the AArch32 banked SPSRs: abt, und, irq, fiq)."""

CORE = {reg.name: reg for reg in CORE_REGISTERS}


def sysreg_encoding(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """The 16-bit op0:op1:CRn:CRm:op2 field shared by sysreg one-reg ids and VGIC ICC attrs."""
    for value, bits in ((op0, 2), (op1, 3), (crn, 4), (crm, 4), (op2, 3)):
        if not 0 <= value < 1 << bits:
            raise ValueError(f"system register field {value} does not fit in {bits} bits")
    return op0 << 14 | op1 << 11 | crn << 7 | crm << 3 | op2


def sysreg(name: str, op0: int, op1: int, crn: int, crm: int, op2: int) -> OneReg:
    """A 64-bit system register's one-reg id from its instruction encoding."""
    return OneReg(
        name,
        KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG | sysreg_encoding(op0, op1, crn, crm, op2),
    )


SYSTEM_REGISTERS: tuple[OneReg, ...] = (
    sysreg("MPIDR_EL1", 3, 0, 0, 0, 5),
    sysreg("SCTLR_EL1", 3, 0, 1, 0, 0),
    sysreg("CPACR_EL1", 3, 0, 1, 0, 2),
    sysreg("TTBR0_EL1", 3, 0, 2, 0, 0),
    sysreg("TTBR1_EL1", 3, 0, 2, 0, 1),
    sysreg("TCR_EL1", 3, 0, 2, 0, 2),
    sysreg("AFSR0_EL1", 3, 0, 5, 1, 0),
    sysreg("AFSR1_EL1", 3, 0, 5, 1, 1),
    sysreg("ESR_EL1", 3, 0, 5, 2, 0),
    sysreg("FAR_EL1", 3, 0, 6, 0, 0),
    sysreg("PAR_EL1", 3, 0, 7, 4, 0),
    sysreg("MAIR_EL1", 3, 0, 10, 2, 0),
    sysreg("AMAIR_EL1", 3, 0, 10, 3, 0),
    sysreg("VBAR_EL1", 3, 0, 12, 0, 0),
    sysreg("CONTEXTIDR_EL1", 3, 0, 13, 0, 1),
    sysreg("TPIDR_EL1", 3, 0, 13, 0, 4),
    sysreg("CNTKCTL_EL1", 3, 0, 14, 1, 0),
    sysreg("CSSELR_EL1", 3, 2, 0, 0, 0),
    sysreg("TPIDR_EL0", 3, 3, 13, 0, 2),
    sysreg("TPIDRRO_EL0", 3, 3, 13, 0, 3),
    sysreg("MDSCR_EL1", 2, 0, 0, 2, 2),
)
"""The EL1/EL0 system registers a snapshot saves, beyond the core set.

SP_EL0, SP_EL1, ELR_EL1 and SPSR_EL1 are not here: KVM exposes them as core registers
(``sp``, ``sp_el1``, ``elr_el1``, ``spsr[0]``). MPIDR_EL1 is read-only to the guest but
userspace may set it; it is restored first because the VGIC redistributor and ICC
attributes address a vCPU by its MPIDR. Timer registers live in ``timer.py``.
"""

SYSTEM = {reg.name: reg for reg in SYSTEM_REGISTERS}


def _firmware(name: str, index: int) -> OneReg:
    return OneReg(name, KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW | index)


FIRMWARE_REGISTERS: tuple[OneReg, ...] = (
    _firmware("PSCI_VERSION", 0),
    _firmware("SMCCC_ARCH_WORKAROUND_1", 1),
    _firmware("SMCCC_ARCH_WORKAROUND_2", 2),
    _firmware("SMCCC_ARCH_WORKAROUND_3", 3),
)
"""KVM's firmware pseudo-registers: restoring them on a host that cannot honour the saved
PSCI version or mitigation level fails, which is how an incompatible host is detected."""


def kvm_mpidr(vcpu_index: int) -> int:
    """MPIDR_EL1 as KVM resets it for vCPU ``vcpu_index`` (arch/arm64/kvm/sys_regs.c).

    Aff0 holds only 4 bits so that GICv3 SGIs (ICC_SGI1R_EL1 target lists of 16) reach every
    vCPU directly; bit 31 is RES1.
    """
    if not 0 <= vcpu_index < 1 << 20:
        raise ValueError(f"vCPU index {vcpu_index} is out of range")
    return 1 << 31 | (vcpu_index >> 12 & 0xFF) << 16 | (vcpu_index >> 4 & 0xFF) << 8 | vcpu_index & 0xF


class MpState(IntEnum):
    """The KVM_GET/SET_MP_STATE values an arm64 vCPU can be in."""

    RUNNABLE = 0
    STOPPED = 5  # powered off: a secondary before PSCI CPU_ON, or after CPU_OFF
    SUSPENDED = 10  # in a WFI-like PSCI suspend (KVM_CAP_ARM_SYSTEM_SUSPEND)


class VcpuFeature(IntEnum):
    """Bit numbers in kvm_vcpu_init.features[0] that smolvmm sets."""

    POWER_OFF = 0  # secondaries start off and wait for PSCI CPU_ON
    PSCI_0_2 = 2
