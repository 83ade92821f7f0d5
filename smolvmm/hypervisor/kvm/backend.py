"""Linux KVM behind the monitor's hypervisor interface (smolvmm.hypervisor.interface)."""

from __future__ import annotations

from ...hostkvm import probe
from ..interface import CpuidEntry
from .ioctls import Cap
from .system import Kvm
from .vm import KvmVm

# x86_64 platform addresses KVM needs below 4 GiB, inside the MMIO gap, clear of devices.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000


class KvmHypervisor:
    """An open /dev/kvm; ``flavour`` says whether it is hardware-assisted or PVM."""

    def __init__(self) -> None:
        self.kvm = Kvm()
        self.flavour = f"kvm-{probe().kind}"
        self._mmap_size = self.kvm.vcpu_mmap_size()
        self._cpuid: list[CpuidEntry] | None = None
        self._msrs: list[int] | None = None

    def create_vm(self) -> KvmVm:
        """A VM with KVM's in-kernel PIC, IOAPIC, LAPICs and PIT."""
        vm = KvmVm(self.kvm.create_vm(), self._mmap_size)
        try:
            vm.set_tss_address(TSS_ADDR)
            vm.set_identity_map_address(IDENTITY_MAP_ADDR)
            vm.create_irqchip()
            vm.create_pit()
        except BaseException:
            vm.close()
            raise
        return vm

    def supported_cpuid(self) -> list[CpuidEntry]:
        if self._cpuid is None:
            self._cpuid = self.kvm.supported_cpuid()
        return self._cpuid

    def saved_msrs(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: every MSR KVM saves and restores for a vCPU."""
        if self._msrs is None:
            self._msrs = self.kvm.msr_index_list()
        return self._msrs

    def xsave_size(self) -> int:
        return max(4096, self.kvm.check_extension(Cap.KVM_CAP_XSAVE2))

    def close(self) -> None:
        self.kvm.close()
