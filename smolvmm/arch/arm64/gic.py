"""What a snapshot saves of KVM's in-kernel GICv3 (vGICv3), as KVM device attributes.

The VGIC is a KVM device (KVM_CREATE_DEVICE, type KVM_DEV_TYPE_ARM_VGIC_V3); its state is read
and written with KVM_GET/SET_DEVICE_ATTR, one 32-bit register per attribute
(Documentation/virt/kvm/devices/arm-vgic-v3.rst):

- distributor registers: group DIST_REGS, attr = offset in the GICD frame;
- redistributor registers: group REDIST_REGS, attr = mpidr << 32 | offset from the vCPU's RD_base
  (the SGI_base frame follows at +64 KiB);
- CPU interface (ICC_*_EL1) registers: group CPU_SYSREGS, attr = mpidr << 32 | op0:op1:CRn:CRm:op2;
- line levels of level-triggered SPIs: group LEVEL_INFO, attr = mpidr << 32 | 0 << 10 | INTID.

``mpidr`` in an attribute is the vCPU's affinity packed as Aff3.Aff2.Aff1.Aff0, one byte each,
not the raw MPIDR_EL1 layout (whose Aff3 sits at bits 39..32). 64-bit registers (GICD_IROUTER)
are two 32-bit attributes, low word first. Lists here are in restore order.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from smolvmm.arch.arm64.regs import sysreg_encoding

DEVICE_TYPE_VGIC_V3 = 7  # enum kvm_device_type: KVM_DEV_TYPE_ARM_VGIC_V3

FIRST_SPI = 32  # INTIDs 0..15 are SGIs, 16..31 PPIs (banked per vCPU in its redistributor)
NR_IRQS_MAX = 1024  # KVM's limit for Group.NR_IRQS (INTIDs 1020..1023 are special anyway)


class Group(IntEnum):
    """KVM_DEV_ARM_VGIC_GRP_* attribute groups."""

    ADDR = 0
    DIST_REGS = 1
    NR_IRQS = 3
    CTRL = 4
    REDIST_REGS = 5
    CPU_SYSREGS = 6
    LEVEL_INFO = 7


class AddrType(IntEnum):
    """Attributes of Group.ADDR: where the guest sees each frame."""

    DIST = 2
    REDIST = 3


CTRL_INIT = 0  # Group.CTRL attribute: finish VGIC setup once every vCPU exists
MPIDR_SHIFT = 32
LEVEL_INFO_SHIFT = 10
LINE_LEVEL = 0  # VGIC_LEVEL_INFO_LINE_LEVEL

DIST_SIZE = 0x1_0000
REDIST_SIZE = 0x2_0000  # per vCPU: RD_base and SGI_base, 64 KiB each
_SGI_BASE = 0x1_0000


@dataclass(frozen=True)
class GicRegister:
    """A GIC MMIO register, or an array of them indexed by INTID (``bits_per_irq`` > 0)."""

    name: str
    offset: int
    bits_per_irq: int = 0
    clear_offset: int | None = None  # write-1-to-clear twin of a write-1-to-set register

    def words(self, first_irq: int, end_irq: int) -> list[tuple[str, int, int | None]]:
        """(name, offset, clear offset) of each 32-bit word covering INTIDs first_irq..end_irq-1."""
        if not self.bits_per_irq:
            return [(self.name, self.offset, self.clear_offset)]
        first, end = first_irq * self.bits_per_irq // 32, end_irq * self.bits_per_irq // 32
        return [
            (
                f"{self.name}[{n}]",
                self.offset + 4 * n,
                None if self.clear_offset is None else self.clear_offset + 4 * n,
            )
            for n in range(first, end)
        ]


# Restore order follows what KVM needs: IIDR first (its revision decides whether IGROUPR is
# writable), configuration (group, edge/level, priority, routing) before pending and active
# state, since the pending latch of an interrupt depends on its trigger type; enables last.
DISTRIBUTOR_REGISTERS: tuple[GicRegister, ...] = (
    GicRegister("GICD_IIDR", 0x0008),
    GicRegister("GICD_CTLR", 0x0000),
    GicRegister("GICD_IGROUPR", 0x0080, 1),
    GicRegister("GICD_ICFGR", 0x0C00, 2),
    GicRegister("GICD_IPRIORITYR", 0x0400, 8),
    GicRegister("GICD_IROUTER", 0x6000, 64),
    GicRegister("GICD_ISPENDR", 0x0200, 1, clear_offset=0x0280),
    GicRegister("GICD_ISACTIVER", 0x0300, 1, clear_offset=0x0380),
    GicRegister("GICD_ISENABLER", 0x0100, 1, clear_offset=0x0180),
)
"""Saved for the SPIs only: the SGI/PPI words of these arrays are RAZ/WI with affinity routing."""

REDISTRIBUTOR_REGISTERS: tuple[GicRegister, ...] = (
    GicRegister("GICR_CTLR", 0x0000),
    GicRegister("GICR_IGROUPR0", _SGI_BASE + 0x0080, 1),
    GicRegister("GICR_ICFGR", _SGI_BASE + 0x0C00, 2),
    GicRegister("GICR_IPRIORITYR", _SGI_BASE + 0x0400, 8),
    GicRegister("GICR_ISPENDR0", _SGI_BASE + 0x0200, 1, clear_offset=_SGI_BASE + 0x0280),
    GicRegister("GICR_ISACTIVER0", _SGI_BASE + 0x0300, 1, clear_offset=_SGI_BASE + 0x0380),
    GicRegister("GICR_ISENABLER0", _SGI_BASE + 0x0100, 1, clear_offset=_SGI_BASE + 0x0180),
)
"""Per vCPU, for its SGIs and PPIs (INTIDs 0..31). No LPI registers: there is no ITS."""


@dataclass(frozen=True)
class VgicAttr:
    """One KVM device attribute holding a 32-bit (ICC: 64-bit) register of VGIC state."""

    name: str
    group: Group
    attr: int
    clear_attr: int | None = None  # restore writes all-ones here before writing the value


def mpidr_field(mpidr: int) -> int:
    """The attr's affinity field for a vCPU whose MPIDR_EL1 is ``mpidr``."""
    aff3 = mpidr >> 32 & 0xFF
    return aff3 << 24 | mpidr & 0xFF_FFFF


def check_irq_count(nr_irqs: int) -> None:
    """KVM_DEV_ARM_VGIC_GRP_NR_IRQS takes a multiple of 32 covering at least one SPI word."""
    if nr_irqs % 32 or not FIRST_SPI < nr_irqs <= NR_IRQS_MAX:
        raise ValueError(f"GIC interrupt count {nr_irqs} is not a multiple of 32 in 64..1024")


def distributor_attrs(nr_irqs: int) -> list[VgicAttr]:
    """The distributor's saved registers for a VGIC with ``nr_irqs`` interrupts."""
    check_irq_count(nr_irqs)
    return [
        VgicAttr(name, Group.DIST_REGS, offset, clear)
        for reg in DISTRIBUTOR_REGISTERS
        for name, offset, clear in reg.words(FIRST_SPI, nr_irqs)
    ]


def redistributor_attrs(mpidr: int) -> list[VgicAttr]:
    """The saved registers of the redistributor of the vCPU whose MPIDR_EL1 is ``mpidr``."""
    cpu = mpidr_field(mpidr) << MPIDR_SHIFT
    return [
        VgicAttr(name, Group.REDIST_REGS, cpu | offset, None if clear is None else cpu | clear)
        for reg in REDISTRIBUTOR_REGISTERS
        for name, offset, clear in reg.words(0, FIRST_SPI)
    ]


def line_level_attrs(nr_irqs: int) -> list[VgicAttr]:
    """Line levels of the SPIs, 32 INTIDs per attribute (the mpidr field is unused for SPIs)."""
    check_irq_count(nr_irqs)
    return [
        VgicAttr(f"LINE_LEVEL[{intid}]", Group.LEVEL_INFO, LINE_LEVEL << LEVEL_INFO_SHIFT | intid)
        for intid in range(FIRST_SPI, nr_irqs, 32)
    ]


ICC_CTLR_EL1 = ("ICC_CTLR_EL1", sysreg_encoding(3, 0, 12, 12, 4))
_ICC_REGISTERS = (
    ("ICC_SRE_EL1", sysreg_encoding(3, 0, 12, 12, 5)),
    ICC_CTLR_EL1,
    ("ICC_PMR_EL1", sysreg_encoding(3, 0, 4, 6, 0)),
    ("ICC_BPR0_EL1", sysreg_encoding(3, 0, 12, 8, 3)),
    ("ICC_BPR1_EL1", sysreg_encoding(3, 0, 12, 12, 3)),
    ("ICC_IGRPEN0_EL1", sysreg_encoding(3, 0, 12, 12, 6)),
    ("ICC_IGRPEN1_EL1", sysreg_encoding(3, 0, 12, 12, 7)),
)
ICC_CTLR_PRIBITS_SHIFT = 8


def active_priority_count(icc_ctlr: int) -> int:
    """How many ICC_AP0Rn/AP1Rn registers exist: 1, 2 or 4 for 5, 6 or 7 priority bits."""
    priority_bits = (icc_ctlr >> ICC_CTLR_PRIBITS_SHIFT & 0x7) + 1
    if priority_bits < 5:
        raise ValueError(f"ICC_CTLR_EL1 {icc_ctlr:#x} reports {priority_bits} priority bits; GICv3 has 5..8")
    return {5: 1, 6: 2}.get(priority_bits, 4)


def cpu_interface_attrs(mpidr: int, icc_ctlr: int) -> list[VgicAttr]:
    """The vCPU's saved ICC_*_EL1 registers, in restore order.

    ``icc_ctlr`` is that vCPU's ICC_CTLR_EL1 (read first): it says how many active-priority
    registers the CPU interface implements. SRE and CTLR are restored first because KVM checks
    every later value against them.
    """
    cpu = mpidr_field(mpidr) << MPIDR_SHIFT
    count = active_priority_count(icc_ctlr)
    registers = [
        *_ICC_REGISTERS,
        *((f"ICC_AP0R{n}_EL1", sysreg_encoding(3, 0, 12, 8, 4 + n)) for n in range(count)),
        *((f"ICC_AP1R{n}_EL1", sysreg_encoding(3, 0, 12, 9, n)) for n in range(count)),
    ]
    return [VgicAttr(name, Group.CPU_SYSREGS, cpu | encoding) for name, encoding in registers]
