"""An arm64 state built from smolvmm's register and VGIC lists round-trips through the bundle
format's arm64 declarations (smolformat.arm64), and the format's ``struct kvm_regs`` layout puts
every core register where its one-reg id says it is."""

from __future__ import annotations

from smolformat import arm64 as fmt

from smolvmm.arch.arm64 import gic, layout, regs, timer


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


def test_vcpu_and_vm_state_round_trip() -> None:
    mpidr = regs.kvm_mpidr(17)
    one_regs = [*regs.SYSTEM_REGISTERS, *timer.TIMER_REGISTERS, *regs.FIRMWARE_REGISTERS]
    vcpu = {
        "mp_state": regs.MpState.RUNNABLE,
        "core": _core_values(),
        "sys_regs": [{"id": reg.id, "value": n} for n, reg in enumerate(one_regs)],
        "timers": [
            {"timer": fmt.TIMER_VIRTUAL, "cntvoff": 7, "ctl": timer.CTL_ENABLE, "cval": 100},
            {"timer": fmt.TIMER_PHYSICAL, "cntvoff": 0, "ctl": 0, "cval": 0},
        ],
        "gic_redistributor": [
            {"offset": attr.attr & 0xFFFF_FFFF, "value": n} for n, attr in enumerate(gic.redistributor_attrs(mpidr))
        ],
        "gic_cpu_sysregs": [
            {"id": attr.attr, "value": n} for n, attr in enumerate(gic.cpu_interface_attrs(mpidr, 7 << 8))
        ],
    }
    parsed = fmt.VcpuState.parse(fmt.VcpuState.build(vcpu))
    assert [r.id for r in parsed.sys_regs] == [reg.id for reg in one_regs]
    offsets = [a.attr & 0xFFFF_FFFF for a in gic.redistributor_attrs(mpidr)]
    assert [r.offset for r in parsed.gic_redistributor] == offsets
    assert [r.id for r in parsed.gic_cpu_sysregs] == [a.attr for a in gic.cpu_interface_attrs(mpidr, 7 << 8)]
    assert parsed.core.regs.pc == 0x2001 and parsed.core.fp_regs.vregs[31] == bytes([31]) * 16

    distributor = gic.distributor_attrs(gic.NR_IRQS_MAX)
    vm = {"gic_nr_irqs": layout.NR_IRQS, "gic_distributor": [{"offset": a.attr, "value": 1} for a in distributor]}
    parsed_vm = fmt.VmState.parse(fmt.VmState.build(vm))
    assert parsed_vm.gic_nr_irqs == layout.NR_IRQS
    assert [r.offset for r in parsed_vm.gic_distributor] == [a.attr for a in distributor]
