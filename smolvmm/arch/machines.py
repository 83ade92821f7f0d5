"""The guest architectures smolvmm knows, by the name bundles record, and the one this host runs."""

from __future__ import annotations

import platform

from smolvmm.arch.arm64.machine import ARCH as ARM64
from smolvmm.arch.interface import Arch
from smolvmm.arch.x86_64.machine import ARCH as X86_64
from smolvmm.errors import BundleError, HypervisorError

ARCHES: dict[str, Arch] = {X86_64.name: X86_64, ARM64.name: ARM64}
_HOST_NAMES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}


def arch_named(name: str) -> Arch:
    """The architecture a bundle names; BundleError for one smolvmm does not know."""
    arch = ARCHES.get(name)
    if arch is None:
        raise BundleError(f"the bundle is for {name}, an architecture smolvmm does not know")
    return arch


def host_arch() -> Arch:
    """The architecture of this host's CPUs: the guests its hypervisor runs."""
    name = _HOST_NAMES.get(platform.machine().lower())
    if name is None:
        raise HypervisorError(f"smolvmm runs on x86_64 and arm64 hosts, not {platform.machine()}")
    return ARCHES[name]
