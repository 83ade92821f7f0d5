"""The CPUID a vCPU sees: KVM's supported set, adjusted per vCPU (APIC id, topology, caches, hypervisor bit)."""

from __future__ import annotations

import functools
import re
import struct

CpuidEntry = tuple[int, int, int, int, int, int, int]  # function, index, flags, eax, ebx, ecx, edx

HYPERVISOR_BIT = 1 << 31  # leaf 1 ECX
TSC_DEADLINE_BIT = 1 << 24  # leaf 1 ECX
HTT_BIT = 1 << 28  # leaf 1 EDX
TOPOEXT_BIT = 1 << 22  # leaf 0x80000001 ECX: AMD's cache (0x8000001D) and core (0x8000001E) leaves are valid
LEVEL_SMT, LEVEL_CORE = 1, 2
AMD_SIZES, AMD_CACHES, AMD_CORE_IDS = 0x80000008, 0x8000001D, 0x8000001E
SHARING_MASK = 0xFFF << 14  # leaf 4 and 0x8000001D EAX: logical processors sharing this cache, less one
LAST_LEVEL = 3
BRAND_LEAVES = (0x80000002, 0x80000003, 0x80000004)  # the processor's name, 16 bytes each, NUL-terminated


def _topology_leaf(index: int, apic_id: int, vcpus: int) -> tuple[int, int, int, int]:
    """Leaf 0xB/0x1F sub-leaf ``index``: one thread per core, ``vcpus`` cores in one package."""
    if index == 0:
        return 0, 1, (LEVEL_SMT << 8) | index, apic_id
    if index == 1:
        return max(vcpus - 1, 0).bit_length(), vcpus, (LEVEL_CORE << 8) | index, apic_id
    return 0, 0, index, apic_id


def _cache_sharing(eax: int, vcpus: int) -> int:
    """A cache leaf's EAX (leaf 4 or 0x8000001D, same layout) saying who shares it in our topology:
    each core its own L1 and L2, the whole package one last-level cache, whatever the host's are."""
    sharing = vcpus - 1 if (eax >> 5) & 7 == LAST_LEVEL else 0
    return (eax & ~SHARING_MASK) | (sharing << 14)


@functools.cache
def host_brand() -> str:
    """The host processor's name as its kernel read it (``model name``), or "" where it says none."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            found = re.search(r"^model name\s*:\s*(.*)$", cpuinfo.read(), re.MULTILINE)
    except OSError:
        return ""
    return found.group(1).strip() if found else ""


def _brand_registers(brand: str) -> dict[int, tuple[int, int, int, int]]:
    """Leaves 0x80000002-4 holding ``brand`` (47 characters at most, then NUL)."""
    raw = brand.encode("ascii", "replace")[:47].ljust(48, b"\0")
    return {leaf: struct.unpack_from("<4I", raw, 16 * i) for i, leaf in enumerate(BRAND_LEAVES)}


def vcpu_cpuid(
    supported: list[CpuidEntry], vcpu_id: int, vcpus: int, tsc_deadline: bool = False, brand: str = ""
) -> list[CpuidEntry]:
    """The CPUID table for vCPU ``vcpu_id`` of ``vcpus``; its APIC id equals its index.

    ``tsc_deadline``: the hypervisor emulates the LAPIC timer's TSC-deadline mode, which the CPUID
    it reports as supported need not say; the guest then arms its timer with one MSR write instead
    of programming the LAPIC's count, as QEMU and Firecracker let it.

    The cache leaves describe this machine's topology, not the host's: a guest that finds no
    last-level cache its vCPUs share (AMD's leaves without TOPOEXT, as KVM may report them)
    completes each block request on the vCPU that issued it through an inter-processor interrupt
    and spreads wakeups as if across sockets.

    ``brand``: the processor name to show where KVM reports none (it passes no host name through;
    the guest would otherwise call its CPU "AMD 17/31"), as QEMU's ``-cpu host`` and Firecracker do.
    """
    named = brand and not any(function in BRAND_LEAVES and any(regs) for function, _, _, *regs in supported)
    names = _brand_registers(brand) if named else {}
    amd_caches = any(function == AMD_CACHES for function, *_ in supported)
    entries: list[CpuidEntry] = []
    for function, index, flags, eax, ebx, ecx, edx in supported:
        if function == 1:
            ebx = (ebx & 0xFFFF) | (vcpus << 16) | (vcpu_id << 24)
            ecx |= HYPERVISOR_BIT | (TSC_DEADLINE_BIT if tsc_deadline else 0)
            edx = edx | HTT_BIT if vcpus > 1 else edx & ~HTT_BIT
        elif function in (0xB, 0x1F):
            eax, ebx, ecx, edx = _topology_leaf(index, vcpu_id, vcpus)
        elif function == 4:
            eax = (_cache_sharing(eax, vcpus) & 0x03FFFFFF) | ((vcpus - 1) << 26)
        elif function == 0xA:
            eax = ebx = ecx = edx = 0  # no virtual PMU: the guest must not program perf counters
        elif function == 0x80000001 and amd_caches:
            ecx |= TOPOEXT_BIT
        elif function == AMD_SIZES and amd_caches:
            # ECX: the APIC id's core bits (15:12) and the cores in the package less one (7:0)
            ecx = (ecx & ~0xF0FF) | (max(vcpus - 1, 0).bit_length() << 12) | (vcpus - 1)
        elif function == AMD_CACHES:
            eax = _cache_sharing(eax, vcpus)
        elif function in names:
            eax, ebx, ecx, edx = names[function]
        elif function == AMD_CORE_IDS:
            # extended APIC id; core id with one thread per core; one node, id 0
            eax, ebx, ecx, edx = vcpu_id, vcpu_id & 0xFF, 0, 0
        entries.append((function, index, flags, eax, ebx, ecx, edx))
    return entries
