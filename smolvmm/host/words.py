"""A 32-bit word in C memory that native code (the vCPU loop, hypervisor/kvm/run.c) may read
and clear while Python sets bits in it: a virtio-mmio transport's InterruptStatus.

Built like the other C helpers (``smolformat.native``); where they cannot be built the word is
Python's alone (``address`` 0) and no native code is handed it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from smolformat.native import compiled


@functools.cache
def native_module() -> Any | None:
    source = Path(__file__).with_name("words.c").read_text()
    return compiled("_smolvmm_words", source[source.index("/* cdef:") : source.index("/* cdef end */")], source)


class SharedWord:
    """Atomic get, put, set (OR) and clear (AND NOT) of one word; ``address`` for native code."""

    def __init__(self) -> None:
        native = native_module()
        if native is None:
            self._lib: Any = None
            self._cell: Any = [0]
            self.address = 0
        else:
            self._lib = native.lib
            self._cell = native.ffi.new("uint32_t *")
            self.address = int(native.ffi.cast("uintptr_t", self._cell))

    def get(self) -> int:
        return int(self._lib.smol_word_get(self._cell)) if self._lib else int(self._cell[0])

    def put(self, value: int) -> None:
        if self._lib:
            self._lib.smol_word_put(self._cell, value)
        else:
            self._cell[0] = value

    def set(self, bits: int) -> None:
        if self._lib:
            self._lib.smol_word_set(self._cell, bits)
        else:
            self._cell[0] |= bits

    def clear(self, bits: int) -> None:
        if self._lib:
            self._lib.smol_word_clear(self._cell, bits)
        else:
            self._cell[0] &= ~bits
