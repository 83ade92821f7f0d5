"""SharedWord: the 32-bit word native code reads and clears beside Python."""

from __future__ import annotations

import ctypes

import pytest

from smolvmm.host import words


@pytest.mark.parametrize("native", [True, False])
def test_set_clear_put_and_the_address(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not native:
        monkeypatch.setattr(words, "native_module", lambda: None)
    word = words.SharedWord()
    if native and not word.address:
        pytest.skip("no C compiler")
    assert bool(word.address) == native  # no address to hand native code when Python's alone
    word.set(0b101)
    word.set(0b010)
    word.clear(0b001)
    assert word.get() == 0b110
    if native:
        assert ctypes.c_uint32.from_address(word.address).value == 0b110
    word.put(0xFFFF_FFFF)
    word.clear(0xFFFF_0000)
    assert word.get() == 0xFFFF
