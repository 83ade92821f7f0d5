"""The arm64 KVM numbers in smolvmm.arch.arm64 against the kernel's own uapi headers.

The headers come from Debian's ``linux-libc-dev-arm64-cross`` (installed by ``tools/setup``)
under /usr/aarch64-linux-gnu/include. The probe is compiled with the *host* gcc: the constants
are macros, and the offsets come from ``offsetof`` on ``struct kvm_regs``, whose layout is the
same under the x86_64 and aarch64 LP64 ABIs (``__uint128_t`` is 16-byte aligned on both); the
probe asserts the struct's aarch64 size (864 bytes) so a layout difference would fail to compile.
No aarch64 cross compiler is needed.

System register encodings are typed below in the Arm ARM's ``S<op0>_<op1>_C<n>_C<m>_<op2>``
notation (checked against Linux's arch/arm64/include/asm/sysreg.h) and turned into one-reg ids
by the header's own ARM64_SYS_REG macro.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from smolvmm.arch.arm64 import gic, regs, timer

HEADERS = Path("/usr/aarch64-linux-gnu/include")

# Arm ARM names -> encodings, transcribed independently of smolvmm/arch/arm64/regs.py.
ARM_ARM_SYSREGS = {
    "MPIDR_EL1": "S3_0_C0_C0_5",
    "SCTLR_EL1": "S3_0_C1_C0_0",
    "CPACR_EL1": "S3_0_C1_C0_2",
    "TTBR0_EL1": "S3_0_C2_C0_0",
    "TTBR1_EL1": "S3_0_C2_C0_1",
    "TCR_EL1": "S3_0_C2_C0_2",
    "AFSR0_EL1": "S3_0_C5_C1_0",
    "AFSR1_EL1": "S3_0_C5_C1_1",
    "ESR_EL1": "S3_0_C5_C2_0",
    "FAR_EL1": "S3_0_C6_C0_0",
    "PAR_EL1": "S3_0_C7_C4_0",
    "MAIR_EL1": "S3_0_C10_C2_0",
    "AMAIR_EL1": "S3_0_C10_C3_0",
    "VBAR_EL1": "S3_0_C12_C0_0",
    "CONTEXTIDR_EL1": "S3_0_C13_C0_1",
    "TPIDR_EL1": "S3_0_C13_C0_4",
    "CNTKCTL_EL1": "S3_0_C14_C1_0",
    "CSSELR_EL1": "S3_2_C0_C0_0",
    "TPIDR_EL0": "S3_3_C13_C0_2",
    "TPIDRRO_EL0": "S3_3_C13_C0_3",
    "MDSCR_EL1": "S2_0_C0_C2_2",
}
ARM_ARM_ICC = {
    "ICC_SRE_EL1": "S3_0_C12_C12_5",
    "ICC_CTLR_EL1": "S3_0_C12_C12_4",
    "ICC_PMR_EL1": "S3_0_C4_C6_0",
    "ICC_BPR0_EL1": "S3_0_C12_C8_3",
    "ICC_BPR1_EL1": "S3_0_C12_C12_3",
    "ICC_IGRPEN0_EL1": "S3_0_C12_C12_6",
    "ICC_IGRPEN1_EL1": "S3_0_C12_C12_7",
    **{f"ICC_AP0R{n}_EL1": f"S3_0_C12_C8_{4 + n}" for n in range(4)},
    **{f"ICC_AP1R{n}_EL1": f"S3_0_C12_C9_{n}" for n in range(4)},
}


def _fields(notation: str) -> str:
    op0, op1, crn, crm, op2 = re.fullmatch(r"S(\d)_(\d)_C(\d+)_C(\d+)_(\d)", notation).groups()
    return f"{op0}, {op1}, {crn}, {crm}, {op2}"


def _core_expression(name: str) -> str:
    """The struct kvm_regs member a core register name denotes, as a C expression."""
    if m := re.fullmatch(r"x(\d+)", name):
        return f"regs.regs[{m[1]}]"
    if m := re.fullmatch(r"v(\d+)", name):
        return f"fp_regs.vregs[{m[1]}]"
    if name in ("sp", "pc", "pstate"):
        return f"regs.{name}"
    if name in ("fpsr", "fpcr"):
        return f"fp_regs.{name}"
    return name  # sp_el1, elr_el1, spsr[n]


def _expressions() -> dict[str, str]:
    """Label -> C expression (an unsigned 64-bit value) for everything the tests compare."""
    exprs = {}
    for reg in regs.CORE_REGISTERS:
        member = f"((struct kvm_regs *)0)->{_core_expression(reg.name)}"
        size = f"((unsigned long long)__builtin_ctz(sizeof({member})) << KVM_REG_SIZE_SHIFT)"
        exprs[f"core:{reg.name}"] = (
            f"KVM_REG_ARM64 | {size} | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG({_core_expression(reg.name)})"
        )
    for name, notation in ARM_ARM_SYSREGS.items():
        exprs[f"sys:{name}"] = f"ARM64_SYS_REG({_fields(notation)})"
    for name, notation in ARM_ARM_ICC.items():
        exprs[f"icc:{name}"] = f"(__ARM64_SYS_REG({_fields(notation)}) & KVM_DEV_ARM_VGIC_SYSREG_INSTR_MASK)"
    for name in ("TIMER_CTL", "TIMER_CNT", "TIMER_CVAL", "PTIMER_CTL", "PTIMER_CVAL"):
        exprs[f"timer:{name}"] = f"KVM_REG_ARM_{name}"
    for name in ("PSCI_VERSION", *(f"SMCCC_ARCH_WORKAROUND_{n}" for n in (1, 2, 3))):
        exprs[f"fw:{name}"] = f"KVM_REG_ARM_{name}"
    for group in gic.Group:
        exprs[f"group:{group.name}"] = f"KVM_DEV_ARM_VGIC_GRP_{group.name}"
    for addr in gic.AddrType:
        exprs[f"addr:{addr.name}"] = f"KVM_VGIC_V3_ADDR_TYPE_{addr.name}"
    for state in regs.MpState:
        exprs[f"mp:{state.name}"] = f"KVM_MP_STATE_{state.name}"
    for feature in regs.VcpuFeature:
        exprs[f"feature:{feature.name}"] = f"KVM_ARM_VCPU_{feature.name}"
    exprs |= {
        "KVM_DEV_TYPE_ARM_VGIC_V3": "KVM_DEV_TYPE_ARM_VGIC_V3",
        "KVM_DEV_ARM_VGIC_CTRL_INIT": "KVM_DEV_ARM_VGIC_CTRL_INIT",
        "KVM_DEV_ARM_VGIC_V3_MPIDR_SHIFT": "KVM_DEV_ARM_VGIC_V3_MPIDR_SHIFT",
        "KVM_DEV_ARM_VGIC_V3_MPIDR_MASK": "KVM_DEV_ARM_VGIC_V3_MPIDR_MASK",
        "KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT": "KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT",
        "VGIC_LEVEL_INFO_LINE_LEVEL": "VGIC_LEVEL_INFO_LINE_LEVEL",
        "KVM_VGIC_V3_DIST_SIZE": "KVM_VGIC_V3_DIST_SIZE",
        "KVM_VGIC_V3_REDIST_SIZE": "KVM_VGIC_V3_REDIST_SIZE",
        "KVM_NR_SPSR": "KVM_NR_SPSR",
    }
    return exprs


@pytest.fixture(scope="module")
def uapi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Compile and run the probe once; label -> value from the kernel headers."""
    if not (HEADERS / "asm" / "kvm.h").exists():
        pytest.fail(f"{HEADERS}/asm/kvm.h is missing: run tools/setup (it installs linux-libc-dev-arm64-cross)")
    if shutil.which("gcc") is None:
        pytest.fail("gcc is missing: run tools/setup")
    exprs = _expressions()
    lines = "\n".join(
        f'    printf("%s %llu\\n", "{label}", (unsigned long long)({expr}));' for label, expr in exprs.items()
    )
    source = (
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\n"
        "#define SZ_64K 0x10000 /* the kernel's, used by KVM_VGIC_V3_*_SIZE but not in uapi */\n"
        '_Static_assert(sizeof(struct kvm_regs) == 864, "struct kvm_regs must have its aarch64 layout");\n'
        f"int main(void) {{\n{lines}\n    return 0;\n}}\n"
    )
    work = tmp_path_factory.mktemp("arm64-uapi")
    (work / "probe.c").write_text(source)
    subprocess.run(
        ["gcc", "-Wall", "-Werror", f"-I{HEADERS}", "-o", str(work / "probe"), str(work / "probe.c")],
        check=True,
        capture_output=True,
    )
    out = subprocess.run([str(work / "probe")], check=True, capture_output=True, text=True).stdout
    values = {label: int(value) for label, value in (line.split() for line in out.splitlines())}
    assert values.keys() == exprs.keys()
    return values


def test_core_register_ids_match_struct_kvm_regs(uapi: dict[str, int]) -> None:
    assert len(regs.CORE_REGISTERS) == 31 + 3 + 2 + regs.KVM_NR_SPSR + 32 + 2
    assert regs.KVM_NR_SPSR == uapi["KVM_NR_SPSR"]
    for reg in regs.CORE_REGISTERS:
        assert reg.id == uapi[f"core:{reg.name}"], reg.name
    assert regs.CORE["v31"].size == 16 and regs.CORE["fpcr"].size == 4 and regs.CORE["pc"].size == 8


def test_system_register_ids(uapi: dict[str, int]) -> None:
    assert set(regs.SYSTEM) == set(ARM_ARM_SYSREGS)
    for name, reg in regs.SYSTEM.items():
        assert reg.id == uapi[f"sys:{name}"], name
        assert reg.size == 8


def test_timer_ids_follow_the_header_including_its_swap(uapi: dict[str, int]) -> None:
    ids = {
        "TIMER_CTL": timer.TIMER_CTL,
        "TIMER_CNT": timer.TIMER_CNT,
        "TIMER_CVAL": timer.TIMER_CVAL,
        "PTIMER_CTL": timer.PTIMER_CTL,
        "PTIMER_CVAL": timer.PTIMER_CVAL,
    }
    for name, reg in ids.items():
        assert reg.id == uapi[f"timer:{name}"], name
    assert {reg.id for reg in timer.TIMER_REGISTERS} == {reg.id for reg in ids.values()}


def test_firmware_register_ids(uapi: dict[str, int]) -> None:
    for reg in regs.FIRMWARE_REGISTERS:
        assert reg.id == uapi[f"fw:{reg.name}"], reg.name


def test_enums_match_the_header(uapi: dict[str, int]) -> None:
    for state in regs.MpState:
        assert state == uapi[f"mp:{state.name}"]
    for feature in regs.VcpuFeature:
        assert feature == uapi[f"feature:{feature.name}"]
    for group in gic.Group:
        assert group == uapi[f"group:{group.name}"]
    for addr in gic.AddrType:
        assert addr == uapi[f"addr:{addr.name}"]
    assert gic.DEVICE_TYPE_VGIC_V3 == uapi["KVM_DEV_TYPE_ARM_VGIC_V3"]
    assert gic.CTRL_INIT == uapi["KVM_DEV_ARM_VGIC_CTRL_INIT"]
    assert gic.DIST_SIZE == uapi["KVM_VGIC_V3_DIST_SIZE"]
    assert gic.REDIST_SIZE == uapi["KVM_VGIC_V3_REDIST_SIZE"]


def test_vgic_attribute_encodings(uapi: dict[str, int]) -> None:
    assert gic.MPIDR_SHIFT == uapi["KVM_DEV_ARM_VGIC_V3_MPIDR_SHIFT"]
    assert gic.LEVEL_INFO_SHIFT == uapi["KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT"]
    assert gic.LINE_LEVEL == uapi["VGIC_LEVEL_INFO_LINE_LEVEL"]
    mask = uapi["KVM_DEV_ARM_VGIC_V3_MPIDR_MASK"]
    mpidr = 0x12_8034_5678  # Aff3 0x12, Aff2 0x34, Aff1 0x56, Aff0 0x78, bit 31 RES1
    for attr in gic.redistributor_attrs(mpidr) + gic.cpu_interface_attrs(mpidr, icc_ctlr=6 << 8):
        assert (attr.attr & mask) >> uapi["KVM_DEV_ARM_VGIC_V3_MPIDR_SHIFT"] == 0x1234_5678, attr.name
    icc = {a.name: a.attr & ~mask for a in gic.cpu_interface_attrs(mpidr, icc_ctlr=7 << 8)}
    assert icc.keys() == ARM_ARM_ICC.keys()
    for name, encoding in icc.items():
        assert encoding == uapi[f"icc:{name}"], name
