"""smolformat: the .smolmachine bundle format (spec/smolmachine.md), declared with construct.

Writing::

    digest = write_bundle(path, BundleContents(config=..., vcpus=[...], vm_state=..., devices=[...],
                                               memory=[ram_view, ...], disks=["base.img"],
                                               metadata=make_metadata("kvm-hardware")),
                          memory_encoding="raw")   # or "zstd"

Reading::

    with open_bundle(path) as bundle:           # checks structure; never reads RAM or disks
        bundle.config, bundle.vcpus, bundle.vm_state, bundle.devices, bundle.metadata
        for gpa, length, file_offset in bundle.memory_extents():   # raw encoding
            ...  # mmap(bundle.fileno(), length, MAP_FIXED|MAP_PRIVATE, offset=file_offset)
        bundle.read_memory_into([ram_view, ...])                     # any encoding
        bundle.disk(0).materialise("disk0.img"); bundle.kernel; bundle.initrd
        bundle.verify()                                              # full hashing

Structured values are construct Containers shaped like the declarations in ``config``,
``devices``, ``x86_64`` and ``arm64``; x86_64 structs are byte-compatible with ``<linux/kvm.h>``.
Every problem with a file raises ``FormatError`` with a stable ``code``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING, Any


def _import_lazily(name: str) -> None:
    """Put ``name`` in sys.modules as a module that loads on first attribute access."""
    if name in sys.modules or (spec := importlib.util.find_spec(name)) is None or spec.loader is None:
        return
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)


# construct imports pdb (for its Debugger) at start-up: ~10 % of a restore's imports, for nothing.
_import_lazily("pdb")

from .config import Config, Metadata  # noqa: E402
from .devices import DEVICE_KINDS, DeviceConfig, DeviceRecord  # noqa: E402
from .errors import FormatError  # noqa: E402
from .payloads import ARCHES  # noqa: E402
from .reader import Bundle, DiskExtent, DiskImage, MemoryExtent, SectionInfo, open_bundle, verify_bundle  # noqa: E402

if TYPE_CHECKING:
    from .repack import repack_bundle
    from .workingset import set_working_set
    from .writer import BundleContents, make_metadata, write_bundle

# Writing is imported on first use: a restore only reads.
_LAZY = {
    "repack_bundle": "repack",
    "set_working_set": "workingset",
    "BundleContents": "writer",
    "make_metadata": "writer",
    "write_bundle": "writer",
}

__all__ = [
    "DEVICE_KINDS",
    "Bundle",
    "BundleContents",
    "Config",
    "DeviceConfig",
    "DeviceRecord",
    "DiskExtent",
    "DiskImage",
    "FormatError",
    "MemoryExtent",
    "Metadata",
    "SectionInfo",
    "arm64",
    "make_metadata",
    "open_bundle",
    "repack_bundle",
    "set_working_set",
    "verify_bundle",
    "write_bundle",
    "x86_64",
]


def __getattr__(name: str) -> Any:
    # ``smolformat.arm64`` and ``smolformat.x86_64`` are imported on first use (see payloads.payload).
    if name in ARCHES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
