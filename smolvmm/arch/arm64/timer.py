"""The per-vCPU architected generic timer state and its one-reg ids.

The guest sees two EL1 timers: the virtual timer (CNTV_*, counting CNTVCT = CNTPCT - CNTVOFF) and
the physical timer (CNTP_*). KVM does not expose CNTVOFF as a register on Linux 6.1: writing
the virtual count (``TIMER_CNT``) makes KVM set CNTVOFF = host counter - value, so saving the
count and writing it back resumes guest time where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from smolvmm.arch.arm64.regs import OneReg, sysreg

# KVM_REG_ARM_TIMER_CNT and KVM_REG_ARM_TIMER_CVAL carry each other's encodings (CNTVCT_EL0 is
# 3,3,14,0,2; CNTV_CVAL_EL0 is 3,3,14,3,2). The uapi header says the swap is ABI, so the ids
# below follow the header, not the architecture.
TIMER_CTL = sysreg("CNTV_CTL_EL0", 3, 3, 14, 3, 1)
TIMER_CNT = sysreg("CNTVCT_EL0", 3, 3, 14, 3, 2)
TIMER_CVAL = sysreg("CNTV_CVAL_EL0", 3, 3, 14, 0, 2)
PTIMER_CTL = sysreg("CNTP_CTL_EL0", 3, 3, 14, 2, 1)
PTIMER_CVAL = sysreg("CNTP_CVAL_EL0", 3, 3, 14, 2, 2)

VIRTUAL_TIMER_REGISTERS: tuple[OneReg, ...] = (TIMER_CNT, TIMER_CVAL, TIMER_CTL)
PHYSICAL_TIMER_REGISTERS: tuple[OneReg, ...] = (PTIMER_CVAL, PTIMER_CTL)
"""KVM exposes these from Linux 6.4 on; 6.1's KVM_GET_REG_LIST omits them and reading them fails
with ENOENT (seen on Debian's 6.1 arm64 kernel, tests/test_arm64_kvm_real.py). A save holds a
PHYSICAL timer record only where the hypervisor lists them; before 6.4 KVM itself keeps the
physical timer and no VMM can carry it across a snapshot."""
TIMER_REGISTERS: tuple[OneReg, ...] = VIRTUAL_TIMER_REGISTERS + PHYSICAL_TIMER_REGISTERS
"""Restore order: the count first (it fixes CNTVOFF), then compare values, then the control
registers, so no timer is enabled against a stale offset. The physical count is the host's and
is not restored."""

# CNTx_CTL_EL0 bits.
CTL_ENABLE = 1 << 0
CTL_IMASK = 1 << 1
CTL_ISTATUS = 1 << 2  # read-only: the condition is met


class Timer(IntEnum):
    """Which EL1 timer a record holds: the format's ``timer`` field."""

    VIRTUAL = 0
    PHYSICAL = 1


@dataclass(frozen=True)
class TimerState:
    """One EL1 timer of a vCPU, as the format's timer record (timer, cntvoff, ctl, cval) holds it.

    ``count`` is the virtual timer's CNTVCT_EL0 at save time, stored in the record's ``cntvoff``
    field: writing it back makes KVM re-derive CNTVOFF. The physical timer's count is the host's,
    so its record holds 0.
    """

    timer: Timer
    count: int
    ctl: int
    cval: int

    def __post_init__(self) -> None:
        for field in ("count", "cval"):
            if not 0 <= getattr(self, field) < 1 << 64:
                raise ValueError(f"timer {field} does not fit in 64 bits")
        if self.ctl & ~(CTL_ENABLE | CTL_IMASK | CTL_ISTATUS):
            raise ValueError(f"timer control {self.ctl:#x} sets reserved bits")
        if self.timer == Timer.PHYSICAL and self.count:
            raise ValueError("the physical timer's count is the host's and is not saved")

    def registers(self) -> list[tuple[OneReg, int]]:
        """(register, value) pairs in restore order; ISTATUS is dropped (it is read-only)."""
        ctl = self.ctl & ~CTL_ISTATUS
        if self.timer == Timer.VIRTUAL:
            return [(TIMER_CNT, self.count), (TIMER_CVAL, self.cval), (TIMER_CTL, ctl)]
        return [(PTIMER_CVAL, self.cval), (PTIMER_CTL, ctl)]
