"""Mutated bundles only ever open as a bundle or raise FormatError: no other exception, no hang."""

from __future__ import annotations

import mmap
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smolformat import FormatError, open_bundle
from smolformat.crafting import parse_frame, reseal, section_digest
from smolformat.layout import ENTRY_SIZE, HEADER_SIZE

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
VALID = [
    (VECTORS / f"valid-{name}.smolmachine").read_bytes()
    for name in ("x86_64-raw", "x86_64-zstd", "arm64-raw")
]
SCRATCH = Path(tempfile.mkdtemp(prefix="smolformat-fuzz-")) / "fuzz.smolmachine"
MAX_DECODE = 1 << 20
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

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
    """Open, verify and decode ``data`` as a caller would; FormatError is the only allowed failure."""
    SCRATCH.write_bytes(data)
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
                if disk.size <= MAX_DECODE:
                    disk.read_into(bytearray(disk.size))
            assert bundle.kernel is None or isinstance(bundle.kernel, bytes)
    except FormatError as exc:
        assert exc.code and "\n" not in str(exc)


@FUZZ
@given(
    base=st.sampled_from(VALID),
    flips=st.lists(st.integers(0, 10**9), min_size=1, max_size=8),
    seal=st.booleans(),
)
def test_bit_flips(base: bytes, flips: list[int], seal: bool) -> None:
    data = bytearray(base)
    for flip in flips:
        data[flip % len(data)] ^= 1 << (flip % 8)
    exercise(reseal(bytes(data)) if seal else bytes(data))


@FUZZ
@given(base=st.sampled_from(VALID), cut=st.integers(0, 10**9))
def test_truncation(base: bytes, cut: int) -> None:
    exercise(base[: cut % len(base)])


@FUZZ
@given(
    base=st.sampled_from(VALID),
    entry=st.integers(0, 63),
    field=st.sampled_from(sorted(ENTRY_FIELDS)),
    value=st.one_of(
        st.integers(0, 2**64 - 1), st.integers(0, 1 << 20), st.sampled_from([0, 1, 2**63, 2**64 - 1])
    ),
)
def test_random_table_values(base: bytes, entry: int, field: str, value: int) -> None:
    header, entries = parse_frame(base)
    at, width = ENTRY_FIELDS[field]
    position = header["table_offset"] + (entry % len(entries)) * ENTRY_SIZE + at
    data = base[:position] + (value % (1 << 8 * width)).to_bytes(width, "little") + base[position + width :]
    exercise(reseal(data))


@FUZZ
@given(
    base=st.sampled_from(VALID),
    section=st.integers(0, 63),
    at=st.integers(0, 10**9),
    junk=st.binary(min_size=1, max_size=12),
)
def test_resealed_section_content(base: bytes, section: int, at: int, junk: bytes) -> None:
    """Change bytes inside one section and fix its digest, so the payload parsers see them."""
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
    base=st.sampled_from(VALID),
    field=st.sampled_from([8, 10, 12, 16, 24, 32, 40, 44]),
    value=st.integers(0, 2**64 - 1),
)
def test_random_header_values(base: bytes, field: int, value: int) -> None:
    width = 2 if field in (8, 10) else 4 if field in (12, 40, 44) else 8
    data = base[:field] + (value % (1 << 8 * width)).to_bytes(width, "little") + base[field + width :]
    exercise(
        reseal(data)
        if len(data) >= HEADER_SIZE and struct.unpack_from("<Q", data, 32)[0] < len(data)
        else data
    )
