"""smolvmm.arch.arm64's one-reg ids against a real arm64 KVM: listed by KVM_GET_REG_LIST and readable.

Runs only on an arm64 host with /dev/kvm, such as the emulated one ``tools/arm64-kvm`` boots
(``tools/arm64-kvm python3 -m pytest -p no:cacheprovider tests/test_arm64_kvm_real.py``);
everywhere else it skips. The ioctls are issued with ``fcntl.ioctl`` on byte buffers, their numbers
computed as asm-generic's _IO/_IOR/_IOW/_IOWR (arm64 uses the generic encoding), independently of
the x86_64 KVM backend.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
from collections.abc import Iterator

import pytest

from smolvmm.arch.arm64 import regs, timer

pytestmark = pytest.mark.skipif(
    platform.machine() != "aarch64" or not os.path.exists("/dev/kvm"),
    reason="needs arm64 KVM: run it inside tools/arm64-kvm (an emulated arm64 host)",
)

_KVMIO = 0xAE
_VCPU_INIT = "<I7I"  # struct kvm_vcpu_init {__u32 target; __u32 features[7];}


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | _KVMIO << 8 | nr


KVM_GET_API_VERSION = _ioc(0, 0x00, 0)
KVM_CREATE_VM = _ioc(0, 0x01, 0)
KVM_CREATE_VCPU = _ioc(0, 0x41, 0)
KVM_GET_ONE_REG = _ioc(1, 0xAB, 16)  # struct kvm_one_reg {__u64 id; __u64 addr;}
KVM_SET_ONE_REG = _ioc(1, 0xAC, 16)
KVM_ARM_VCPU_INIT = _ioc(1, 0xAE, struct.calcsize(_VCPU_INIT))
KVM_ARM_PREFERRED_TARGET = _ioc(2, 0xAF, struct.calcsize(_VCPU_INIT))
KVM_GET_REG_LIST = _ioc(3, 0xB0, 8)  # struct kvm_reg_list {__u64 n; __u64 reg[];}


class Vcpu:
    """One initialised vCPU (PSCI 0.2) of a fresh VM."""

    def __init__(self, vm: int, index: int, target: int) -> None:
        self.fd = fcntl.ioctl(vm, KVM_CREATE_VCPU, index)
        features = [1 << regs.VcpuFeature.PSCI_0_2] + [0] * 6
        fcntl.ioctl(self.fd, KVM_ARM_VCPU_INIT, struct.pack(_VCPU_INIT, target, *features))

    def reg_list(self) -> set[int]:
        """KVM_GET_REG_LIST: asked with n = 0 it fails with E2BIG and says how many there are."""
        probe = bytearray(8)
        with pytest.raises(OSError) as excinfo:
            fcntl.ioctl(self.fd, KVM_GET_REG_LIST, probe)
        assert excinfo.value.errno == errno.E2BIG
        (count,) = struct.unpack("<Q", probe)
        buffer = bytearray(struct.pack("<Q", count) + bytes(8 * count))
        fcntl.ioctl(self.fd, KVM_GET_REG_LIST, buffer)
        return set(struct.unpack_from(f"<{count}Q", buffer, 8))

    def get(self, reg: regs.OneReg) -> bytes:
        value = ctypes.create_string_buffer(reg.size)
        fcntl.ioctl(self.fd, KVM_GET_ONE_REG, struct.pack("<QQ", reg.id, ctypes.addressof(value)))
        return value.raw

    def set(self, reg: regs.OneReg, data: bytes) -> None:
        value = ctypes.create_string_buffer(data, reg.size)
        fcntl.ioctl(self.fd, KVM_SET_ONE_REG, struct.pack("<QQ", reg.id, ctypes.addressof(value)))


@pytest.fixture(scope="module")
def vm() -> Iterator[tuple[int, int]]:
    """(VM fd, the host's preferred vCPU target)."""
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    assert fcntl.ioctl(kvm, KVM_GET_API_VERSION) == 12
    vm_fd = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    init = bytearray(struct.calcsize(_VCPU_INIT))
    fcntl.ioctl(vm_fd, KVM_ARM_PREFERRED_TARGET, init)
    yield vm_fd, struct.unpack(_VCPU_INIT, init)[0]
    os.close(vm_fd)
    os.close(kvm)


@pytest.fixture(scope="module")
def vcpu(vm: tuple[int, int]) -> Vcpu:
    return Vcpu(vm[0], 0, vm[1])


@pytest.fixture(scope="module")
def listed(vcpu: Vcpu) -> set[int]:
    return vcpu.reg_list()


def test_every_core_and_fpsimd_register_is_listed_and_readable(vcpu: Vcpu, listed: set[int]) -> None:
    missing = [reg.name for reg in regs.CORE_REGISTERS if reg.id not in listed]
    assert missing == []
    for reg in regs.CORE_REGISTERS:
        assert len(vcpu.get(reg)) == reg.size


def test_kvm_lists_no_core_register_smolvmm_lacks(listed: set[int]) -> None:
    core = {reg.id for reg in regs.CORE_REGISTERS}
    group = regs.KVM_REG_ARM64 | regs.KVM_REG_ARM_CORE
    extra = sorted(
        hex(reg) for reg in listed if reg & ~(0xF << regs.KVM_REG_SIZE_SHIFT) & ~0xFFFF == group and reg not in core
    )
    assert extra == []


def test_reset_state_is_what_boot_expects(vcpu: Vcpu) -> None:
    """PSTATE after KVM_ARM_VCPU_INIT is EL1h with DAIF masked (0x3c5)."""
    assert int.from_bytes(vcpu.get(regs.CORE["pstate"]), "little") == 0x3C5


@pytest.mark.parametrize("name", ["x0", "pc", "v31", "fpcr"])
def test_core_register_round_trips(vcpu: Vcpu, name: str) -> None:
    reg = regs.CORE[name]
    value = bytes(range(1, reg.size + 1))
    if name == "fpcr":
        value = (0x0340_0000).to_bytes(4, "little")  # RMode and FZ: bits KVM keeps
    vcpu.set(reg, value)
    assert vcpu.get(reg) == value


@pytest.mark.parametrize(
    "reg", [*regs.SYSTEM_REGISTERS, *timer.VIRTUAL_TIMER_REGISTERS, *regs.FIRMWARE_REGISTERS], ids=lambda reg: reg.name
)
def test_system_timer_and_firmware_ids_are_accepted(vcpu: Vcpu, listed: set[int], reg: regs.OneReg) -> None:
    assert len(vcpu.get(reg)) == reg.size
    assert reg.id in listed


@pytest.mark.parametrize("reg", timer.PHYSICAL_TIMER_REGISTERS, ids=lambda reg: reg.name)
def test_physical_timer_ids_are_accepted_where_listed(vcpu: Vcpu, listed: set[int], reg: regs.OneReg) -> None:
    if reg.id not in listed:
        with pytest.raises(FileNotFoundError):  # unlisted means unreadable too: nothing to save
            vcpu.get(reg)
        pytest.skip("this kernel's KVM does not expose the physical timer (it does from Linux 6.4)")
    assert len(vcpu.get(reg)) == reg.size


@pytest.mark.parametrize("index", [0, 1, 15, 16, 17])
def test_mpidr_is_what_kvm_resets_it_to(vm: tuple[int, int], vcpu: Vcpu, index: int) -> None:
    if index:
        vcpu = Vcpu(vm[0], index, vm[1])
    assert int.from_bytes(vcpu.get(regs.SYSTEM["MPIDR_EL1"]), "little") == regs.kvm_mpidr(index)
