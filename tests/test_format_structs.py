"""Register-set and device declarations: layouts match the kernel headers, values round-trip."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from construct import Int32ul, PrefixedArray, StreamError, ValidationError

from smolformat import DEVICE_KINDS, DeviceConfig, DeviceRecord, arm64, samples, x86_64
from smolformat.layout import ENTRY_SIZE, HEADER_SIZE, Header, SectionEntry, SectionKind
from smolformat.limits import bounded
from smolformat.packed import Packed, PackedArray
from smolformat.payloads import payload

# construct name -> C struct name, for every x86_64 declaration byte-compatible with <linux/kvm.h>
KVM_STRUCTS = {
    "KvmRegs": "kvm_regs",
    "KvmSegment": "kvm_segment",
    "KvmDtable": "kvm_dtable",
    "KvmSregs": "kvm_sregs",
    "KvmFpu": "kvm_fpu",
    "KvmXcr": "kvm_xcr",
    "KvmXcrs": "kvm_xcrs",
    "KvmMsrEntry": "kvm_msr_entry",
    "KvmLapicState": "kvm_lapic_state",
    "KvmVcpuEvents": "kvm_vcpu_events",
    "KvmMpState": "kvm_mp_state",
    "KvmDebugregs": "kvm_debugregs",
    "KvmCpuidEntry2": "kvm_cpuid_entry2",
    "KvmPicState": "kvm_pic_state",
    "KvmIoapicState": "kvm_ioapic_state",
    "KvmPitChannelState": "kvm_pit_channel_state",
    "KvmPitState2": "kvm_pit_state2",
    "KvmClockData": "kvm_clock_data",
}


def _offsets(construct: Packed) -> list[tuple[str, int]]:
    offsets, at = [], 0
    for sub in construct.declared.subcons:
        offsets.append((sub.name, at))
        at += sub.sizeof()
    return offsets


@pytest.fixture(scope="module")
def kernel_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """sizeof and offsetof of every declared field, as gcc sees <linux/kvm.h>."""
    if not shutil.which("gcc") or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("needs gcc and the kernel headers")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for name, c_name in KVM_STRUCTS.items():
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {c_name}));')
        for field, _ in _offsets(getattr(x86_64, name)):
            lines.append(f'printf("{name}.{field} %zu\\n", offsetof(struct {c_name}, {field}));')
    lines.append("return 0; }")
    work = tmp_path_factory.mktemp("kvm_layout")
    (work / "layout.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", work / "layout", work / "layout.c"], check=True)
    output = subprocess.run([work / "layout"], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (line.split() for line in output.splitlines())}


@pytest.mark.parametrize("name", KVM_STRUCTS)
def test_x86_64_struct_matches_kernel_header(name: str, kernel_layout: dict[str, int]) -> None:
    construct = getattr(x86_64, name)
    assert construct.sizeof() == kernel_layout[name]
    for field, offset in _offsets(construct):
        assert offset == kernel_layout[f"{name}.{field}"], field


def test_arm64_core_registers_match_the_uapi_layout() -> None:
    # arm64 <asm/kvm.h>: struct kvm_regs is 864 bytes, fp_regs at 336 (KVM_REG_ARM_CORE ids are offset/4)
    assert arm64.KvmRegs.sizeof() == 864
    assert dict(_offsets(arm64.KvmRegs))["fp_regs"] == 336
    assert dict(_offsets(arm64.KvmRegs))["sp_el1"] == 272


def test_frame_sizes() -> None:
    assert Header.sizeof() == HEADER_SIZE
    assert SectionEntry.sizeof() == ENTRY_SIZE


PACKED = [
    (module.__name__.split(".")[-1], name)
    for module in (x86_64, arm64)
    for name, value in vars(module).items()
    if isinstance(value, Packed)
]


@pytest.mark.parametrize(("module", "name"), PACKED, ids=[f"{m}.{n}" for m, n in PACKED])
def test_packed_struct_is_its_declaration(module: str, name: str) -> None:
    construct: Packed = getattr({"x86_64": x86_64, "arm64": arm64}[module], name)
    data = random.Random(name).randbytes(construct.sizeof())
    value = construct.parse(data)
    assert value == construct.declared.parse(data)
    assert str(value) == str(construct.declared.parse(data))  # the same fields in the same order, nested too
    assert construct.build(value) == data == construct.declared.build(value)
    assert construct.sizeof() == construct.declared.sizeof()


def test_packed_rejects_wrong_sizes() -> None:
    value = x86_64.KvmFpu.parse(bytes(x86_64.KvmFpu.sizeof()))
    value.xmm[0] = b"short"
    with pytest.raises(StreamError):
        x86_64.KvmFpu.build(value)
    value = x86_64.KvmDebugregs.parse(bytes(x86_64.KvmDebugregs.sizeof()))
    value.db = [1, 2, 3]
    with pytest.raises(StreamError):
        x86_64.KvmDebugregs.build(value)


@pytest.mark.parametrize("element", [x86_64.KvmCpuidEntry2, x86_64.KvmMsrEntry], ids=["nested", "flat"])
def test_packed_array_is_a_prefixed_array(element: Packed) -> None:
    fast, declared = PackedArray(bounded(Int32ul, 5), element), PrefixedArray(bounded(Int32ul, 5), element.declared)
    data = (3).to_bytes(4, "little") + random.Random(3).randbytes(3 * element.sizeof())
    value = fast.parse(data)
    assert value == declared.parse(data) and len(value) == 3
    assert fast.build(value) == data == declared.build(value)
    with pytest.raises(StreamError):  # a count the data does not hold
        fast.parse(data[:-1])
    with pytest.raises(ValidationError):  # a count above the bound, even with the data there
        fast.parse((6).to_bytes(4, "little") + bytes(6 * element.sizeof()))


@pytest.mark.parametrize(
    ("kind", "arch", "value"),
    [
        (SectionKind.VCPU_STATE, "x86_64", samples.x86_64_vcpu(3)),
        (SectionKind.VM_STATE, "x86_64", samples.x86_64_vm_state()),
        (SectionKind.VCPU_STATE, "arm64", samples.arm64_vcpu(1)),
        (SectionKind.VM_STATE, "arm64", samples.arm64_vm_state()),
        (SectionKind.DEVICES, "", samples.devices(2)[1]),
        (
            SectionKind.CONFIG,
            "",
            samples.machine_config("arm64", [(0x4000_0000, 1 << 30)], samples.devices(2)[0]),
        ),
    ],
    ids=["x86_64-vcpu", "x86_64-vm", "arm64-vcpu", "arm64-vm", "devices", "config"],
)
def test_section_payload_round_trips(kind: SectionKind, arch: str, value: object) -> None:
    data = payload(kind, arch).build(value)
    assert payload(kind, arch).build(payload(kind, arch).parse(data)) == data


def test_arm64_vector_registers_are_128_bit() -> None:
    value = samples.arm64_vcpu(0)
    value["core"]["fp_regs"]["vregs"][31] = (2**128 - 1).to_bytes(16, "little")
    data = payload(SectionKind.VCPU_STATE, "arm64").build(value)
    assert payload(SectionKind.VCPU_STATE, "arm64").parse(data).core.fp_regs.vregs[31] == b"\xff" * 16


def test_every_device_kind_has_a_config_and_state_declaration() -> None:
    device_config, states = samples.devices(1)
    assert {d["kind"] for d in device_config} == {s["kind"] for s in states} == set(DEVICE_KINDS)
    for config, state in zip(device_config, states):
        assert DeviceConfig.build(config) and DeviceRecord.build(state)


def test_xsave_larger_than_4096_is_kept() -> None:
    value = samples.x86_64_vcpu(0)
    value["xsave"] = bytes(range(256)) * 44  # 11264 bytes: an AMX-sized KVM_GET_XSAVE2 area
    parsed = payload(SectionKind.VCPU_STATE, "x86_64").parse(payload(SectionKind.VCPU_STATE, "x86_64").build(value))
    assert parsed.xsave == value["xsave"]


def test_a_value_past_its_cap_is_named_with_the_cap_both_ways() -> None:
    capped = bounded(Int32ul, 64)
    assert capped.parse((64).to_bytes(4, "little")) == 64
    with pytest.raises(ValidationError, match="65 is more than the cap of 64"):
        capped.parse((65).to_bytes(4, "little"))
    with pytest.raises(ValidationError, match="65 is more than the cap of 64"):
        capped.build(65)
