"""The per-vCPU architected generic timer state and its one-reg ids.

The guest sees two EL1 timers: the virtual timer (CNTV_*, counting CNTVCT = CNTPCT - CNTVOFF) and
the physical timer (CNTP_*). KVM does not expose CNTVOFF as a register on Linux 6.1: writing
the virtual count (``TIMER_CNT``) makes KVM set CNTVOFF = host counter - value, so saving the
count and writing it back resumes guest time where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

from .regs import OneReg, sysreg

# KVM_REG_ARM_TIMER_CNT and KVM_REG_ARM_TIMER_CVAL carry each other's encodings (CNTVCT_EL0 is
# 3,3,14,0,2; CNTV_CVAL_EL0 is 3,3,14,3,2). The uapi header says the swap is ABI, so the ids
# below follow the header, not the architecture.
TIMER_CTL = sysreg("CNTV_CTL_EL0", 3, 3, 14, 3, 1)
TIMER_CNT = sysreg("CNTVCT_EL0", 3, 3, 14, 3, 2)
TIMER_CVAL = sysreg("CNTV_CVAL_EL0", 3, 3, 14, 0, 2)
PTIMER_CTL = sysreg("CNTP_CTL_EL0", 3, 3, 14, 2, 1)
PTIMER_CVAL = sysreg("CNTP_CVAL_EL0", 3, 3, 14, 2, 2)

TIMER_REGISTERS: tuple[OneReg, ...] = (TIMER_CNT, TIMER_CVAL, TIMER_CTL, PTIMER_CVAL, PTIMER_CTL)
"""Restore order: the count first (it fixes CNTVOFF), then compare values, then the control
registers, so no timer is enabled against a stale offset. The physical count is the host's and
is not restored."""

# CNTx_CTL_EL0 bits.
CTL_ENABLE = 1 << 0
CTL_IMASK = 1 << 1
CTL_ISTATUS = 1 << 2  # read-only: the condition is met


@dataclass(frozen=True)
class TimerState:
    """One vCPU's EL1 timer state as a snapshot holds it."""

    virtual_count: int  # CNTVCT_EL0 at save time; restoring it re-derives CNTVOFF
    virtual_ctl: int
    virtual_cval: int
    physical_ctl: int
    physical_cval: int

    def __post_init__(self) -> None:
        for field in ("virtual_count", "virtual_cval", "physical_cval"):
            if not 0 <= getattr(self, field) < 1 << 64:
                raise ValueError(f"timer {field} does not fit in 64 bits")
        for field in ("virtual_ctl", "physical_ctl"):
            if getattr(self, field) & ~(CTL_ENABLE | CTL_IMASK | CTL_ISTATUS):
                raise ValueError(f"timer {field} {getattr(self, field):#x} sets reserved bits")

    def registers(self) -> list[tuple[OneReg, int]]:
        """(register, value) pairs in restore order; ISTATUS is dropped (it is read-only)."""
        writable = ~CTL_ISTATUS
        values = {
            TIMER_CNT: self.virtual_count,
            TIMER_CVAL: self.virtual_cval,
            TIMER_CTL: self.virtual_ctl & writable,
            PTIMER_CVAL: self.physical_cval,
            PTIMER_CTL: self.physical_ctl & writable,
        }
        return [(reg, values[reg]) for reg in TIMER_REGISTERS]
