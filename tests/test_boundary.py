"""The boundary between a bundle's saved state and the hypervisor (smolvmm.monitor.boundary): what this
host takes is admitted, anything else is refused in one line naming section, field and value.

Runs natively: a fresh vCPU and VM on this host's KVM (hardware or PVM) give real saved state and
the real host offer; nothing here runs a guest.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest

from smolformat import samples
from smolvmm import BundleError, Machine
from smolvmm.arch.interface import HostOffer
from smolvmm.arch.x86_64.machine import ARCH as X86_64
from smolvmm.hypervisor import open_hypervisor
from smolvmm.monitor.boundary import admit_devices, admit_vcpu, admit_vm

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"


@pytest.fixture(scope="module")
def host() -> Any:
    """This host's hypervisor offer, a fresh vCPU's saved state and a fresh VM's saved state."""
    hypervisor = open_hypervisor()
    vm = hypervisor.create_vm()
    vcpu = vm.create_vcpu(0)
    try:
        yield hypervisor.offer, vcpu.save_state(), vm.save_state(), vcpu
    finally:
        vcpu.close()
        vm.close()
        hypervisor.close()


def _refused(match: str) -> Any:
    return pytest.raises(BundleError, match=match)


@pytest.mark.kvm(linux_guest=False)
def test_state_this_host_saved_is_admitted(host: Any) -> None:
    offer, vcpu_state, vm_state, _ = host
    admitted = admit_vcpu(vcpu_state, 0, offer)
    assert admitted.dropped == 0 and len(admitted.state["xsave"]) == offer.xsave_size
    assert len(admitted.state["cpuid"]) == len(vcpu_state["cpuid"])
    assert len(admitted.state["msrs"]) == len(vcpu_state["msrs"])
    assert admit_vm(vm_state)["pit"] == vm_state["pit"]


@pytest.mark.kvm(linux_guest=False)
def test_an_xsave_area_of_another_size_is_refused_before_any_ioctl(host: Any) -> None:
    """Defect: a 4099-byte XSAVE blob was copied into KVM's 4096-byte buffer (a heap overflow)."""
    offer, vcpu_state, _, vcpu = host
    hostile = {**vcpu_state, "xsave": bytes(offer.xsave_size + 3)}
    with _refused(rf"^VCPU_STATE#0 xsave: {offer.xsave_size + 3} bytes; .* exactly {offer.xsave_size}$"):
        admit_vcpu(hostile, 0, offer)
    # And the backend itself never copies past its buffer, whoever calls it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="4099 bytes"):
            vcpu.set_xsave(bytes(4099))


def _offer() -> HostOffer:
    """A small host offer: leaves 0, 1 and 7, two MSRs."""
    return HostOffer(
        xsave_size=4096,
        cpuid={(0, 0): (0xD, 0, 0, 0), (1, 0): (0, 0, 0x0000_0201, 0x0000_0010), (7, 0): (0, 0x8, 0, 0)},
        msrs=frozenset({0x10, 0x174}),
    )


def _vcpu(**changes: Any) -> dict[str, Any]:
    state = copy.deepcopy(samples.x86_64_vcpu(0))
    state["mp_state"] = {"mp_state": 0}
    state["xcrs"]["nr_xcrs"] = 1
    state["cpuid"] = [
        {"function": 0, "index": 0, "flags": 0, "eax": 0xD, "ebx": 0, "ecx": 0, "edx": 0, "padding": [0] * 3},
        {
            "function": 1,
            "index": 0,
            "flags": 0,
            "eax": 0,
            "ebx": 0,
            "ecx": 0x8000_0201,
            "edx": 0x10,
            "padding": [0] * 3,
        },
    ]
    state["msrs"] = [{"index": 0x10, "reserved": 0, "data": 5}, {"index": 0x174, "reserved": 0, "data": 0}]
    state.update(changes)
    return state


def _leaf(function: int, **registers: int) -> dict[str, Any]:
    return {
        "function": function,
        "index": 0,
        "flags": 0,
        "eax": 0,
        "ebx": 0,
        "ecx": 0,
        "edx": 0,
        "padding": [0] * 3,
        **registers,
    }


def test_cpuid_and_msrs_the_host_lacks_are_refused_on_a_run_and_dropped_when_measured(
    caplog: pytest.LogCaptureFixture,
) -> None:
    offer = _offer()
    assert admit_vcpu(_vcpu(), 0, offer).dropped == 0
    unknown_leaf = _vcpu(cpuid=[*_vcpu()["cpuid"], _leaf(0x8000_0008)])
    with _refused(r"^VCPU_STATE#0 cpuid\[0x80000008\.0\]: this host's hypervisor does not offer the leaf$"):
        admit_vcpu(unknown_leaf, 0, offer)
    unknown_msr = _vcpu(msrs=[{"index": 0xC000_0080, "reserved": 0, "data": 0}])
    with _refused(r"^VCPU_STATE#0 msrs: MSR 0xc0000080 is not one this host's hypervisor saves"):
        admit_vcpu(unknown_msr, 0, offer)
    twice = _vcpu(cpuid=[_leaf(7, ebx=0x8), _leaf(7)])
    with _refused(r"cpuid\[0x7\.0\]: appears twice"):
        admit_vcpu(twice, 0, offer)

    hostile = _vcpu(
        cpuid=[_leaf(0x8000_0008), _leaf(7, ebx=0x28), _leaf(0x8000_0009)],
        msrs=[{"index": 0xC000_0080, "reserved": 0, "data": 0}],
    )
    admitted = admit_vcpu(hostile, 0, offer, strict=False)
    assert admitted.dropped == 3 and admitted.state["msrs"] == []
    assert admitted.state["cpuid"] == [
        {"function": 7, "index": 0, "flags": 0, "eax": 0, "ebx": 0x28, "ecx": 0, "edx": 0}
    ]
    # one line per kind of state left out, however many values
    assert [r.getMessage() for r in caplog.records] == [
        "VCPU_STATE#0 cpuid: 2 leaf(s) this host's hypervisor does not offer, first 0x80000008.0; left out",
        "VCPU_STATE#0 msrs: 1 MSR(s) this host does not have, first 0xc0000080; left out",
    ]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mp_state", {"mp_state": 9}, r"^VCPU_STATE#0 mp_state: 9 is not an x86_64 vCPU state"),
        ("xsave", bytes(8192), r"^VCPU_STATE#0 xsave: 8192 bytes"),
    ],
)
def test_impossible_vcpu_values_are_named(field: str, value: Any, message: str) -> None:
    with _refused(message):
        admit_vcpu(_vcpu(**{field: value}), 0, _offer())


def test_too_many_xcrs_are_refused() -> None:
    state = _vcpu()
    state["xcrs"]["nr_xcrs"] = 17
    with _refused(r"^VCPU_STATE#0 xcrs\.nr_xcrs: 17, more than 16$"):
        admit_vcpu(state, 0, _offer())


def _vm_state() -> dict[str, Any]:
    state = copy.deepcopy(samples.x86_64_vm_state())
    state["ioapic"].update({"base_address": 0xFEC0_0000, "id": 0})
    state["pit"]["flags"] = 0
    for channel in state["pit"]["channels"]:
        channel.update(
            {
                "mode": 2,
                "rw_mode": 3,
                "read_state": 3,
                "write_state": 3,
                "bcd": 0,
                "gate": 1,
                "count": 0x10000,
                "count_latched": 0,
                "status_latched": 0,
            }
        )
    return state


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s["ioapic"].update({"base_address": 0x1000}),
            r"^VM_STATE ioapic\.base_address: 0x1000, not 0xfec00000$",
        ),
        (lambda s: s["ioapic"].update({"id": 99}), r"^VM_STATE ioapic\.id: 99"),
        (lambda s: s["pit"]["channels"][1].update({"mode": 9}), r"^VM_STATE pit\.channels\[1\]\.mode: 9, not below 8$"),
        (lambda s: s["pit"]["channels"][0].update({"count": 0x10001}), r"^VM_STATE pit\.channels\[0\]\.count: 65537"),
        (lambda s: s["pit"].update({"flags": 0x80}), r"^VM_STATE pit\.flags: 0x80 has unknown bits$"),
    ],
)
def test_impossible_vm_values_are_named(edit: Any, message: str) -> None:
    admit_vm(_vm_state())
    state = _vm_state()
    edit(state)
    with _refused(message):
        admit_vm(state)


def _device(kind: str, bus: str, base: int, size: int, gsi: int) -> Any:
    return _Obj(kind=kind, bus=bus, base=base, size=size, gsi=gsi, params=None)


class _Obj(dict):
    """A construct-Container-like record: items are attributes too."""

    __getattr__ = dict.__getitem__


def _record(kind: str, instance: int, state: dict[str, Any]) -> Any:
    return _Obj(kind=kind, instance=instance, state=_Obj(state))


@pytest.mark.anyio
async def test_the_format_sample_devices_are_refused_in_one_line_not_a_value_error() -> None:
    """Defect: the sample's i8042 and acpi-pm records made the restore raise a bare ValueError."""
    config, records = samples.devices(1)
    with _refused(r"^CONFIG devices\[2\] acpi-pm#0: this monitor has no such pio device$"):
        admit_devices(X86_64, [_Obj(d) for d in config], [_Obj(r, state=_Obj(r["state"])) for r in records])
    with _refused("acpi-pm#0: this monitor has no such pio device"):
        await Machine.prepare_restore(VECTORS / "valid-x86_64-raw.smolmachine")


def test_legacy_devices_pair_by_kind_and_instance_and_place() -> None:
    uart = {
        "dll": 1,
        "dlm": 0,
        "ier": 0,
        "iir": 1,
        "fcr": 0,
        "lcr": 3,
        "mcr": 8,
        "lsr": 0x60,
        "msr": 0xB0,
        "scr": 0,
        "thre_pending": False,
        "rx": b"ls\n",
    }
    i8042 = {"status": 0, "control": 0, "output_port": 0, "pending_command": 0, "output_buffer": b""}
    config = [_device("uart16550", "pio", 0x3F8, 8, 4), _device("i8042", "pio", 0x60, 5, 1)]
    records = [_record("uart16550", 0, uart), _record("i8042", 0, i8042)]
    admitted = admit_devices(X86_64, config, records)
    assert admitted.uart is not None and admitted.uart.rx == b"ls\n" and admitted.virtio == []
    with _refused(r"^DEVICES i8042#0 output_buffer: 2 bytes; this monitor's i8042 has no output buffer$"):
        admit_devices(X86_64, config, [records[0], _record("i8042", 0, {**i8042, "output_buffer": b"\xfa\xaa"})])
    with _refused(r"^DEVICES uart16550#0: no saved state for this configured device$"):
        admit_devices(X86_64, config, [_record("uart16550", 1, uart), records[1]])
    with _refused(
        r"^CONFIG devices\[0\] uart16550#0 placement: pio 0x2f8\+0x8 gsi 3; this monitor puts it at pio 0x3f8\+0x8 gsi 4$"
    ):
        admit_devices(X86_64, [_device("uart16550", "pio", 0x2F8, 8, 3)], records[:1])
    with _refused("receive FIFO holds 65 bytes"):
        admit_devices(X86_64, config[:1], [_record("uart16550", 0, {**uart, "rx": bytes(65)})])
    with _refused(r"virtio-rng#0 placement: mmio 0xd0001000\+0x1000 gsi 6; this monitor puts it at mmio 0xd0000000"):
        admit_devices(X86_64, [_device("virtio-rng", "mmio", 0xD000_1000, 0x1000, 6)], [_record("virtio-rng", 0, {})])


def test_verify_refuses_a_changed_byte_between_sections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Defect: padding bytes were covered by no digest, so verify accepted them changed."""
    from smolformat.crafting import find_entry, parse_frame
    from smolformat.layout import SectionKind
    from smolvmm.cli.dispatch import main

    data = bytearray((VECTORS / "valid-x86_64-raw.smolmachine").read_bytes())
    memory = find_entry(parse_frame(bytes(data))[1], SectionKind.MEMORY_DATA)
    data[memory["offset"] - 100] = 0x41
    path = tmp_path / "gap.smolmachine"
    path.write_bytes(bytes(data))
    assert main(["verify", str(path)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not zero [nonzero-gap]" in err
