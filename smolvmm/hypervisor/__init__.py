"""The hypervisor the monitor runs on, behind one narrow interface (see ``interface``)."""

from __future__ import annotations

from .interface import Hypervisor


def open_hypervisor() -> Hypervisor:
    """This host's hypervisor: Linux KVM (the only backend that can run here)."""
    from .kvm.backend import KvmHypervisor

    return KvmHypervisor()
