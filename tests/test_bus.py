"""The port/MMIO bus: dispatch by address, all ones where no device lives."""

from __future__ import annotations

import logging

import pytest

from smolvmm.devices.bus import Bus


def test_dispatch_relative_offsets_and_unowned_addresses(caplog: pytest.LogCaptureFixture) -> None:
    bus = Bus("port I/O")
    seen: list[tuple[int, int, int]] = []
    bus.add(0x3F8, 8, lambda offset, size: offset, lambda offset, size, value: seen.append((offset, size, value)))
    assert bus.read(0x3FA, 1) == 2
    bus.write(0x3FF, 1, 0x41)
    assert seen == [(7, 1, 0x41)]
    with caplog.at_level(logging.DEBUG, logger="smolvmm.devices.bus"):
        assert bus.read(0x400, 1) == 0xFF
        assert bus.read(0x3F0, 4) == 0xFFFFFFFF
        bus.write(0x80, 1, 0)  # ignored
    assert "no device" in caplog.text


def test_overlapping_ranges_are_refused() -> None:
    bus = Bus("MMIO")
    bus.add(0x1000, 0x1000, lambda o, s: 0, lambda o, s, v: None)
    for base, length in ((0x1800, 0x10), (0x0800, 0x1000), (0x0FFF, 2)):
        with pytest.raises(ValueError, match="overlaps"):
            bus.add(base, length, lambda o, s: 0, lambda o, s, v: None)
    bus.add(0x2000, 0x1000, lambda o, s: 0, lambda o, s, v: None)


def test_a_word_register_must_lie_in_a_device_range() -> None:
    bus = Bus("MMIO")
    bus.add(0x1000, 0x1000, lambda o, s: 0, lambda o, s, v: None)
    bus.add_word(0x1060, 0x7F00_0000, False)
    with pytest.raises(ValueError, match="no device"):
        bus.add_word(0x2060, 0x7F00_0000, True)
    assert bus.words == [(0x1060, 0x7F00_0000, False)]
