"""The architecture's rules for an x86_64 snapshot: which MSRs it saves, how far the TSC may
drift unscaled, and the TSC deadline a restore re-arms.

The hypervisor backend reads and writes the registers themselves (``Vcpu.save_state`` and
``restore_state`` in smolvmm.hypervisor.interface) and applies these rules.
"""

from __future__ import annotations

from smolvmm.arch.x86_64 import msrs

TSC_TOLERANCE_PPM = 250


def saved_msr_indices(supported: list[int]) -> list[int]:
    """The MSRs a snapshot saves, in restore order: every MSR the hypervisor can save, TSC first."""
    rest = [index for index in supported if index != msrs.MSR_IA32_TSC]
    return [msrs.MSR_IA32_TSC, *rest] if msrs.MSR_IA32_TSC in supported else rest


def tsc_needs_scaling(saved_khz: int, host_khz: int) -> bool:
    """Whether a guest whose TSC ran at ``saved_khz`` must be scaled to run on a ``host_khz`` TSC."""
    return bool(saved_khz) and abs(saved_khz - host_khz) * 1_000_000 > TSC_TOLERANCE_PPM * saved_khz


def rearm_tsc_deadline(values: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Saved (index, value) MSRs with a TSC deadline of 0 replaced by the saved TSC.

    A deadline of 0 would leave the LAPIC timer disarmed for good if the guest was between ticks;
    arming it at the restored TSC fires it at once and the guest re-arms (as Firecracker does).
    """
    tsc = next((v for i, v in values if i == msrs.MSR_IA32_TSC), 0)
    return [(i, tsc if i == msrs.MSR_IA32_TSC_DEADLINE and v == 0 else v) for i, v in values]
