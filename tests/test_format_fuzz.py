"""Mutated bundles only ever open as a bundle or raise FormatError: no other exception, no hang
(a deadline per case), and no memory far beyond the file's size (a traced peak per case)."""

from __future__ import annotations

import mmap
import shutil
import struct
import tempfile
import tracemalloc
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smolformat import FormatError, open_bundle
from smolformat.config import Config
from smolformat.crafting import (
    build_frame,
    edit_table,
    find_entry,
    parse_frame,
    reseal,
    rewrite_section,
    section_digest,
)
from smolformat.layout import ENTRY_SIZE, HEADER_SIZE, MAX_SECTIONS, SectionKind
from smolformat.pages import PageIndex

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
VALID = {
    name: (VECTORS / f"valid-{name}.smolmachine").read_bytes() for name in ("x86_64-raw", "x86_64-zstd", "arm64-raw")
}
# Examples name their base file: a repr of its bytes would be larger than the file.
BASES = st.sampled_from(sorted(VALID))
SCRATCH = Path(tempfile.mkdtemp(prefix="smolformat-fuzz-")) / "fuzz.smolmachine"
MAX_DECODE = 1 << 20
# What the reader may allocate for a file of n bytes: parsed values cost a few times their bytes
# (Python objects), decoding a bounded block; never what a length or count inside the file claims.
PEAK_PER_FILE_BYTE = 16
PEAK_CONSTANT = 1 << 20
FUZZ = settings(max_examples=1000, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _scratch_removed() -> Iterator[None]:
    yield
    shutil.rmtree(SCRATCH.parent, ignore_errors=True)


# Where each entry field lies in a section table entry, and its width.
ENTRY_FIELDS = {
    "kind": (0, 2),
    "flags": (2, 2),
    "encoding": (4, 2),
    "index": (8, 4),
    "offset": (16, 8),
    "length": (24, 8),
    "logical_length": (32, 8),
}


def exercise(data: bytes) -> None:
    """Open, verify and decode ``data`` as a caller would: FormatError is the only allowed failure,
    and the reader's peak memory stays within the file's size times a small factor."""
    SCRATCH.write_bytes(data)
    tracemalloc.start()  # only while the reader runs: tracing hypothesis too would triple the time
    try:
        _use()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= PEAK_PER_FILE_BYTE * len(data) + PEAK_CONSTANT, f"{peak} bytes for a {len(data)}-byte file"


def _use() -> None:
    try:
        with open_bundle(SCRATCH) as bundle:
            bundle.verify()
            if sum(r.size for r in bundle.config.ram) <= MAX_DECODE:
                memory = [mmap.mmap(-1, r.size) for r in bundle.config.ram]
                bundle.read_memory_into(memory)
            if bundle.memory_encoding == "raw":
                bundle.memory_extents()
            for index in range(bundle.disk_count):
                disk = bundle.disk(index)
                if 0 < disk.size <= MAX_DECODE:  # caller buffers are mmaps: not the reader's memory
                    disk.read_into(mmap.mmap(-1, disk.size))
            assert bundle.kernel is None or isinstance(bundle.kernel, bytes)
    except FormatError as exc:
        assert exc.code and "\n" not in str(exc)


@FUZZ
@given(
    name=BASES,
    flips=st.lists(st.integers(0, 10**9), min_size=1, max_size=8),
    seal=st.booleans(),
)
def test_bit_flips(name: str, flips: list[int], seal: bool) -> None:
    base = VALID[name]
    data = bytearray(base)
    for flip in flips:
        data[flip % len(data)] ^= 1 << (flip % 8)
    exercise(reseal(bytes(data)) if seal else bytes(data))


@FUZZ
@given(name=BASES, cut=st.integers(0, 10**9))
def test_truncation(name: str, cut: int) -> None:
    base = VALID[name]
    exercise(base[: cut % len(base)])


@FUZZ
@given(
    name=BASES,
    entry=st.integers(0, 63),
    field=st.sampled_from(sorted(ENTRY_FIELDS)),
    value=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 1 << 20), st.sampled_from([0, 1, 2**63, 2**64 - 1])),
)
def test_random_table_values(name: str, entry: int, field: str, value: int) -> None:
    base = VALID[name]
    header, entries = parse_frame(base)
    at, width = ENTRY_FIELDS[field]
    position = header["table_offset"] + (entry % len(entries)) * ENTRY_SIZE + at
    data = base[:position] + (value % (1 << 8 * width)).to_bytes(width, "little") + base[position + width :]
    exercise(reseal(data))


@FUZZ
@given(
    name=BASES,
    section=st.integers(0, 63),
    at=st.integers(0, 10**9),
    junk=st.binary(min_size=1, max_size=12),
)
def test_resealed_section_content(name: str, section: int, at: int, junk: bytes) -> None:
    """Change bytes inside one section and fix its digest, so the payload parsers see them."""
    base = VALID[name]
    header, entries = parse_frame(base)
    index = section % len(entries)
    entry = entries[index]
    if entry["length"] == 0:
        return
    data = bytearray(base)
    start = entry["offset"] + at % entry["length"]
    end = min(start + len(junk), entry["offset"] + entry["length"])
    data[start:end] = junk[: end - start]
    digest = section_digest(bytes(data[entry["offset"] : entry["offset"] + entry["length"]]))
    digest_at = header["table_offset"] + index * ENTRY_SIZE + 40
    data[digest_at : digest_at + 32] = digest
    exercise(reseal(bytes(data)))


@FUZZ
@given(
    name=BASES,
    field=st.sampled_from([8, 10, 12, 16, 24, 32, 40, 44]),
    value=st.integers(0, 2**64 - 1),
)
def test_random_header_values(name: str, field: int, value: int) -> None:
    base = VALID[name]
    width = 2 if field in (8, 10) else 4 if field in (12, 40, 44) else 8
    data = base[:field] + (value % (1 << 8 * width)).to_bytes(width, "little") + base[field + width :]
    exercise(reseal(data) if len(data) >= HEADER_SIZE and struct.unpack_from("<Q", data, 32)[0] < len(data) else data)


def _rewrite_index(data: bytes, kind: SectionKind, edit: Any) -> bytes:
    def change(payload: bytearray) -> None:
        index = PageIndex.parse(bytes(payload))
        value = {
            "encoding": index.encoding,
            "granule": index.granule,
            "extents": [dict(e) for e in index.extents],
        }
        edit(value)
        payload[:] = PageIndex.build(value)

    return rewrite_section(data, kind, change)


_WIDE = st.one_of(
    st.integers(0, 2**64 - 1),
    st.integers(0, 1 << 24),
    st.sampled_from([0, 1, 4095, 4096, 1 << 20, 1 << 22, 1 << 26, 2**63, 2**64 - 1]),
)


@FUZZ
@given(
    name=BASES,
    kind=st.sampled_from([SectionKind.MEMORY_INDEX, SectionKind.DISK_INDEX]),
    extent=st.integers(0, 63),
    field=st.sampled_from(["address", "length", "offset", "stored"]),
    value=_WIDE,
    granule=st.one_of(st.none(), st.integers(0, 2**32 - 1), st.sampled_from([1 << n for n in range(10, 32)])),
)
def test_random_index_values(
    name: str, kind: SectionKind, extent: int, field: str, value: int, granule: int | None
) -> None:
    """Random lengths and offsets inside an image index, its digest resealed."""
    base = VALID[name]

    def edit(index: dict) -> None:
        if index["extents"]:
            index["extents"][extent % len(index["extents"])][field] = value
        if granule is not None:
            index["granule"] = granule

    exercise(_rewrite_index(base, kind, edit))


@FUZZ
@given(
    name=BASES,
    size=st.one_of(st.integers(1, 1 << 40), st.sampled_from([1 << n for n in range(12, 41)])),
    granule=st.sampled_from([1 << n for n in range(12, 28)]),
    stretch=st.booleans(),
)
def test_consistent_huge_claims(name: str, size: int, granule: int, stretch: bool) -> None:
    """RAM, its data section and its index all claim more than the file holds, consistently: the
    reader still allocates nothing near the claim (a crafted 24 KB file once cost 64 MiB)."""
    base = VALID[name]

    def config(payload: bytearray) -> None:
        value = Config.parse(bytes(payload))
        value.ram[0].size = size
        payload[:] = Config.build(value)

    def index(value: dict) -> None:
        value["granule"] = granule
        if stretch and value["extents"]:
            value["extents"][0]["length"] = min(granule, size)

    data = rewrite_section(base, SectionKind.CONFIG, config)
    data = edit_table(data, lambda _h, es: find_entry(es, SectionKind.MEMORY_DATA).update(logical_length=size))
    exercise(_rewrite_index(data, SectionKind.MEMORY_INDEX, index))


@settings(max_examples=40, deadline=timedelta(seconds=10), suppress_health_check=[HealthCheck.too_slow])
@given(
    name=BASES,
    count=st.one_of(st.integers(0, 64), st.integers(MAX_SECTIONS - 16, MAX_SECTIONS + 16)),
    entry=st.integers(0, 63),
    kind=st.one_of(st.sampled_from(list(SectionKind)), st.integers(13, 2**16 - 1)),
    same_index=st.booleans(),
)
def test_many_entries(name: str, count: int, entry: int, kind: int, same_index: bool) -> None:
    """Up to a few thousand more table entries (the cap is MAX_SECTIONS): refused fast, in one line."""
    base = VALID[name]
    header, entries = parse_frame(base)
    model = {**entries[entry % len(entries)], "kind": int(kind)}
    entries += [{**model, "index": 0 if same_index else i} for i in range(1, count + 1)]
    exercise(build_frame(base[: header["table_offset"]], header, entries))
