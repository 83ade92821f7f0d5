"""The hypervisor the monitor runs on, behind one narrow interface (see ``interface``)."""

from __future__ import annotations

from smolvmm.hypervisor.interface import Hypervisor

# Imported with the monitor, not on first use, so that a restore's timed phases hold the
# restore's own work (the backend's modules are part of the run path's import time).
from smolvmm.hypervisor.kvm.backend import KvmHypervisor


def open_hypervisor() -> Hypervisor:
    """This host's hypervisor: Linux KVM (the only backend that can run here)."""
    return KvmHypervisor()
