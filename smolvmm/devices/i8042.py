"""Just enough of the i8042 keyboard controller for a guest reboot: command 0xFE pulses CPU reset.

The FADT tells Linux there is no 8042 to probe, so the kernel's `reboot=k` path
(`outb(0xfe, 0x64)`) is the only user; every other access reads as an idle controller.
"""

from __future__ import annotations

from collections.abc import Callable

DATA, COMMAND = 0, 4
CMD_RESET_CPU = 0xFE


class I8042:
    def __init__(self, reset: Callable[[], None]) -> None:
        self._reset = reset

    def read(self, offset: int, size: int) -> int:
        return 0  # status: output buffer empty, input buffer empty; data: nothing pending

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == COMMAND and value & 0xFF == CMD_RESET_CPU:
            self._reset()
