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
    "MINIMAL_KERNEL": "smolvmm.config",
    "DiskConfig": "smolvmm.config",
    "NetConfig": "smolvmm.config",
    "PortForward": "smolvmm.config",
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
    "AgentError": "smolvmm.errors",
    "AgentTooOld": "smolvmm.errors",
    "GuestFileError": "smolvmm.errors",
    "OutputLimitError": "smolvmm.errors",
    "ExecResult": "smolvmm.guest_exec",
    "Process": "smolvmm.guest_exec",
    "GuestFiles": "smolvmm.guest_files",
    "BundleError": "smolvmm.errors",
    "ImageError": "smolvmm.errors",
    "ImageRecipe": "smolvmm.imagebuild",
    "ReadyCondition": "smolvmm.imagebuild",
    "build_image": "smolvmm.imagebuild",
    "bundle_image_config": "smolvmm.oci.imageconfig",
    "image_process": "smolvmm.imagerun",
    "ImageConfig": "smolvmm.oci.imageconfig",
    "load_smolfile": "smolvmm.smolfile",
    "RegistryError": "smolvmm.errors",
    "push": "smolvmm.registry.transfer",
    "pull": "smolvmm.registry.transfer",
    "PushResult": "smolvmm.registry.transfer",
    "PullResult": "smolvmm.registry.transfer",
    "Transfer": "smolvmm.registry.transfer",
    "Reference": "smolvmm.registry.reference",
    "default_guest": "smolvmm.images.guest",
    "GuestImage": "smolvmm.images.guest",
    "minimal_guest": "smolvmm.images.guest",
    "minimal_kernel": "smolvmm.kernel.build",
    "BuiltKernel": "smolvmm.kernel.build",
    "HostKvm": "smolvmm.hostkvm",
    "probe_host": "smolvmm.hostkvm:probe",
    "generate_signing_key": "smolvmm.signing",
    "sign_bundle": "smolvmm.signing",
    "verify_signed_bundle": "smolvmm.signing",
    "Jail": "smolvmm.jail",
    "ProgressBar": "smolvmm.progress",
    "CacheEntry": "smolvmm.images.cache",
    "cache_entries": "smolvmm.images.cache",
    "cache_root": "smolvmm.images.cache",
    "prune_cache": "smolvmm.images.cache",
    "report_progress": "smolvmm.progress",
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
    from .config import MINIMAL_KERNEL, DiskConfig, MachineConfig, NetConfig, PortForward, parse_size
    from .console import Console
    from .hostkvm import HostKvm
    from .hostkvm import probe as probe_host
    from .errors import (
        AgentError,
        AgentTooOld,
        BundleError,
        ConfigError,
        GuestError,
        GuestFileError,
        GuestMemoryError,
        GuestTimeout,
        HypervisorError,
        ImageError,
        OutputLimitError,
        RegistryError,
        SmolvmmError,
    )
    from .guest_exec import ExecResult, Process
    from .guest_files import GuestFiles
    from .imagebuild import ImageRecipe, ReadyCondition, build_image
    from .imagerun import image_process
    from .images.cache import CacheEntry, cache_entries, cache_root, prune_cache
    from .images.guest import GuestImage, default_guest, minimal_guest
    from .jail import Jail
    from .kernel.build import BuiltKernel, minimal_kernel
    from .machine import Machine
    from .oci.imageconfig import ImageConfig, bundle_image_config
    from .progress import ProgressBar, report_progress
    from .registry.reference import Reference
    from .registry.transfer import PullResult, PushResult, Transfer, pull, push
    from .signing import generate_signing_key, sign_bundle, verify_signed_bundle
    from .smolfile import load_smolfile
    from .vcpu import ExitReason, MachineExit
