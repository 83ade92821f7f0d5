"""The architecture's rules for an arm64 snapshot: what a saved vCPU and VM may hold (``admit_vcpu``,
``admit_vm``), and their state as plain data (``VcpuState``, ``VmState``) beside its records in the
bundle format (``smolformat.arm64.VcpuState`` and ``VmState``).

A backend fills these from its hypervisor (KVM: the one-reg ids of ``regs.py`` and ``timer.py``
and the VGIC attributes of ``gic.py``; HVF: docs/hypervisor-hvf.md) and passes ``to_record()``
across the hypervisor interface. ``from_record`` reads a bundle's record back and accepts only
the registers these modules list, so a restore writes nothing it does not know.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from smolformat import arm64 as fmt
from smolvmm.arch.arm64 import gic, regs
from smolvmm.arch.arm64.gic import VgicAttr
from smolvmm.arch.arm64.regs import MpState, OneReg
from smolvmm.arch.arm64.timer import Timer, TimerState
from smolvmm.arch.interface import AdmittedVcpu, HostOffer
from smolvmm.errors import BundleError

RegisterValues = tuple[tuple[OneReg, int], ...]
GicValues = tuple[tuple[VgicAttr, int], ...]

_SYSTEM_AND_FIRMWARE = {reg.id: reg for reg in (*regs.SYSTEM_REGISTERS, *regs.FIRMWARE_REGISTERS)}
_MPIDR = regs.SYSTEM["MPIDR_EL1"]
_FRAME_OFFSET = 0xFFFF_FFFF  # an attribute's low word: the register, without the vCPU's affinity
_INTID = (1 << gic.LEVEL_INFO_SHIFT) - 1
_Known = TypeVar("_Known")


def _values(
    known: Mapping[int, _Known], record: Mapping[str, Any], field: str, key: str, what: str
) -> tuple[tuple[_Known, int], ...]:
    """(register, value) for each entry of ``record[field]``, its register looked up by ``entry[key]``."""
    values = []
    for entry in record[field]:
        if entry[key] not in known:
            raise BundleError(f"{field}: the arm64 {what} {entry[key]:#x} is not one smolvmm saves")
        values.append((known[entry[key]], entry["value"]))
    return tuple(values)


def _core_offset(reg: OneReg) -> int:
    """The register's byte offset in ``struct kvm_regs``: its core one-reg index times 4."""
    return (reg.id & 0xFFFF) * 4


@dataclass(frozen=True)
class VcpuState:
    """One vCPU: its run state, every core register, the saved system and firmware registers,
    both EL1 timers, and its GIC redistributor and CPU interface, each list in restore order."""

    mp_state: MpState
    core: RegisterValues  # every regs.CORE_REGISTERS entry
    sys_regs: RegisterValues  # regs.SYSTEM_REGISTERS (MPIDR_EL1 first) and regs.FIRMWARE_REGISTERS
    timers: tuple[TimerState, ...]  # virtual, then physical
    redistributor: GicValues  # gic.redistributor_attrs(mpidr)
    cpu_interface: GicValues  # gic.cpu_interface_attrs(mpidr, ICC_CTLR_EL1)

    def to_record(self) -> dict[str, Any]:
        """This state as a ``smolformat.arm64.VcpuState`` value."""
        core = bytearray(fmt.KvmRegs.sizeof())
        for reg, value in self.core:
            offset = _core_offset(reg)
            core[offset : offset + reg.size] = value.to_bytes(reg.size, "little")
        return {
            "mp_state": int(self.mp_state),
            "core": fmt.KvmRegs.parse(bytes(core)),
            "sys_regs": [{"id": reg.id, "value": value} for reg, value in self.sys_regs],
            "timers": [{"timer": int(t.timer), "cntvoff": t.count, "ctl": t.ctl, "cval": t.cval} for t in self.timers],
            "gic_redistributor": [
                {"offset": attr.attr & _FRAME_OFFSET, "value": value} for attr, value in self.redistributor
            ],
            "gic_cpu_sysregs": [{"id": attr.attr, "value": value} for attr, value in self.cpu_interface],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> VcpuState:
        """A ``smolformat.arm64.VcpuState`` value as plain data; BundleError names a register
        smolvmm does not save or a value it cannot restore."""
        try:
            return cls._from_record(record)
        except ValueError as exc:  # a value a state check refuses (a timer, the run state): the bundle's fault
            raise BundleError(f"the arm64 vCPU state: {exc}") from None

    @classmethod
    def _from_record(cls, record: Mapping[str, Any]) -> VcpuState:
        core = fmt.KvmRegs.build(record["core"])
        sys_regs = _values(_SYSTEM_AND_FIRMWARE, record, "sys_regs", "id", "system register")
        mpidr = next((value for reg, value in sys_regs if reg == _MPIDR), None)
        if mpidr is None:
            raise BundleError("sys_regs: no MPIDR_EL1, so the vCPU's GIC registers cannot be placed")
        redistributor = {attr.attr & _FRAME_OFFSET: attr for attr in gic.redistributor_attrs(mpidr)}
        ctlr_attr = gic.mpidr_field(mpidr) << gic.MPIDR_SHIFT | gic.ICC_CTLR_EL1[1]
        icc_ctlr = next((r["value"] for r in record["gic_cpu_sysregs"] if r["id"] == ctlr_attr), None)
        if icc_ctlr is None:
            raise BundleError("gic_cpu_sysregs: no ICC_CTLR_EL1, so the GIC CPU interface cannot be read")
        cpu_interface = {attr.attr: attr for attr in gic.cpu_interface_attrs(mpidr, icc_ctlr)}
        return cls(
            mp_state=MpState(record["mp_state"]),
            core=tuple(
                (reg, int.from_bytes(core[_core_offset(reg) : _core_offset(reg) + reg.size], "little"))
                for reg in regs.CORE_REGISTERS
            ),
            sys_regs=sys_regs,
            timers=tuple(TimerState(Timer(t["timer"]), t["cntvoff"], t["ctl"], t["cval"]) for t in record["timers"]),
            redistributor=_values(redistributor, record, "gic_redistributor", "offset", "redistributor register"),
            cpu_interface=_values(cpu_interface, record, "gic_cpu_sysregs", "id", "GIC CPU interface register"),
        )


@dataclass(frozen=True)
class VmState:
    """The VM-wide VGIC state: its interrupt count, the distributor's registers and the SPIs' line
    levels, each list in restore order."""

    nr_irqs: int
    distributor: GicValues  # gic.distributor_attrs(nr_irqs)
    line_levels: GicValues  # gic.line_level_attrs(nr_irqs): a 32-bit level bitmap per 32 SPIs

    def to_record(self) -> dict[str, Any]:
        """This state as a ``smolformat.arm64.VmState`` value."""
        return {
            "gic_nr_irqs": self.nr_irqs,
            "gic_distributor": [{"offset": attr.attr, "value": value} for attr, value in self.distributor],
            "gic_line_levels": [{"offset": attr.attr & _INTID, "value": value} for attr, value in self.line_levels],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> VmState:
        """A ``smolformat.arm64.VmState`` value as plain data; BundleError names a register
        smolvmm does not save or an interrupt count it cannot restore."""
        nr_irqs = record["gic_nr_irqs"]
        try:
            distributor = {attr.attr: attr for attr in gic.distributor_attrs(nr_irqs)}
            levels = {attr.attr & _INTID: attr for attr in gic.line_level_attrs(nr_irqs)}
        except ValueError as exc:
            raise BundleError(f"the arm64 VM state: {exc}") from None
        return cls(
            nr_irqs=nr_irqs,
            distributor=_values(distributor, record, "gic_distributor", "offset", "distributor register"),
            line_levels=_values(levels, record, "gic_line_levels", "offset", "line-level word at INTID"),
        )


def admit_vcpu(record: Mapping[str, Any], offer: HostOffer, *, strict: bool) -> AdmittedVcpu:
    """A saved vCPU as plain data, holding only the registers smolvmm saves; BundleError "field:
    what" for any other. (The registers are this module's lists, not ``offer``'s: KVM takes them all.)"""
    return AdmittedVcpu(VcpuState.from_record(record).to_record())


def admit_vm(record: Mapping[str, Any]) -> dict[str, Any]:
    """The saved VGIC as plain data, holding only the registers smolvmm saves; BundleError "field:
    what" for any other."""
    return VmState.from_record(record).to_record()
