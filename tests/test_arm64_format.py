"""smolvmm's arm64 state objects (``arch/arm64/state.py``) round-trip through the bundle format's
arm64 declarations (smolformat.arm64), and the format's ``struct kvm_regs`` layout puts every
core register where its one-reg id says it is."""

from __future__ import annotations

import dataclasses

import pytest

from smolformat import arm64 as fmt
from smolvmm.arch.arm64 import gic, layout, regs, state, timer
from smolvmm.errors import BundleError


def _core_values() -> dict:
    """A kvm_regs container whose every field holds a distinct, recognisable value."""
    return {
        "regs": {"regs": [0x1000 + n for n in range(31)], "sp": 0x2000, "pc": 0x2001, "pstate": 0x3C5},
        "sp_el1": 0x3000,
        "elr_el1": 0x3001,
        "spsr": [0x4000 + n for n in range(5)],
        "padding": bytes(8),
        "fp_regs": {
            "vregs": [bytes([n]) * 16 for n in range(32)],
            "fpsr": 0x5000,
            "fpcr": 0x5001,
            "reserved": [0, 0],
        },
    }


def test_format_kvm_regs_layout_matches_the_one_reg_offsets() -> None:
    blob = fmt.KvmRegs.build(_core_values())
    assert len(blob) == 864  # sizeof(struct kvm_regs) on arm64
    expected = {
        **{f"x{n}": 0x1000 + n for n in range(31)},
        "sp": 0x2000,
        "pc": 0x2001,
        "pstate": 0x3C5,
        "sp_el1": 0x3000,
        "elr_el1": 0x3001,
        **{f"spsr[{n}]": 0x4000 + n for n in range(5)},
        **{f"v{n}": int.from_bytes(bytes([n]) * 16, "little") for n in range(32)},
        "fpsr": 0x5000,
        "fpcr": 0x5001,
    }
    for reg in regs.CORE_REGISTERS:
        offset = (reg.id & 0xFFFF) * 4
        assert int.from_bytes(blob[offset : offset + reg.size], "little") == expected[reg.name], reg.name


def _vcpu(index: int) -> state.VcpuState:
    """vCPU ``index`` as the arm64 code lists it, every register holding a distinct value."""
    mpidr = regs.kvm_mpidr(index)
    icc_ctlr = 6 << gic.ICC_CTLR_PRIBITS_SHIFT  # 7 priority bits: four active-priority registers each
    core = tuple((reg, (0x1111_2222_3333_4444 + n) % (1 << 8 * reg.size)) for n, reg in enumerate(regs.CORE_REGISTERS))
    values = {regs.SYSTEM["MPIDR_EL1"]: mpidr}
    cpu_attrs = gic.cpu_interface_attrs(mpidr, icc_ctlr)
    return state.VcpuState(
        mp_state=regs.MpState.STOPPED,
        core=core,
        sys_regs=tuple((reg, values.get(reg, 0x100 + n)) for n, reg in enumerate(_SAVED_ONE_REGS)),
        timers=(
            timer.TimerState(timer.Timer.VIRTUAL, 123_456_789, ctl=timer.CTL_ENABLE | timer.CTL_ISTATUS, cval=1 << 40),
            timer.TimerState(timer.Timer.PHYSICAL, count=0, ctl=timer.CTL_IMASK, cval=7),
        ),
        redistributor=tuple((attr, 0x200 + n) for n, attr in enumerate(gic.redistributor_attrs(mpidr))),
        cpu_interface=tuple(
            (attr, icc_ctlr if attr.name == "ICC_CTLR_EL1" else 0x300 + n) for n, attr in enumerate(cpu_attrs)
        ),
    )


_SAVED_ONE_REGS = (*regs.SYSTEM_REGISTERS, *regs.FIRMWARE_REGISTERS)


def test_timer_kinds_are_the_formats() -> None:
    assert (timer.Timer.VIRTUAL, timer.Timer.PHYSICAL) == (fmt.TIMER_VIRTUAL, fmt.TIMER_PHYSICAL)


@pytest.mark.parametrize("index", [0, 17])
def test_vcpu_state_round_trips_through_the_format(index: int) -> None:
    vcpu = _vcpu(index)
    blob = fmt.VcpuState.build(vcpu.to_record())
    parsed = fmt.VcpuState.parse(blob)
    assert state.VcpuState.from_record(parsed) == vcpu
    assert fmt.VcpuState.build(state.VcpuState.from_record(parsed).to_record()) == blob
    core = dict(vcpu.core)
    assert parsed.core.regs.pc == core[regs.CORE["pc"]] and parsed.core.sp_el1 == core[regs.CORE["sp_el1"]]
    assert parsed.core.fp_regs.vregs[31] == core[regs.CORE["v31"]].to_bytes(16, "little")
    assert parsed.timers[0].cntvoff == 123_456_789, "the record's cntvoff field holds the virtual count"
    assert all(r.offset < gic.REDIST_SIZE for r in parsed.gic_redistributor), "offsets leave out the affinity"


def test_vm_state_round_trips_through_the_format() -> None:
    vm = state.VmState(
        nr_irqs=layout.NR_IRQS,
        distributor=tuple((attr, n) for n, attr in enumerate(gic.distributor_attrs(layout.NR_IRQS))),
        line_levels=tuple((attr, 1 << n) for n, attr in enumerate(gic.line_level_attrs(layout.NR_IRQS))),
    )
    parsed = fmt.VmState.parse(fmt.VmState.build(vm.to_record()))
    assert [r.offset for r in parsed.gic_line_levels] == [32, 64], "a line-level word's offset is its first INTID"
    assert state.VmState.from_record(parsed) == vm


def test_records_with_registers_smolvmm_does_not_save_are_refused() -> None:
    """A bundle's record is refused with a BundleError, as the x86_64 boundary refuses one."""
    record = _vcpu(1).to_record()
    with pytest.raises(BundleError, match="system register 0x"):
        timer_as_sysreg = {"id": timer.TIMER_CNT.id, "value": 0}  # timers have their own records
        state.VcpuState.from_record({**record, "sys_regs": [*record["sys_regs"], timer_as_sysreg]})
    with pytest.raises(BundleError, match="redistributor register 0x8"):
        state.VcpuState.from_record({**record, "gic_redistributor": [{"offset": 0x8, "value": 0}]})
    without_mpidr = [r for r in record["sys_regs"] if r["id"] != regs.SYSTEM["MPIDR_EL1"].id]
    with pytest.raises(BundleError, match="no MPIDR_EL1"):
        state.VcpuState.from_record({**record, "sys_regs": without_mpidr})
    physical_with_count = [record["timers"][0], {**record["timers"][1], "cntvoff": 5}]
    with pytest.raises(BundleError, match="vCPU state: the physical timer's count"):
        state.VcpuState.from_record({**record, "timers": physical_with_count})
    with pytest.raises(BundleError, match="VM state: GIC interrupt count 100"):
        state.VmState.from_record({"gic_nr_irqs": 100, "gic_distributor": [], "gic_line_levels": []})
    with pytest.raises(ValueError, match="physical timer"):
        dataclasses.replace(_vcpu(1).timers[1], count=5)
