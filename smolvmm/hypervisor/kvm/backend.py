"""Linux KVM behind the monitor's hypervisor interface (smolvmm.hypervisor.interface)."""

from __future__ import annotations

from smolvmm.arch.interface import HostOffer
from smolvmm.host.kvmprobe import probe
from smolvmm.hypervisor.interface import Capabilities
from smolvmm.hypervisor.kvm.ioctls import Cap
from smolvmm.hypervisor.kvm.system import Kvm
from smolvmm.hypervisor.kvm.x86_64 import X86Vm

# x86_64 platform addresses KVM needs below 4 GiB, inside the MMIO gap, clear of devices.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000


class KvmHypervisor:
    """An open /dev/kvm; ``flavour`` says whether it is hardware-assisted or PVM."""

    def __init__(self) -> None:
        self.kvm = Kvm()
        self.flavour = f"kvm-{probe().kind}"
        check = self.kvm.check_extension
        self.capabilities = Capabilities(
            ioeventfd=bool(check(Cap.KVM_CAP_IOEVENTFD)),
            irqfd=bool(check(Cap.KVM_CAP_IRQFD)),
            irqchip=bool(check(Cap.KVM_CAP_IRQCHIP)),
        )

    @property
    def offer(self) -> HostOffer:
        """KVM_CAP_XSAVE2's XSAVE size, KVM_GET_SUPPORTED_CPUID and KVM_GET_MSR_INDEX_LIST."""
        kvm = self.kvm
        cpuid = {(f, i): (a, b, c, d) for f, i, _flags, a, b, c, d in kvm.supported_cpuid}
        return HostOffer(kvm.xsave_size, cpuid, frozenset(kvm.msr_index_list))

    def create_vm(self) -> X86Vm:
        """A VM with KVM's in-kernel PIC, IOAPIC, LAPICs and PIT."""
        vm = X86Vm(self.kvm.create_vm(), self.kvm)
        try:
            vm.set_tss_address(TSS_ADDR)
            vm.set_identity_map_address(IDENTITY_MAP_ADDR)
            vm.create_irqchip()
            vm.create_pit()
        except BaseException:
            vm.close()
            raise
        return vm

    def close(self) -> None:
        self.kvm.close()
