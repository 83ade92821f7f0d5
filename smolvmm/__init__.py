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
    "Machine": "smolvmm.monitor.machine",
    "MachineConfig": "smolvmm.config",
    "MINIMAL_KERNEL": "smolvmm.config",
    "DiskConfig": "smolvmm.config",
    "NetConfig": "smolvmm.config",
    "PortForward": "smolvmm.config",
    "parse_size": "smolvmm.config",
    "ExitReason": "smolvmm.monitor.vcpu",
    "MachineExit": "smolvmm.monitor.vcpu",
    "Console": "smolvmm.monitor.console",
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
    "ExecResult": "smolvmm.agent.process",
    "Process": "smolvmm.agent.process",
    "GuestFiles": "smolvmm.agent.files",
    "BundleError": "smolvmm.errors",
    "ImageError": "smolvmm.errors",
    "ImageRecipe": "smolvmm.oci.build",
    "ReadyCondition": "smolvmm.oci.build",
    "build_image": "smolvmm.oci.build",
    "bundle_image_config": "smolvmm.oci.imageconfig",
    "image_process": "smolvmm.oci.run",
    "ImageConfig": "smolvmm.oci.imageconfig",
    "load_smolfile": "smolvmm.oci.smolfile",
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
    "HostKvm": "smolvmm.host.kvmprobe",
    "probe_host": "smolvmm.host.kvmprobe:probe",
    "generate_signing_key": "smolvmm.monitor.signing",
    "sign_bundle": "smolvmm.monitor.signing",
    "verify_signed_bundle": "smolvmm.monitor.signing",
    "Jail": "smolvmm.host.jail",
    "ProgressBar": "smolvmm.progress",
    "CacheEntry": "smolvmm.images.cache",
    "cache_entries": "smolvmm.images.cache",
    "cache_root": "smolvmm.host.cache",
    "prune_cache": "smolvmm.images.cache",
    "report_progress": "smolvmm.progress",
}

__all__ = [
    "AgentError",
    "AgentTooOld",
    "BuiltKernel",
    "BundleError",
    "CacheEntry",
    "ConfigError",
    "Console",
    "DiskConfig",
    "ExecResult",
    "ExitReason",
    "GuestError",
    "GuestFileError",
    "GuestFiles",
    "GuestImage",
    "GuestMemoryError",
    "GuestTimeout",
    "HostKvm",
    "HypervisorError",
    "ImageConfig",
    "ImageError",
    "ImageRecipe",
    "Jail",
    "MINIMAL_KERNEL",
    "Machine",
    "MachineConfig",
    "MachineExit",
    "NetConfig",
    "OutputLimitError",
    "PortForward",
    "Process",
    "ProgressBar",
    "PullResult",
    "PushResult",
    "ReadyCondition",
    "Reference",
    "RegistryError",
    "SmolvmmError",
    "Transfer",
    "build_image",
    "bundle_image_config",
    "cache_entries",
    "cache_root",
    "default_guest",
    "generate_signing_key",
    "image_process",
    "load_smolfile",
    "minimal_guest",
    "minimal_kernel",
    "parse_size",
    "probe_host",
    "prune_cache",
    "pull",
    "push",
    "report_progress",
    "sign_bundle",
    "verify_signed_bundle",
]


def __getattr__(name: str) -> Any:
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module 'smolvmm' has no attribute {name!r}")
    module, _, attribute = where.partition(":")
    value = getattr(importlib.import_module(module), attribute or name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from smolvmm.agent.files import GuestFiles
    from smolvmm.agent.process import ExecResult, Process
    from smolvmm.config import MINIMAL_KERNEL, DiskConfig, MachineConfig, NetConfig, PortForward, parse_size
    from smolvmm.errors import (
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
    from smolvmm.host.cache import cache_root
    from smolvmm.host.jail import Jail
    from smolvmm.host.kvmprobe import HostKvm
    from smolvmm.host.kvmprobe import probe as probe_host
    from smolvmm.images.cache import CacheEntry, cache_entries, prune_cache
    from smolvmm.images.guest import GuestImage, default_guest, minimal_guest
    from smolvmm.kernel.build import BuiltKernel, minimal_kernel
    from smolvmm.monitor.console import Console
    from smolvmm.monitor.machine import Machine
    from smolvmm.monitor.signing import generate_signing_key, sign_bundle, verify_signed_bundle
    from smolvmm.monitor.vcpu import ExitReason, MachineExit
    from smolvmm.oci.build import ImageRecipe, ReadyCondition, build_image
    from smolvmm.oci.imageconfig import ImageConfig, bundle_image_config
    from smolvmm.oci.run import image_process
    from smolvmm.oci.smolfile import load_smolfile
    from smolvmm.progress import ProgressBar, report_progress
    from smolvmm.registry.reference import Reference
    from smolvmm.registry.transfer import PullResult, PushResult, Transfer, pull, push
