"""smolvmm: a virtual machine monitor whose machines start from a snapshot in a fraction of a second.

The public API, re-exported here and imported on first use (so ``python -m smolvmm --help``
and each CLI command pay only for what they touch)::

    async with smolvmm.Machine.boot(smolvmm.MachineConfig(vcpus=2)) as machine:
        await machine.console.wait_for("guest ready")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Machine": "smolvmm.machine",
    "MachineConfig": "smolvmm.config",
    "DiskConfig": "smolvmm.config",
    "NetConfig": "smolvmm.config",
    "parse_size": "smolvmm.config",
    "ExitReason": "smolvmm.vcpu",
    "MachineExit": "smolvmm.vcpu",
    "Console": "smolvmm.console",
    "SmolvmmError": "smolvmm.errors",
    "ConfigError": "smolvmm.errors",
    "HypervisorError": "smolvmm.errors",
    "GuestError": "smolvmm.errors",
    "GuestMemoryError": "smolvmm.errors",
    "GuestTimeout": "smolvmm.errors",
    "BundleError": "smolvmm.errors",
    "ImageError": "smolvmm.errors",
    "RegistryError": "smolvmm.errors",
    "push": "smolvmm.registry.transfer",
    "pull": "smolvmm.registry.transfer",
    "PushResult": "smolvmm.registry.transfer",
    "PullResult": "smolvmm.registry.transfer",
    "Transfer": "smolvmm.registry.transfer",
    "Reference": "smolvmm.registry.reference",
    "default_guest": "smolvmm.images.guest",
    "GuestImage": "smolvmm.images.guest",
    "HostKvm": "smolvmm.hostkvm",
    "probe_host": "smolvmm.hostkvm:probe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module 'smolvmm' has no attribute {name!r}")
    module, _, attribute = where.partition(":")
    value = getattr(importlib.import_module(module), attribute or name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .config import DiskConfig, MachineConfig, NetConfig, parse_size
    from .console import Console
    from .hostkvm import HostKvm
    from .hostkvm import probe as probe_host
    from .errors import (
        BundleError,
        ConfigError,
        GuestError,
        GuestMemoryError,
        GuestTimeout,
        HypervisorError,
        ImageError,
        RegistryError,
        SmolvmmError,
    )
    from .images.guest import GuestImage, default_guest
    from .machine import Machine
    from .registry.reference import Reference
    from .registry.transfer import PullResult, PushResult, Transfer, pull, push
    from .vcpu import ExitReason, MachineExit
