"""smolvmm: a virtual machine monitor whose machines start from a snapshot in a fraction of a second.

The public API, re-exported here and imported on first use (so ``python -m smolvmm --help``
and each CLI command pay only for what they touch)::

    async with smolvmm.Machine.boot(smolvmm.MachineConfig(vcpus=2)) as machine:
        await machine.console.wait_for("guest ready")

``__all__`` is exactly the API the README documents. Developer utilities (the demo guest, the
host probe, the cache) live in the modules that own them; ``smolvmm.<name>`` still reaches those
once exported here for a while, with a DeprecationWarning naming their home.
"""

from __future__ import annotations

import importlib
import warnings

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing, which every CLI start would pay

_EXPORTS = {
    "Machine": "smolvmm.monitor.machine",
    "MachineConfig": "smolvmm.config",
    "MINIMAL_KERNEL": "smolvmm.config",
    "DiskConfig": "smolvmm.config",
    "NetConfig": "smolvmm.config",
    "PortForward": "smolvmm.config",
    "ExitReason": "smolvmm.monitor.exit",
    "MachineExit": "smolvmm.monitor.exit",
    "Console": "smolvmm.monitor.console",
    "ExecResult": "smolvmm.agent.process",
    "Process": "smolvmm.agent.process",
    "GuestFiles": "smolvmm.agent.files",
    "SmolvmmError": "smolvmm.errors",
    "ConfigError": "smolvmm.errors",
    "UsageError": "smolvmm.errors",
    "HypervisorError": "smolvmm.errors",
    "GuestError": "smolvmm.errors",
    "GuestTimeout": "smolvmm.errors",
    "AgentError": "smolvmm.errors",
    "AgentTooOld": "smolvmm.errors",
    "GuestFileError": "smolvmm.errors",
    "OutputLimitError": "smolvmm.errors",
    "BundleError": "smolvmm.errors",
    "ImageError": "smolvmm.errors",
    "RegistryError": "smolvmm.errors",
    "ImageRecipe": "smolvmm.oci.build",
    "ReadyCondition": "smolvmm.oci.build",
    "build_image": "smolvmm.oci.build",
    "load_smolfile": "smolvmm.oci.smolfile",
    "ImageConfig": "smolvmm.oci.imageconfig",
    "bundle_image_config": "smolvmm.oci.imageconfig",
    "image_process": "smolvmm.oci.run",
    "push": "smolvmm.registry.transfer",
    "pull": "smolvmm.registry.transfer",
    "PushResult": "smolvmm.registry.transfer",
    "PullResult": "smolvmm.registry.transfer",
    "Transfer": "smolvmm.registry.transfer",
    "Reference": "smolvmm.registry.reference",
    "generate_signing_key": "smolvmm.monitor.signing",
    "sign_bundle": "smolvmm.monitor.signing",
    "verify_signed_bundle": "smolvmm.monitor.signing",
    "Jail": "smolvmm.host.jail",
    "record_working_set": "smolvmm.monitor.workingset",
    "report_progress": "smolvmm.progress",
    "ProgressBar": "smolvmm.progress",
}

_UTILITIES = {
    "parse_size": "smolvmm.config",
    "GuestImage": "smolvmm.images.guest",
    "default_guest": "smolvmm.images.guest",
    "minimal_guest": "smolvmm.images.guest",
    "BuiltKernel": "smolvmm.kernel.build",
    "minimal_kernel": "smolvmm.kernel.build",
    "HostKvm": "smolvmm.host.kvmprobe",
    "probe_host": "smolvmm.host.kvmprobe:probe",
    "cache_root": "smolvmm.config",
    "CacheEntry": "smolvmm.images.cache",
    "cache_entries": "smolvmm.images.cache",
    "prune_cache": "smolvmm.images.cache",
    "GuestMemoryError": "smolvmm.errors",  # the devices' own: no API call raises it
}
"""Names outside the API (developer utilities, mostly): each lives in the module (``module[:attribute]``)
that owns it, and ``smolvmm.<name>`` is a deprecated alias of it."""

__all__ = [
    "AgentError",
    "AgentTooOld",
    "BundleError",
    "ConfigError",
    "Console",
    "DiskConfig",
    "ExecResult",
    "ExitReason",
    "GuestError",
    "GuestFileError",
    "GuestFiles",
    "GuestTimeout",
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
    "UsageError",
    "build_image",
    "bundle_image_config",
    "generate_signing_key",
    "image_process",
    "load_smolfile",
    "pull",
    "push",
    "record_working_set",
    "report_progress",
    "sign_bundle",
    "verify_signed_bundle",
]


def _load(where: str, name: str) -> object:
    module, _, attribute = where.partition(":")
    return getattr(importlib.import_module(module), attribute or name)


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        value = globals()[name] = _load(_EXPORTS[name], name)
        return value
    if name in _UTILITIES:
        module, _, attribute = _UTILITIES[name].partition(":")
        warnings.warn(
            f"smolvmm.{name} is deprecated: it is not the API; use {module}.{attribute or name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return _load(_UTILITIES[name], name)
    raise AttributeError(f"module 'smolvmm' has no attribute {name!r}")


if TYPE_CHECKING:
    from smolvmm.agent.files import GuestFiles
    from smolvmm.agent.process import ExecResult, Process
    from smolvmm.config import MINIMAL_KERNEL, DiskConfig, MachineConfig, NetConfig, PortForward
    from smolvmm.errors import (
        AgentError,
        AgentTooOld,
        BundleError,
        ConfigError,
        GuestError,
        GuestFileError,
        GuestTimeout,
        HypervisorError,
        ImageError,
        OutputLimitError,
        RegistryError,
        SmolvmmError,
        UsageError,
    )
    from smolvmm.host.jail import Jail
    from smolvmm.monitor.console import Console
    from smolvmm.monitor.exit import ExitReason, MachineExit
    from smolvmm.monitor.machine import Machine
    from smolvmm.monitor.signing import generate_signing_key, sign_bundle, verify_signed_bundle
    from smolvmm.monitor.workingset import record_working_set
    from smolvmm.oci.build import ImageRecipe, ReadyCondition, build_image
    from smolvmm.oci.imageconfig import ImageConfig, bundle_image_config
    from smolvmm.oci.run import image_process
    from smolvmm.oci.smolfile import load_smolfile
    from smolvmm.progress import ProgressBar, report_progress
    from smolvmm.registry.reference import Reference
    from smolvmm.registry.transfer import PullResult, PushResult, Transfer, pull, push
