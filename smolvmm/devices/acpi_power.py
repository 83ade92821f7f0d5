"""The hardware-reduced ACPI sleep control/status register: a guest `poweroff` ends the VM."""

from __future__ import annotations

from collections.abc import Callable

from smolvmm.arch.x86_64.acpi import sleep_request


class AcpiSleepRegister:
    def __init__(self, power_off: Callable[[], None]) -> None:
        self._power_off = power_off

    def read(self, offset: int, size: int) -> int:
        return 0  # sleep status: no wake event

    def write(self, offset: int, size: int, value: int) -> None:
        if sleep_request(value):
            self._power_off()
