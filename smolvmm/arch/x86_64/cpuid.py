"""The CPUID a vCPU sees: KVM's supported set, adjusted per vCPU (APIC id, topology, hypervisor bit)."""

from __future__ import annotations

CpuidEntry = tuple[int, int, int, int, int, int, int]  # function, index, flags, eax, ebx, ecx, edx

HYPERVISOR_BIT = 1 << 31  # leaf 1 ECX
TSC_DEADLINE_BIT = 1 << 24  # leaf 1 ECX
HTT_BIT = 1 << 28  # leaf 1 EDX
LEVEL_SMT, LEVEL_CORE = 1, 2


def _topology_leaf(index: int, apic_id: int, vcpus: int) -> tuple[int, int, int, int]:
    """Leaf 0xB/0x1F sub-leaf ``index``: one thread per core, ``vcpus`` cores in one package."""
    if index == 0:
        return 0, 1, (LEVEL_SMT << 8) | index, apic_id
    if index == 1:
        return max(vcpus - 1, 0).bit_length(), vcpus, (LEVEL_CORE << 8) | index, apic_id
    return 0, 0, index, apic_id


def vcpu_cpuid(supported: list[CpuidEntry], vcpu_id: int, vcpus: int, tsc_deadline: bool = False) -> list[CpuidEntry]:
    """The CPUID table for vCPU ``vcpu_id`` of ``vcpus``; its APIC id equals its index.

    ``tsc_deadline``: the hypervisor emulates the LAPIC timer's TSC-deadline mode, which the CPUID
    it reports as supported need not say; the guest then arms its timer with one MSR write instead
    of programming the LAPIC's count, as QEMU and Firecracker let it.
    """
    entries: list[CpuidEntry] = []
    for function, index, flags, eax, ebx, ecx, edx in supported:
        if function == 1:
            ebx = (ebx & 0xFFFF) | (vcpus << 16) | (vcpu_id << 24)
            ecx |= HYPERVISOR_BIT | (TSC_DEADLINE_BIT if tsc_deadline else 0)
            edx = edx | HTT_BIT if vcpus > 1 else edx & ~HTT_BIT
        elif function in (0xB, 0x1F):
            eax, ebx, ecx, edx = _topology_leaf(index, vcpu_id, vcpus)
        elif function == 4:
            eax = (eax & 0x03FFFFFF) | ((vcpus - 1) << 26)
        elif function == 0xA:
            eax = ebx = ecx = edx = 0  # no virtual PMU: the guest must not program perf counters
        entries.append((function, index, flags, eax, ebx, ecx, edx))
    return entries
