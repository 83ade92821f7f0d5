"""Declarations compiled once into the cache, loaded from it after, rebuilt when damaged."""

from __future__ import annotations

from pathlib import Path

import pytest

from smolvmm.host.ffi import declare

CDEF = "struct probe { uint32_t a; uint64_t b; }; int getpid(void);"


def test_declarations_are_cached_and_reloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = declare("probe", CDEF)
    [cached] = (tmp_path / "smolvmm" / "ffi").glob("_smolvmm_ffi_probe_*.py")
    second = declare("probe", CDEF)
    assert type(second) is not type(first)  # the out-of-line FFI, not a parsing one
    for ffi in (first, second):
        assert ffi.sizeof("struct probe") == 16 and ffi.offsetof("struct probe", "b") == 8
        assert ffi.dlopen(None).getpid() > 0
    cached.write_text("this is not python(")
    assert declare("probe", CDEF).sizeof("struct probe") == 16
    assert not cached.exists()  # dropped, so the next process writes it again
    declare("probe", CDEF)
    assert cached.exists()


def test_an_unwritable_cache_still_declares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    assert declare("probe", CDEF).sizeof("struct probe") == 16
