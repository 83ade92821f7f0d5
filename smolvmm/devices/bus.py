"""Dispatch of guest port and MMIO accesses to the device that owns the address.

Called from vCPU threads on every I/O exit. An access no device owns is ignored (reads
return all ones, as on a real bus) and logged at debug level: a guest probing for
hardware that is not there must never stop the monitor.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

ReadHandler = Callable[[int, int], int]  # (offset, size) -> value
WriteHandler = Callable[[int, int, int], None]  # (offset, size, value)


class Bus:
    """Non-overlapping address ranges, each owned by one device."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, ReadHandler, WriteHandler]] = []
        self.words: list[tuple[int, int, bool]] = []

    def add(self, base: int, length: int, read: ReadHandler, write: WriteHandler) -> None:
        """Route accesses to [base, base + length) to ``read``/``write`` with offsets from ``base``."""
        i = bisect.bisect(self._starts, base)
        if (i and self._ranges[i - 1][1] > base) or (i < len(self._starts) and self._starts[i] < base + length):
            raise ValueError(f"{self.name} range {base:#x}+{length:#x} overlaps another device")
        self._starts.insert(i, base)
        self._ranges.insert(i, (base, base + length, read, write))

    def add_word(self, address: int, word: int, clears: bool) -> None:
        """Let the hypervisor serve 4-byte accesses to ``address`` (in a range already added) from
        the 32-bit word at host address ``word`` (``host.words.SharedWord``) without a call here:
        reads return it or, with ``clears``, writes clear the bits written. The range's handlers
        must do the same, for every hypervisor that does not."""
        if self._find(address) is None:
            raise ValueError(f"{self.name} word at {address:#x} is in no device's range")
        self.words.append((address, word, clears))

    def _find(self, address: int) -> tuple[int, int, ReadHandler, WriteHandler] | None:
        i = bisect.bisect(self._starts, address) - 1
        if i >= 0 and address < self._ranges[i][1]:
            return self._ranges[i]
        return None

    def read(self, address: int, size: int) -> int:
        found = self._find(address)
        if found is None:
            log.debug("%s read of %d bytes at %#x: no device", self.name, size, address)
            return (1 << (8 * size)) - 1
        return found[2](address - found[0], size)

    def write(self, address: int, size: int, value: int) -> None:
        found = self._find(address)
        if found is None:
            log.debug("%s write of %d bytes (%#x) at %#x: no device", self.name, size, value, address)
            return
        found[3](address - found[0], size, value)
