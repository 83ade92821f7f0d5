"""Classifying pages for the raw encoder: zero, first of its contents, or equal to an earlier page.

``PageScanner.classify(view, first_page)`` returns one kind byte per page (``ZERO``, ``NEW``,
``DUP``) and, for ``DUP`` pages, the number of the earliest equal page (pages are numbered across
every view given to one scanner, in order). Equal means byte for byte: a hash only finds the
candidate. (Where hashes of different pages collide, which the native scanner bounds and randomises
against a guest that would slow a save down, a page may be stored again instead of shared.)

Two implementations give the same answer. The native one is C compiled with cffi on first use and
kept in the cache (``smolformat.native``, keyed by the C source, cffi and the
interpreter's ABI): it tests and hashes pages at memory speed, and skips pages the kernel says
were never touched, which read as zero: in a private anonymous mapping, a page that
``/proc/self/pagemap`` shows neither present nor swapped. Chosen over numpy or xxhash because the
loop that remains around a per-page hash or zero test is itself the cost, and C needs no new
dependency (cffi is one already). Where no C compiler or Python headers are found, the pure Python
scanner is used (several times slower).
"""

from __future__ import annotations

import functools
import os
from array import array
from typing import Any

from .layout import PAGE_SIZE
from .native import compiled

ZERO, NEW, DUP = 0, 1, 2
_PAGEMAP_TOUCHED = 3 << 62  # present or swapped; neither means the page reads as zero

_CDEF = """
typedef struct smol_table smol_table;
smol_table *smol_table_new(uint64_t seed);
void smol_table_free(smol_table *table);
int smol_classify(smol_table *table, const uint8_t *base, size_t size, const uint64_t *pagemap,
                  int64_t first_page, int dedup, uint8_t *kinds, int64_t *refs);
"""

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

struct slot { uint64_t hash; int64_t page; const uint8_t *data; };
/* Guest pages are untrusted: a random seed keeps their hashes from being chosen, and a page is
   compared with at most MAX_COLLISIONS others of the same hash (past them it is stored, not shared). */
#define MAX_COLLISIONS 16
typedef struct smol_table { struct slot *slots; size_t mask; size_t used; uint64_t seed; } smol_table;

static int table_init(smol_table *t, size_t capacity) {
    t->slots = malloc(capacity * sizeof(struct slot));
    if (!t->slots) return -1;
    for (size_t i = 0; i < capacity; i++) t->slots[i].page = -1;
    t->mask = capacity - 1;
    t->used = 0;
    return 0;
}

smol_table *smol_table_new(uint64_t seed) {
    smol_table *t = malloc(sizeof *t);
    if (t && table_init(t, 1 << 12)) { free(t); return NULL; }
    if (t) t->seed = seed;
    return t;
}

void smol_table_free(smol_table *t) {
    if (t) { free(t->slots); free(t); }
}

static uint64_t load(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static int is_zero(const uint8_t *p) {
    uint64_t acc = 0;
    for (int i = 0; i < WORDS; i++) acc |= load(p + 8 * i);
    return acc == 0;
}

/* Four independent multiply chains, so the loop runs at load speed; only a lookup key. */
static uint64_t page_hash(const uint8_t *p, uint64_t seed) {
    const uint64_t k = 0x9E3779B97F4A7C15ULL;
    uint64_t a = seed, b = seed ^ 1, c = seed ^ 2, d = seed ^ 3;
    for (int i = 0; i < WORDS; i += 4) {
        a = (a ^ load(p + 8 * i)) * k;
        b = (b ^ load(p + 8 * i + 8)) * k;
        c = (c ^ load(p + 8 * i + 16)) * k;
        d = (d ^ load(p + 8 * i + 24)) * k;
        a ^= a >> 29; b ^= b >> 31; c ^= c >> 27; d ^= d >> 33;
    }
    uint64_t h = a ^ (b << 1 | b >> 63) ^ (c << 2 | c >> 62) ^ (d << 3 | d >> 61);
    return (h ^ h >> 32) * k;
}

static int grow(smol_table *t) {
    smol_table bigger;
    if (table_init(&bigger, (t->mask + 1) * 2)) return -1;
    for (size_t i = 0; i <= t->mask; i++) {
        struct slot s = t->slots[i];
        if (s.page < 0) continue;
        size_t j = s.hash & bigger.mask;
        while (bigger.slots[j].page >= 0) j = (j + 1) & bigger.mask;
        bigger.slots[j] = s;
    }
    free(t->slots);
    bigger.used = t->used;
    bigger.seed = t->seed;
    *t = bigger;
    return 0;
}

/* The earliest page equal to p, or -1 after recording p as the first of its contents. */
static int64_t find_or_add(smol_table *t, const uint8_t *p, int64_t page) {
    uint64_t h = page_hash(p, t->seed);
    size_t j = h & t->mask;
    for (int collisions = 0;; j = (j + 1) & t->mask) {
        struct slot *s = &t->slots[j];
        if (s->page < 0) break;
        if (s->hash != h) continue;
        if (memcmp(s->data, p, PAGE) == 0) return s->page;
        if (++collisions == MAX_COLLISIONS) return -1;
    }
    t->slots[j] = (struct slot){h, page, p};
    t->used++;
    return -1;
}

int smol_classify(smol_table *t, const uint8_t *base, size_t size, const uint64_t *pagemap,
                  int64_t first_page, int dedup, uint8_t *kinds, int64_t *refs) {
    size_t pages = (size + PAGE - 1) / PAGE;
    for (size_t i = 0; i < pages; i++) {
        const uint8_t *p = base + i * PAGE;
        size_t length = size - i * PAGE < PAGE ? size - i * PAGE : PAGE;
        if (pagemap && length == PAGE && (pagemap[i] & (3ULL << 62)) == 0) {
            kinds[i] = 0;
            continue;
        }
        if (length < PAGE) {  /* a tail: never shared */
            size_t k = 0;
            while (k < length && p[k] == 0) k++;
            kinds[i] = k == length ? 0 : 1;
            continue;
        }
        if (is_zero(p)) { kinds[i] = 0; continue; }
        kinds[i] = 1;
        if (!dedup) continue;
        if (2 * (t->used + 1) > t->mask + 1 && grow(t)) return -1;
        int64_t earlier = find_or_add(t, p, first_page + (int64_t)i);
        if (earlier >= 0) { kinds[i] = 2; refs[i] = earlier; }
    }
    return 0;
}
"""


@functools.cache
def native_module() -> Any | None:
    """The compiled scanner module (built on first call), or None."""
    return compiled("_smolformat_pagescan", _CDEF, _SOURCE)


def _anonymous_ranges() -> list[tuple[int, int]]:
    """The private anonymous mappings of this process, (start, end), from /proc/self/maps."""
    ranges = []
    with open("/proc/self/maps", "rb") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if fields[4] == b"0" and fields[1][3:4] == b"p":
                start, end = (int(x, 16) for x in fields[0].split(b"-"))
                ranges.append((start, end))
    return ranges


def _untouched_pagemap(ffi: Any, view: memoryview, anonymous: list[tuple[int, int]], pagemap_fd: int) -> Any | None:
    """For each page of ``view``: its /proc/self/pagemap entry where it lies in one of the private
    anonymous mappings ``anonymous``, else all ones (must be read); None when the kernel cannot tell."""
    address = int(ffi.cast("uintptr_t", ffi.from_buffer(view)))
    size = len(view)
    if address % PAGE_SIZE or size < PAGE_SIZE:
        return None
    pages = size // PAGE_SIZE
    entries = bytearray(b"\xff" * (8 * (-(-size // PAGE_SIZE))))
    target = memoryview(entries)
    try:
        for start, end in anonymous:
            start, end = max(start, address), min(end, address + pages * PAGE_SIZE)
            if start >= end:
                continue
            piece = target[8 * ((start - address) // PAGE_SIZE) : 8 * ((end - address) // PAGE_SIZE)]
            position = start // PAGE_SIZE * 8
            while piece:
                got = os.preadv(pagemap_fd, [piece], position)
                if got <= 0:
                    return None
                piece, position = piece[got:], position + got
    except OSError:
        return None
    return ffi.from_buffer("uint64_t[]", entries)


class PageScanner:
    """Classifies the pages of successive views; a page may be found equal to any page of an earlier
    view, so every view must stay unchanged and alive as long as the scanner."""

    def __init__(self, dedup: bool, native: bool = True) -> None:
        self._dedup = dedup
        self._module = native_module() if native else None
        self._table: Any = None
        self._seen: dict[int, tuple[int, memoryview]] = {}
        # The scanned views do not move while the scanner lives: the mappings are read once.
        self._anonymous: list[tuple[int, int]] = []
        self._pagemap = -1
        if self._module is not None:
            ffi, lib = self._module.ffi, self._module.lib
            table = lib.smol_table_new(int.from_bytes(os.urandom(8), "little"))
            if table == ffi.NULL:
                raise MemoryError("no memory for the page table")
            self._table = ffi.gc(table, lib.smol_table_free)
            try:
                self._anonymous = _anonymous_ranges()
                self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:  # not Linux, or no access: every page is read
                self._anonymous = []

    def close(self) -> None:
        """Release the pagemap file (the scanner stays usable, reading every page)."""
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1

    def __del__(self) -> None:
        self.close()

    @property
    def native(self) -> bool:
        """Whether the compiled scanner does the work."""
        return self._module is not None

    def classify(self, view: memoryview, first_page: int) -> tuple[bytes, array[int]]:
        """Kinds of the pages of ``view`` (numbered from ``first_page``) and, per DUP page, the number
        of the earliest equal one (other entries are meaningless)."""
        pages = -(-len(view) // PAGE_SIZE)
        refs = array("q", bytes(8 * pages))
        if self._module is None:
            return self._classify_python(view, first_page, refs), refs
        ffi, lib = self._module.ffi, self._module.lib
        kinds = bytearray(pages)
        if pages:
            pagemap = _untouched_pagemap(ffi, view, self._anonymous, self._pagemap) if self._pagemap >= 0 else None
            status = lib.smol_classify(
                self._table,
                ffi.from_buffer(view),
                len(view),
                ffi.NULL if pagemap is None else pagemap,
                first_page,
                self._dedup,
                ffi.from_buffer(kinds),
                ffi.from_buffer("int64_t[]", refs),
            )
            if status:
                raise MemoryError("no memory for the page table")
        return bytes(kinds), refs

    def _classify_python(self, view: memoryview, first_page: int, refs: array[int]) -> bytes:
        kinds = bytearray(len(refs))
        zero_page = bytes(PAGE_SIZE)
        for index in range(len(kinds)):
            raw = view[index * PAGE_SIZE : (index + 1) * PAGE_SIZE].tobytes()
            if raw == zero_page[: len(raw)]:
                continue
            kinds[index] = NEW
            if not self._dedup or len(raw) < PAGE_SIZE:
                continue
            # Only a lookup key: a candidate is confirmed byte for byte.
            found = self._seen.get(digest := hash(raw))
            if found is None:
                self._seen[digest] = (first_page + index, view[index * PAGE_SIZE : (index + 1) * PAGE_SIZE])
            elif found[1] == raw:
                kinds[index], refs[index] = DUP, found[0]
        return bytes(kinds)
