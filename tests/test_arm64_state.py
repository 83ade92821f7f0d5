"""The arm64 state lists: which VGIC registers a snapshot holds, timer state, MPIDRs and the
memory map's bounds. Encodings themselves are checked against the kernel headers in
test_arm64_kvm_uapi.py; here the lists' coverage and order are."""

from __future__ import annotations

import pytest

from smolvmm.arch.arm64 import gic, layout, regs, timer
from smolvmm.errors import ConfigError


def test_kvm_mpidr_packs_16_vcpus_per_aff0() -> None:
    assert regs.kvm_mpidr(0) == 0x8000_0000
    assert regs.kvm_mpidr(15) == 0x8000_000F
    assert regs.kvm_mpidr(16) == 0x8000_0100
    assert regs.kvm_mpidr(0x1234) == 0x8001_2304


def test_distributor_covers_every_spi_once() -> None:
    attrs = gic.distributor_attrs(96)
    names = [a.name for a in attrs]
    assert len(names) == len(set(names))
    by_name = {a.name: a for a in attrs}
    assert [a.name for a in attrs[:2]] == ["GICD_IIDR", "GICD_CTLR"]
    assert attrs[-1].name.startswith("GICD_ISENABLER")
    # 64 SPIs: bit arrays need words 1..2, ICFGR words 2..5, IPRIORITYR words 8..23, IROUTER two words per SPI.
    assert [n for n in names if n.startswith("GICD_ISENABLER")] == ["GICD_ISENABLER[1]", "GICD_ISENABLER[2]"]
    assert by_name["GICD_ISENABLER[1]"].attr == 0x104 and by_name["GICD_ISENABLER[1]"].clear_attr == 0x184
    assert len([n for n in names if n.startswith("GICD_ICFGR")]) == 4 and by_name["GICD_ICFGR[2]"].attr == 0xC08
    assert len([n for n in names if n.startswith("GICD_IPRIORITYR")]) == 16
    assert by_name["GICD_IPRIORITYR[8]"].attr == 0x420
    routers = [a for a in attrs if a.name.startswith("GICD_IROUTER")]
    assert len(routers) == 128 and routers[0].attr == 0x6100 and routers[-1].attr == 0x6000 + 8 * 95 + 4
    assert all(a.group == gic.Group.DIST_REGS for a in attrs)
    # Configuration before pending state, enables last.
    first = {n.split("[")[0]: i for i, n in reversed(list(enumerate(names)))}
    assert first["GICD_ICFGR"] < first["GICD_ISPENDR"] < first["GICD_ISENABLER"]


def test_redistributor_attrs_carry_the_vcpu_affinity() -> None:
    attrs = gic.redistributor_attrs(regs.kvm_mpidr(17))
    assert {a.attr >> 32 for a in attrs} == {0x0000_0101}
    by_name = {a.name: a.attr & 0xFFFF_FFFF for a in attrs}
    assert by_name["GICR_CTLR"] == 0
    assert by_name["GICR_ISENABLER0[0]"] == 0x1_0100
    assert by_name["GICR_ICFGR[0]"] == 0x1_0C00 and by_name["GICR_ICFGR[1]"] == 0x1_0C04
    assert [n for n in by_name if n.startswith("GICR_IPRIORITYR")] == [f"GICR_IPRIORITYR[{n}]" for n in range(8)]
    assert all(a.group == gic.Group.REDIST_REGS for a in attrs)


def test_cpu_interface_lists_as_many_active_priority_registers_as_priority_bits() -> None:
    def names(pribits: int) -> list[str]:
        return [a.name for a in gic.cpu_interface_attrs(0, (pribits - 1) << gic.ICC_CTLR_PRIBITS_SHIFT)]

    assert names(5)[:2] == ["ICC_SRE_EL1", "ICC_CTLR_EL1"]
    assert [n for n in names(5) if "AP" in n] == ["ICC_AP0R0_EL1", "ICC_AP1R0_EL1"]
    assert len([n for n in names(6) if "AP" in n]) == 4
    assert len([n for n in names(8) if "AP" in n]) == 8
    with pytest.raises(ValueError, match="priority bits"):
        names(4)


def test_line_levels_and_irq_count_bounds() -> None:
    attrs = gic.line_level_attrs(layout.NR_IRQS)
    assert [a.attr for a in attrs] == [32, 64]
    for bad in (32, 100, 1056):
        with pytest.raises(ValueError):
            gic.distributor_attrs(bad)


def test_timer_state_restore_order_and_validation() -> None:
    virtual = timer.TimerState(timer.Timer.VIRTUAL, count=10, ctl=0b101, cval=20)
    physical = timer.TimerState(timer.Timer.PHYSICAL, count=0, ctl=0b010, cval=30)
    pairs = [*virtual.registers(), *physical.registers()]
    assert [reg for reg, _ in pairs] == list(timer.TIMER_REGISTERS)
    assert dict(pairs)[timer.TIMER_CNT] == 10
    assert dict(pairs)[timer.TIMER_CTL] == 0b001, "ISTATUS is read-only and not written back"
    with pytest.raises(ValueError, match="reserved bits"):
        timer.TimerState(timer.Timer.VIRTUAL, 0, 0b1000, 0)
    with pytest.raises(ValueError, match="64 bits"):
        timer.TimerState(timer.Timer.VIRTUAL, 1 << 64, 0, 0)
    with pytest.raises(ValueError, match="host's"):
        timer.TimerState(timer.Timer.PHYSICAL, 1, 0, 0)


def test_layout_windows_do_not_overlap() -> None:
    machine = layout.layout(layout.MAX_VCPUS, 1 << 30, layout.VIRTIO_SLOTS)
    windows = [
        machine.gic_redist,
        machine.gic_dist,
        *((d.base, d.size) for d in (machine.uart, machine.rtc, *machine.virtio)),
        (layout.RAM_START, machine.ram_size),
    ]
    for (a, a_size), (b, _) in zip(windows, windows[1:]):
        assert a + a_size <= b
    assert machine.gic_redist[0] % 0x1_0000 == 0 and machine.gic_dist[0] % 0x1_0000 == 0
    spis = [d.spi for d in (machine.uart, machine.rtc, *machine.virtio)]
    assert len(set(spis)) == len(spis) and gic.FIRST_SPI + max(spis) < layout.NR_IRQS


@pytest.mark.parametrize(
    ("vcpus", "ram", "virtio", "message"),
    [
        (0, 1 << 30, 0, "1 to 256 vCPUs"),
        (257, 1 << 30, 0, "1 to 256 vCPUs"),
        (1, (1 << 30) + 4096, 0, "multiple of 2 MiB"),
        (1, 1 << 40, 0, "multiple of 2 MiB"),
        (1, 1 << 30, 33, "at most 32 virtio"),
    ],
)
def test_layout_rejects_out_of_range_machines(vcpus: int, ram: int, virtio: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        layout.layout(vcpus, ram, virtio)
