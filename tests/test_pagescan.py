"""The page scanner behind the raw encoder: the compiled and the Python one agree, and the kernel's
"never touched" answer is used only where it means zero."""

from __future__ import annotations

import io
import mmap
import os
import random
import shutil

import pytest

from smolformat.layout import PAGE_SIZE
from smolformat.pages import RawEncoder
from smolformat.pagescan import DUP, NEW, ZERO, PageScanner, _anonymous_ranges, _untouched_pagemap, native_module

PAGES = 600


def _memory(seed: int, pages: int = PAGES) -> bytearray:
    """Zero runs, repeated pages (alone, cycled, in runs), near-duplicates and random pages."""
    rng = random.Random(seed)
    memory = bytearray(pages * PAGE_SIZE)
    pool = [rng.randbytes(PAGE_SIZE) for _ in range(6)] + [b"\xcc" * PAGE_SIZE]
    page = 0
    while page < pages:
        choice, count = rng.random(), rng.choice([1, 2, 3, 15, 16, 17, 40])
        for index in range(page, min(pages, page + count)):
            at = index * PAGE_SIZE
            if choice < 0.3:
                continue
            if choice < 0.5:
                memory[at : at + PAGE_SIZE] = rng.choice(pool)
            elif choice < 0.7:
                memory[at : at + PAGE_SIZE] = pool[(index - page) % 6]
            elif choice < 0.8:
                memory[at + rng.randrange(PAGE_SIZE)] = rng.randrange(1, 256)
            else:
                memory[at : at + PAGE_SIZE] = rng.randbytes(PAGE_SIZE)
        page += count
    return memory


@pytest.fixture(scope="module")
def native() -> None:
    if native_module() is None:
        if shutil.which("gcc"):
            pytest.fail("gcc is here, yet the native page scanner did not build")
        pytest.skip("no C compiler: only the Python scanner runs")


@pytest.mark.parametrize("dedup", [True, False])
def test_native_and_python_scanners_agree(native: None, dedup: bool) -> None:
    views = [memoryview(_memory(1)), memoryview(_memory(2))[: 100 * PAGE_SIZE + 123]]
    results = []
    for use_native in (True, False):
        scanner = PageScanner(dedup, native=use_native)
        assert scanner.native == use_native
        first, found = 0, []
        for view in views:
            kinds, refs = scanner.classify(view, first)
            found.append((kinds, [refs[i] if kind == DUP else None for i, kind in enumerate(kinds)]))
            first += len(kinds)
        results.append(found)
    assert results[0] == results[1]
    kinds = results[0][0][0] + results[0][1][0]
    assert kinds.count(ZERO) and kinds.count(NEW) and bool(kinds.count(DUP)) == dedup
    assert results[0][1][0][-1] == NEW  # the 123-byte tail: stored, never shared


@pytest.mark.parametrize(
    "options", [{}, {"min_dedup_run": 1, "min_zero_gap": 1}, {"min_dedup_run": 2, "min_zero_gap": 3}]
)
def test_encoders_write_the_same_bytes(native: None, options: dict[str, int]) -> None:
    regions = [(0, memoryview(_memory(3, 2048))), (1 << 32, memoryview(_memory(4, 1024)))]
    outputs = []
    for use_native in (True, False):
        out = io.BytesIO()
        encoder = RawEncoder(out, native=use_native, **options)
        for start, data in regions:
            encoder.add_region(start, data)
        outputs.append((out.getvalue(), encoder.finish()))
    assert outputs[0] == outputs[1]
    assert len(outputs[0][1]) > 10


def _pagemap(view: memoryview):
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        return _untouched_pagemap(native_module().ffi, view, _anonymous_ranges(), fd)
    finally:
        os.close(fd)


def _anonymous_pages_kept(memory: mmap.mmap) -> tuple[list[int], list[int]]:
    view = memoryview(memory)
    for page in (3, 4, 40):
        view[page * PAGE_SIZE] = 7
    _ = view[10 * PAGE_SIZE]  # read, not written: the shared zero page, present
    entries = _pagemap(view)
    assert entries is not None
    untouched = [page for page in range(64) if not entries[page] >> 62]
    kinds, _ = PageScanner(dedup=True).classify(view, 0)
    return untouched, [page for page, kind in enumerate(kinds) if kind != ZERO]


def test_untouched_anonymous_pages_are_zero_without_reading(native: None) -> None:
    memory = mmap.mmap(-1, 64 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    untouched, stored = _anonymous_pages_kept(memory)
    memory.close()
    assert 3 not in untouched and 10 not in untouched and 40 not in untouched and len(untouched) >= 60
    assert stored == [3, 4, 40]


def _file_pages(memory: mmap.mmap) -> tuple[bool, bytes, list[int]]:
    view = memoryview(memory)
    entries = _pagemap(view)
    all_read = entries is not None and all(entries[page] == 2**64 - 1 for page in range(16))
    kinds, refs = PageScanner(dedup=True).classify(view, 0)
    return all_read, kinds, [refs[page] for page in range(1, 8)]


def test_pages_of_a_file_mapping_are_read_even_when_not_present(native: None, tmp_path) -> None:
    path = tmp_path / "ram.img"
    path.write_bytes(b"\x5a" * (8 * PAGE_SIZE) + bytes(8 * PAGE_SIZE))
    with path.open("rb") as file:
        memory = mmap.mmap(file.fileno(), 16 * PAGE_SIZE, flags=mmap.MAP_PRIVATE)
    all_read, kinds, refs = _file_pages(memory)
    memory.close()
    assert all_read
    assert list(kinds) == [NEW] + [DUP] * 7 + [ZERO] * 8
    assert refs == [0] * 7


def test_every_repeat_is_found_among_many_distinct_pages(native: None) -> None:
    """Found by the compiled scanner whatever the probe sequence: 12,288 distinct pages, then each again."""
    rng = random.Random(5)
    distinct = 12288
    memory = bytearray(rng.randbytes(distinct * PAGE_SIZE) + bytes(distinct * PAGE_SIZE))
    order = list(range(distinct))
    rng.shuffle(order)
    for slot, page in enumerate(order):
        memory[(distinct + slot) * PAGE_SIZE : (distinct + slot + 1) * PAGE_SIZE] = memory[
            page * PAGE_SIZE : (page + 1) * PAGE_SIZE
        ]
    kinds, refs = PageScanner(dedup=True).classify(memoryview(memory), 0)
    assert kinds == bytes([NEW]) * distinct + bytes([DUP]) * distinct
    assert [refs[distinct + slot] for slot in range(distinct)] == order
