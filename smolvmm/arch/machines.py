"""The guest architectures smolvmm knows, by the name bundles record, and the one this host runs."""

from __future__ import annotations

import importlib
import platform

from smolvmm.arch.interface import Arch
from smolvmm.errors import BundleError, HypervisorError

ARCHES = ("x86_64", "arm64")
"""The names of the architectures smolvmm knows; each one's module is imported when first asked for
(a restore on one host never loads the other's)."""
_HOST_NAMES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}


def arch_named(name: str) -> Arch:
    """The architecture a bundle names; BundleError for one smolvmm does not know."""
    if name not in ARCHES:
        raise BundleError(f"the bundle is for {name}, an architecture smolvmm does not know")
    arch: Arch = importlib.import_module(f"smolvmm.arch.{name}.machine").ARCH
    return arch


def host_arch_name() -> str:
    """The name of this host's architecture, without importing its module."""
    name = _HOST_NAMES.get(platform.machine().lower())
    if name is None:
        raise HypervisorError(f"smolvmm runs on x86_64 and arm64 hosts, not {platform.machine()}")
    return name


def host_arch() -> Arch:
    """The architecture of this host's CPUs: the guests its hypervisor runs."""
    return arch_named(host_arch_name())
