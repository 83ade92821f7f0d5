"""How a machine ended: the reason and its detail, as ``Machine.wait()`` and ``stop()`` return it."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ExitReason(enum.Enum):
    """How a machine ended."""

    POWEROFF = "poweroff"
    REBOOT = "reboot"
    CRASH = "crash"
    STOPPED = "stopped"


@dataclass(frozen=True)
class MachineExit:
    """A machine's end: why, and a detail saying what ended it (e.g. the vCPU that crashed)."""

    reason: ExitReason
    detail: str = ""
