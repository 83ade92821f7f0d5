"""What the monitor asks of a guest architecture: its memory map, its platform devices, how Linux
is loaded into it. Each architecture package has the same modules (``layout``, ``boot``,
``image``, ``regs``, ``state``) and a ``machine`` module whose ``ARCH`` implements ``Arch``;
``smolvmm.arch.machines`` picks one by name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from smolvmm.host.memory import GuestMemory


@dataclass(frozen=True)
class PlatformDevice:
    """A device every machine of an architecture has, where it has it: ``kind`` as bundles name
    it, its bus, register window and interrupt line (x86_64: a GSI; arm64: an SPI)."""

    kind: str
    bus: Literal["pio", "mmio"]
    base: int
    size: int
    irq: int


@dataclass(frozen=True)
class BootEntry:
    """Where the boot vCPU starts a loaded kernel, and the boot protocol's argument register value."""

    entry: int
    argument: int


@dataclass(frozen=True)
class HostOffer:
    """What this host's hypervisor takes as saved vCPU state, as its backend reports it: on x86_64
    the XSAVE area's exact size, the CPUID leaves (function, index) -> (eax, ebx, ecx, edx) it
    supports and the MSRs it can save and restore (an arm64 host offers none of these)."""

    xsave_size: int
    cpuid: Mapping[tuple[int, int], tuple[int, int, int, int]]
    msrs: frozenset[int]


@dataclass(frozen=True)
class AdmittedVcpu:
    """A saved vCPU's record as plain data, every value within what the host takes; a
    measured-only restore leaves out what the host lacks: ``dropped`` values, each line of
    ``left_out`` naming some ("field: what")."""

    state: dict[str, Any]
    dropped: int = 0
    left_out: tuple[str, ...] = ()


class Arch(Protocol):
    """One guest architecture, as plain data and pure functions (no hypervisor)."""

    @property
    def name(self) -> str:
        """The architecture as bundles record it: "x86_64" or "arm64"."""
        ...

    @property
    def platform_devices(self) -> tuple[PlatformDevice, ...]:
        """The devices every machine has besides its virtio devices."""
        ...

    def ram_regions(self, size: int) -> list[tuple[int, int]]:
        """(gpa, size) regions for ``size`` bytes of guest RAM, clear of device windows."""
        ...

    def virtio_slot(self, index: int) -> tuple[int, int]:
        """(MMIO base, interrupt line) of the ``index``-th virtio-mmio device."""
        ...

    def load_linux(
        self,
        memory: GuestMemory,
        kernel: bytes,
        initrd: bytes | None,
        cmdline: str,
        vcpus: int,
        virtio_count: int,
    ) -> BootEntry:
        """Load ``kernel`` (the architecture's image format), ``initrd`` and ``cmdline`` into
        ``memory`` with the firmware tables (ACPI, device tree) that describe ``vcpus`` and the
        first ``virtio_count`` virtio slots; ImageError or ConfigError when they do not fit."""
        ...

    def admit_vcpu_state(self, record: Mapping[str, Any], offer: HostOffer, *, strict: bool) -> AdmittedVcpu:
        """A saved vCPU (a ``smolformat.<arch>.VcpuState`` value) as plain data, if the
        architecture and ``offer`` take every value; BundleError "field: what" otherwise. Values
        the host lacks are refused when ``strict``, else left out."""
        ...

    def admit_vm_state(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """The saved VM-wide state (interrupt controllers, timers) as plain data, if the
        architecture takes every value; BundleError "field: what" otherwise."""
        ...
