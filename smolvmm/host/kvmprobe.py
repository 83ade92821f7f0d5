"""What /dev/kvm is on this host: hardware-assisted KVM, PVM (kvm_pvm), or none."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["hardware", "pvm", "none"]

_HARDWARE_MODULES = ("kvm_intel", "kvm_amd")


@dataclass(frozen=True)
class HostKvm:
    """The kind of /dev/kvm and one line a user can read about it."""

    kind: Kind
    explanation: str


def probe(dev: Path = Path("/dev/kvm"), sys_module: Path = Path("/sys/module")) -> HostKvm:
    """Say what ``dev`` is, judging by which KVM modules ``sys_module`` lists."""
    try:
        os.close(os.open(dev, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return HostKvm("none", f"this host has no usable {dev} ({exc.strerror}): KVM tests cannot run here")
    if (sys_module / "kvm_pvm").exists():
        return HostKvm(
            "pvm",
            f"this host's {dev} is PVM (kvm_pvm), a software KVM without VT-x/AMD-V: a standard guest"
            " kernel's ring-0 code is emulated at ~2 M instructions/s and dies in early boot;"
            " only tools/nested-kvm runs standard guests here",
        )
    loaded = [name for name in _HARDWARE_MODULES if (sys_module / name).exists()]
    if loaded:
        return HostKvm("hardware", f"this host's {dev} is hardware-assisted KVM ({loaded[0]})")
    return HostKvm(
        "none",
        f"{dev} opens but neither kvm_intel, kvm_amd nor kvm_pvm is loaded: unknown KVM, not used",
    )
