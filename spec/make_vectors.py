"""Generate the conformance vectors in spec/vectors/ and their manifest.json.

Run: ``python spec/make_vectors.py [DIRECTORY]``. Output is deterministic (tests/test_conformance.py
checks that a run reproduces spec/vectors byte for byte). Each vector's expected outcome is that of
opening the file and then verifying it: "valid", or the FormatError code raised first.
"""

from __future__ import annotations

import json
import random
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from smolformat import BundleContents, arm64, open_bundle, repack_bundle, samples, write_bundle
from smolformat.config import Config, Metadata
from smolformat.crafting import (
    append_section,
    build_frame,
    edit_table,
    find_entry,
    parse_frame,
    replace_section,
    reseal,
    rewrite_section,
    section_digest,
)
from smolformat.layout import MAX_SECTIONS, SectionFlag, SectionKind
from smolformat.pages import MAX_CHUNK_SIZE, PageIndex, zstd_bound
from smolformat.payloads import WorkingSet
from smolformat.signature import ED25519, signed_message, write_signed

VECTORS = Path(__file__).resolve().parent / "vectors"
# The Ed25519 key (RFC 8032 seed) that signs the signature vectors: published, so it signs nothing else.
TEST_KEY_SEED = b"smolmachine conformance test key"
# Signature vectors: whether the test key's signature matches the content (spec §4.2).
SIGNED = {"signed-x86_64-raw": True, "signed-x86_64-zstd": True, "signed-content-changed": False}
Vector = tuple[str, bytes, str, str]  # file name, bytes, expected outcome, description
RAM = 32 * 1024
DISK = 12 * 1024
METADATA = {
    "creator": "spec/make_vectors.py",
    "created_unix_ns": 1_767_225_600_000_000_000,
    "hypervisor": "kvm-hardware",
    "parent_digest": b"",
    "labels": [{"key": "purpose", "value": "conformance"}],
}


def _memory() -> bytearray:
    rng = random.Random(7)
    memory = bytearray(RAM)
    memory[0:4096] = rng.randbytes(4096)
    memory[8192:12288] = b"boot code " * 409 + b"\x90" * 6
    memory[20480:28672] = rng.randbytes(8192)
    return memory


def _bundle(arch: str, encoding: str, scratch: Path) -> bytes:
    disk = scratch / "disk.img"
    disk.write_bytes(b"\xeb\x3c\x90MKFS" + bytes(5000) + b"ext4 superblock" + bytes(DISK - 5022))
    device_config, device_states = samples.devices(1)
    vcpu, vm = (
        (samples.x86_64_vcpu, samples.x86_64_vm_state)
        if arch == "x86_64"
        else (samples.arm64_vcpu, samples.arm64_vm_state)
    )
    contents = BundleContents(
        config=samples.machine_config(arch, [(0, RAM)], device_config, vcpus=1),
        vcpus=[vcpu(0)],
        vm_state=vm(),
        devices=device_states,
        memory=[_memory()],
        disks=[disk],
        kernel=b"\x7fELF tiny kernel stand-in",
        metadata=METADATA,
    )
    path = scratch / f"{arch}-{encoding}.smolmachine"
    # Every zero page left out, so the small sample RAM keeps several extents for the map vectors.
    write_bundle(path, contents, memory_encoding=encoding, min_dedup_run=1, min_zero_gap=1)
    return path.read_bytes()


def _edit_index(
    data: bytes, edit: Callable[[dict[str, Any]], None], kind: SectionKind = SectionKind.MEMORY_INDEX
) -> bytes:
    def change(payload: bytearray) -> None:
        index = PageIndex.parse(bytes(payload))
        extents = [dict(address=e.address, length=e.length, offset=e.offset, stored=e.stored) for e in index.extents]
        value = {"encoding": index.encoding, "granule": index.granule, "extents": extents}
        edit(value)
        payload[:] = PageIndex.build(value)

    return rewrite_section(data, kind, change)


def _with_working_set(data: bytes, ranges: list[tuple[int, int]]) -> bytes:
    """``data`` with a WORKING_SET section of ``(address, pages)`` ranges (spec §9.1)."""
    entry = {
        "kind": int(SectionKind.WORKING_SET),
        "flags": 0,
        "encoding": 0,
        "reserved0": 0,
        "index": 0,
        "reserved1": 0,
    }
    return append_section(data, entry, WorkingSet.build([{"address": a, "pages": n} for a, n in ranges]))


def _put(at: int, value: bytes) -> Callable[[bytearray], None]:
    def change(payload: bytearray) -> None:
        payload[at : at + len(value)] = value

    return change


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def vectors(scratch: Path) -> list[Vector]:
    """(file name, bytes, expected outcome, description) for every vector."""
    x86_raw = _bundle("x86_64", "raw", scratch)
    x86_zstd = _bundle("x86_64", "zstd", scratch)
    arm_raw = _bundle("arm64", "raw", scratch)
    header, entries = parse_frame(x86_raw)
    mem_data = find_entry(entries, SectionKind.MEMORY_DATA)
    config = find_entry(entries, SectionKind.CONFIG)
    vcpu = find_entry(entries, SectionKind.VCPU_STATE)
    out: list[Vector] = [
        ("valid-x86_64-raw", x86_raw, "valid", "x86_64, raw pages"),
        ("valid-x86_64-zstd", x86_zstd, "valid", "x86_64, zstd chunks"),
        ("valid-arm64-raw", arm_raw, "valid", "arm64, raw pages"),
        (
            "valid-minor-version",
            reseal(x86_raw[:10] + struct.pack("<H", 9) + x86_raw[12:]),
            "valid",
            "a newer minor version of major 1 is read",
        ),
        (
            "valid-unknown-optional-section",
            append_section(
                x86_raw,
                {"kind": 200, "flags": 0, "encoding": 0, "reserved0": 0, "index": 0, "reserved1": 0},
                b"future optional data",
            ),
            "valid",
            "an unknown optional section is skipped",
        ),
        (
            "unknown-required-section",
            append_section(
                x86_raw,
                {
                    "kind": 200,
                    "flags": int(SectionFlag.REQUIRED),
                    "encoding": 0,
                    "reserved0": 0,
                    "index": 0,
                    "reserved1": 0,
                },
                b"future data",
            ),
            "unknown-required-section",
            "an unknown required section is refused",
        ),
        (
            "valid-working-set",
            _with_working_set(x86_raw, [(0, 2), (20480, 3)]),
            "valid",
            "a working set of two ranges of guest RAM (spec §9.1)",
        ),
        (
            "working-set-outside-ram",
            _with_working_set(x86_raw, [(0, 2), (RAM - 4096, 2)]),
            "bad-working-set",
            "a working-set range that runs past the end of RAM",
        ),
        (
            "working-set-overlap",
            _with_working_set(x86_raw, [(0, 2), (4096, 1)]),
            "bad-working-set",
            "a working-set range that starts inside the one before",
        ),
        ("empty", b"", "bad-magic", "an empty file"),
        ("bad-magic", _flip(x86_raw, 1), "bad-magic", "first bytes are not the magic"),
        (
            "smolpack",
            b"\x28\xb5\x2f\xfd" + bytes(200) + b'{"version":1}'.ljust(56, b" ") + b"SMOLPACK",
            "smolpack",
            "a smolvm SMOLPACK disk pack (footer magic at the end)",
        ),
        ("truncated-header", x86_raw[:100], "truncated", "file ends inside the header"),
        (
            "unsupported-version",
            reseal(x86_raw[:8] + struct.pack("<H", 2) + x86_raw[10:]),
            "unsupported-version",
            "major version 2",
        ),
        ("trailing-data", x86_raw + b"\0" * 8, "trailing-data", "bytes after the section table"),
        (
            "nonzero-gap",
            _flip(x86_raw, mem_data["offset"] - 1),
            "nonzero-gap",
            "a byte of the zero padding before guest RAM changed",
        ),
        (
            "bad-checksum",
            _flip(x86_raw, header["table_offset"] + 20),
            "bad-checksum",
            "a table byte changed, not resealed",
        ),
        (
            "section-overlap",
            edit_table(x86_raw, lambda h, es: find_entry(es, SectionKind.METADATA).update(offset=config["offset"])),
            "section-overlap",
            "metadata placed over config",
        ),
        (
            "section-outside-file",
            edit_table(
                x86_raw,
                lambda h, es: find_entry(es, SectionKind.KERNEL).update(offset=header["table_offset"]),
            ),
            "section-outside-file",
            "kernel section placed on the table",
        ),
        (
            "length-overflow",
            edit_table(x86_raw, lambda h, es: find_entry(es, SectionKind.KERNEL).update(length=(1 << 64) - 8)),
            "length-overflow",
            "offset + length wraps 64 bits",
        ),
        (
            "misaligned-raw-memory",
            edit_table(
                x86_raw,
                lambda h, es: find_entry(es, SectionKind.MEMORY_DATA).update(offset=mem_data["offset"] + 8),
            ),
            "misaligned",
            "raw memory data not page-aligned",
        ),
        ("bad-digest-config", _flip(x86_raw, config["offset"] + 10), "bad-digest", "config byte changed"),
        (
            "bad-digest-memory",
            _flip(x86_raw, mem_data["offset"] + 100),
            "bad-digest",
            "memory byte changed: open succeeds, verify fails",
        ),
        (
            "bad-section-config",
            rewrite_section(x86_raw, SectionKind.CONFIG, _put(5, b"\xff\xff\xff\x7f")),
            "bad-section",
            "config RAM region count far past the section",
        ),
        (
            "memory-map-outside-file",
            _edit_index(x86_raw, lambda v: v["extents"][-1].update(offset=mem_data["length"])),
            "map-outside-file",
            "a memory extent points past its data section",
        ),
        (
            "memory-map-past-ram",
            _edit_index(x86_raw, lambda v: v["extents"][-1].update(address=RAM)),
            "map-outside-ram",
            "a memory extent lies past guest RAM",
        ),
        (
            "memory-map-overlap",
            _edit_index(x86_raw, lambda v: v["extents"][1].update(address=v["extents"][0]["address"])),
            "map-overlap",
            "two memory extents cover the same guest page",
        ),
        (
            "duplicate-vcpu",
            append_section(
                x86_raw,
                {k: vcpu[k] for k in ("kind", "flags", "encoding", "reserved0", "index", "reserved1")},
                x86_raw[vcpu["offset"] : vcpu["offset"] + vcpu["length"]],
            ),
            "duplicate-vcpu",
            "vCPU 0 saved twice",
        ),
        (
            "vcpu-mismatch",
            rewrite_section(x86_raw, SectionKind.CONFIG, _put(1, struct.pack("<I", 2))),
            "vcpu-mismatch",
            "config says 2 vCPUs, one is saved",
        ),
        (
            "missing-memory",
            edit_table(x86_raw, lambda h, es: es.remove(find_entry(es, SectionKind.MEMORY_INDEX))),
            "missing-section",
            "no memory index",
        ),
    ]
    out.append(
        (
            "bad-chunk-zstd",
            rewrite_section(x86_zstd, SectionKind.MEMORY_DATA, _put(6, b"\xff\xff\xff\xff")),
            "bad-chunk",
            "a zstd frame that does not decode (digest resealed)",
        )
    )
    out += _frame_vectors(x86_raw)
    out += _content_vectors(x86_raw, x86_zstd, arm_raw)
    out += _signature_vectors(x86_raw, scratch)
    out += _truncations(x86_raw)
    return out


def _header_field(data: bytes, at: int, fmt: str, value: int) -> bytes:
    """``data`` with the header field at ``at`` (a ``struct`` format) set to ``value``, resealed."""
    return reseal(data[:at] + struct.pack(fmt, value) + data[at + struct.calcsize(fmt) :])


def _frame_vectors(x86_raw: bytes) -> list[Vector]:
    """The header and the section table."""
    table = parse_frame(x86_raw)[0]["table_offset"]
    moved = x86_raw[:table] + bytes(4) + x86_raw[table:]
    inside = x86_raw[:56] + x86_raw[table:]  # the table moved to byte 56, over the header's end
    return [
        ("bad-header", _header_field(x86_raw, 12, "<I", 64), "bad-header", "header_size is not 128"),
        (
            "too-many-sections",
            _header_field(x86_raw, 40, "<I", MAX_SECTIONS + 1),
            "bad-header",
            "section_count above the cap of 4096",
        ),
        (
            "section-table-outside-file",
            _header_field(x86_raw, 32, "<Q", table - 8),
            "section-table-outside-file",
            "the table would not end the file",
        ),
        (
            "misaligned-table",
            _header_field(_header_field(moved, 32, "<Q", table + 4), 24, "<Q", len(moved)),
            "misaligned",
            "the table starts 4 bytes past a multiple of 8",
        ),
        (
            "table-inside-header",
            _header_field(_header_field(inside, 32, "<Q", 56), 24, "<Q", len(inside)),
            "misaligned",
            "the table ends the file but starts at byte 56, inside the header",
        ),
        (
            "valid-empty-section-inside-another",
            edit_table(
                x86_raw, lambda h, es: es.append(_empty_entry(find_entry(es, SectionKind.CONFIG)["offset"] + 8))
            ),
            "valid",
            "an empty unknown optional section whose offset lies inside the config: it holds no byte",
        ),
        (
            "config-index",
            edit_table(x86_raw, lambda h, es: find_entry(es, SectionKind.CONFIG).update(index=1)),
            "bad-section",
            "the config section has index 1",
        ),
        (
            "metadata-logical-length",
            edit_table(x86_raw, lambda h, es: find_entry(es, SectionKind.METADATA).update(logical_length=1)),
            "bad-section",
            "a struct section whose logical length is not its length",
        ),
        (
            "kernel-not-bytes",
            edit_table(x86_raw, lambda h, es: find_entry(es, SectionKind.KERNEL).update(encoding=0)),
            "encoding-mismatch",
            "the kernel says STRUCT encoding",
        ),
        (
            "duplicate-section",
            append_section(
                x86_raw,
                {"kind": SectionKind.METADATA, "flags": 0, "encoding": 0, "reserved0": 0, "index": 0, "reserved1": 0},
                Metadata.build(METADATA),
            ),
            "duplicate-section",
            "two metadata sections",
        ),
    ]


def _empty_entry(offset: int) -> dict[str, Any]:
    """A table entry for an unknown optional section of no bytes at ``offset``."""
    fields = {"kind": 200, "flags": 0, "encoding": 1, "reserved0": 0, "index": 0, "reserved1": 0}
    return {**fields, "offset": offset, "length": 0, "logical_length": 0, "digest": section_digest(b"")}


def _first_virtio_record_at(data: bytes) -> int:
    """Offset in the DEVICES payload of the first virtio device's record."""
    _, entries = parse_frame(data)
    entry = find_entry(entries, SectionKind.DEVICES)
    payload, at = data[entry["offset"] : entry["offset"] + entry["length"]], 4
    while struct.unpack_from("<H", payload, at)[0] not in (4, 5, 6, 7):  # the virtio kinds' codes
        at += 8 + struct.unpack_from("<I", payload, at + 4)[0]
    return at


def _two_frame_chunk(data: bytes) -> bytes:
    """The zstd bundle with a zstd skippable frame after its one RAM frame, in the chunk's ``stored``:
    the chunk still decodes to its bytes, but is not one frame."""
    _, entries = parse_frame(data)
    memory = find_entry(entries, SectionKind.MEMORY_DATA)
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"skip"
    frame = data[memory["offset"] : memory["offset"] + memory["length"]]
    data = replace_section(data, SectionKind.MEMORY_DATA, frame + skippable)
    data = edit_table(
        data, lambda h, es: find_entry(es, SectionKind.MEMORY_DATA).update(logical_length=memory["logical_length"])
    )
    return _edit_index(data, lambda v: v["extents"][0].update(stored=len(frame) + len(skippable)))


def _twice_labelled() -> bytes:
    """A METADATA payload whose two labels have the same key (the writer refuses to build one)."""
    label = struct.pack("<H", 7) + b"purpose" + struct.pack("<H", 11) + b"conformance"
    return Metadata.build({**METADATA, "labels": []})[:-2] + struct.pack("<H", 2) + label + label


def _first_device_at(data: bytes) -> int:
    """Offset in the config payload of the first DeviceConfig."""
    header, entries = parse_frame(data)
    entry = find_entry(entries, SectionKind.CONFIG)
    config = Config.parse(data[entry["offset"] : entry["offset"] + entry["length"]])
    return 1 + 4 + 4 + 16 * len(config.ram) + 4 + len(config.cmdline.encode()) + 4


def _oversized_chunk(data: bytes) -> bytes:
    """The zstd bundle with zeros after its one RAM frame, counted in the chunk's ``stored``: past
    the most a frame of the chunk's length can take, so the reader refuses it before reading it."""
    _, entries = parse_frame(data)
    memory, index_entry = find_entry(entries, SectionKind.MEMORY_DATA), find_entry(entries, SectionKind.MEMORY_INDEX)
    (extent,) = PageIndex.parse(data[index_entry["offset"] : index_entry["offset"] + index_entry["length"]]).extents
    stored = zstd_bound(extent.length) + 1
    frame = data[memory["offset"] : memory["offset"] + memory["length"]]
    data = replace_section(data, SectionKind.MEMORY_DATA, frame + bytes(stored - len(frame)))
    data = edit_table(
        data, lambda h, es: find_entry(es, SectionKind.MEMORY_DATA).update(logical_length=memory["logical_length"])
    )
    return _edit_index(data, lambda v: v["extents"][0].update(stored=stored))


def _wide_window(data: bytes) -> bytes:
    """The zstd bundle with its one RAM chunk compressed again in a frame whose window is twice the
    granule: the frame decodes to the same bytes, but a reader may not need that much memory."""
    header, entries = parse_frame(data)
    memory = find_entry(entries, SectionKind.MEMORY_DATA)
    index_entry = find_entry(entries, SectionKind.MEMORY_INDEX)
    index = PageIndex.parse(data[index_entry["offset"] : index_entry["offset"] + index_entry["length"]])
    (extent,) = index.extents
    start = memory["offset"] + extent.offset
    chunk = zstandard.ZstdDecompressor().decompress(data[start : start + extent.stored])
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=index.granule.bit_length())
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()  # size unknown: no shrink
    frame = stream.compress(chunk) + stream.flush()
    assert zstandard.get_frame_parameters(frame).window_size > index.granule
    data = replace_section(data, SectionKind.MEMORY_DATA, frame)
    data = edit_table(
        data, lambda h, es: find_entry(es, SectionKind.MEMORY_DATA).update(logical_length=memory["logical_length"])
    )
    return _edit_index(data, lambda v: v["extents"][0].update(offset=0, stored=len(frame)))


def _content_vectors(x86_raw: bytes, x86_zstd: bytes, arm_raw: bytes) -> list[Vector]:
    """The payloads of the sections and how they fit together."""
    device = _first_device_at(x86_raw)
    metadata = Metadata.build(METADATA)
    parent_at = 2 + len(METADATA["creator"]) + 8 + 2 + len(METADATA["hypervisor"])
    header, entries = parse_frame(arm_raw)
    vcpu = find_entry(entries, SectionKind.VCPU_STATE)
    arm_vcpu = arm64.VcpuState.parse(arm_raw[vcpu["offset"] : vcpu["offset"] + vcpu["length"]])
    timers_at = 4 + 864 + 4 + 16 * len(arm_vcpu.sys_regs)  # mp_state, core, sys_regs
    return [
        (
            "config-ram-misaligned",
            rewrite_section(x86_raw, SectionKind.CONFIG, _put(17, struct.pack("<Q", RAM + 1))),
            "bad-config",
            "a RAM region size that is not a multiple of 4096",
        ),
        (
            "config-unknown-bus",
            rewrite_section(x86_raw, SectionKind.CONFIG, _put(device + 2, b"\x07")),
            "bad-config",
            "a device on bus 7",
        ),
        (
            "unknown-device-kind",
            rewrite_section(x86_raw, SectionKind.CONFIG, _put(device, struct.pack("<H", 99))),
            "unknown-device-kind",
            "the uart's kind code is 99",
        ),
        (
            "device-mismatch",
            rewrite_section(x86_raw, SectionKind.DEVICES, _put(6, struct.pack("<H", 1))),
            "device-mismatch",
            "the uart's state says instance 1",
        ),
        (
            "virtio-id-mismatch",
            rewrite_section(
                x86_raw, SectionKind.DEVICES, _put(_first_virtio_record_at(x86_raw) + 8, struct.pack("<I", 9))
            ),
            "device-mismatch",
            "the virtio-blk's saved transport says virtio device 9",
        ),
        (
            "duplicate-label",
            replace_section(x86_raw, SectionKind.METADATA, _twice_labelled()),
            "bad-section",
            "two labels with the same key",
        ),
        (
            "device-bool",
            # count u32, then the uart: kind u16, instance u16, length u32, 10 registers, thre_pending
            rewrite_section(x86_raw, SectionKind.DEVICES, _put(22, b"\x02")),
            "bad-section",
            "a bool field holding 2",
        ),
        (
            "parent-digest-length",
            replace_section(
                x86_raw,
                SectionKind.METADATA,
                metadata[:parent_at] + b"\x05" + b"12345" + metadata[parent_at + 1 :],
            ),
            "bad-section",
            "a parent digest of 5 bytes",
        ),
        (
            "memory-index-encoding",
            _edit_index(x86_raw, lambda v: v.update(encoding=3)),
            "encoding-mismatch",
            "the memory index says zstd, the data section raw",
        ),
        ("bad-granule", _edit_index(x86_raw, lambda v: v.update(granule=8192)), "bad-granule", "raw pages of 8 KiB"),
        (
            "memory-map-misaligned",
            _edit_index(x86_raw, lambda v: v["extents"][0].update(offset=8)),
            "map-misaligned",
            "a raw memory extent 8 bytes into a page",
        ),
        (
            "disk-map-outside-disk",
            _edit_index(x86_raw, lambda v: v["extents"][-1].update(address=DISK), SectionKind.DISK_INDEX),
            "map-outside-disk",
            "a disk extent past the disk's end",
        ),
        (
            "zstd-chunk-over-cap",
            _edit_index(x86_zstd, lambda v: v.update(granule=MAX_CHUNK_SIZE * 2)),
            "bad-granule",
            "8 MiB zstd chunks, above the cap of 4 MiB",
        ),
        ("zstd-wide-window", _wide_window(x86_zstd), "bad-chunk", "a zstd frame whose window exceeds the chunk size"),
        ("zstd-two-frames", _two_frame_chunk(x86_zstd), "bad-chunk", "a zstd chunk of a frame and a skippable frame"),
        (
            "zstd-chunk-over-bound",
            _oversized_chunk(x86_zstd),
            "bad-chunk",
            "a zstd chunk claiming more bytes than any frame of its length can take",
        ),
        (
            "unknown-arch",
            rewrite_section(arm_raw, SectionKind.CONFIG, _put(0, b"\x07")),
            "unknown-arch",
            "an arm64 bundle whose arch code is 7",
        ),
        (
            "arm64-timers-over-cap",
            rewrite_section(arm_raw, SectionKind.VCPU_STATE, _put(timers_at, b"\x09")),
            "bad-section",
            "an arm64 vCPU with 9 timers (at most 8)",
        ),
    ]


def _truncations(x86_raw: bytes) -> list[Vector]:
    """A file cut at every section boundary (the size check), inside the magic, and cut with its
    table written again (what a writer killed mid-way and a careless repair could leave)."""
    header, entries = parse_frame(x86_raw)
    boundaries = sorted(
        {b for e in entries for b in (e["offset"], e["offset"] + e["length"])} | {header["table_offset"]}
    )
    out = [
        (f"truncated-at-{boundary}", x86_raw[:boundary], "truncated", f"file cut at section boundary {boundary}")
        for boundary in boundaries
    ]
    cut = find_entry(entries, SectionKind.MEMORY_DATA)["offset"]
    kept = [e for e in entries if e["offset"] + e["length"] <= cut]
    return out + [
        ("truncated-in-magic", x86_raw[:4], "truncated", "file cut inside the magic"),
        (
            "truncated-table-rewritten",
            build_frame(x86_raw[:cut], header, entries),
            "section-outside-file",
            "cut before guest RAM, every entry kept: sections reach past the new table",
        ),
        (
            "truncated-entries-dropped",
            build_frame(x86_raw[:cut], header, kept),
            "missing-section",
            "cut before guest RAM, the entries of the lost sections dropped",
        ),
    ]


def conformance_public_key() -> bytes:
    """The raw public key of TEST_KEY_SEED."""
    return Ed25519PrivateKey.from_private_bytes(TEST_KEY_SEED).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _signature_vectors(x86_raw: bytes, scratch: Path) -> list[Vector]:
    """Bundles signed by the test key, one re-encoded after signing, one changed after signing."""
    path = scratch / "signed.smolmachine"
    path.write_bytes(x86_raw)
    with open_bundle(path) as bundle:
        message = signed_message(bundle)
    key = Ed25519PrivateKey.from_private_bytes(TEST_KEY_SEED)
    write_signed(
        path, path, [{"algorithm": ED25519, "public_key": conformance_public_key(), "signature": key.sign(message)}]
    )
    signed = path.read_bytes()
    repack_bundle(path, scratch / "signed-zstd.smolmachine", memory_encoding="zstd")

    def flip_first_byte(payload: bytearray) -> None:
        payload[0] ^= 1

    def too_many(payload: bytearray) -> None:
        payload[0] = 17

    return [
        ("signed-x86_64-raw", signed, "valid", "signed by the test key"),
        (
            "signed-x86_64-zstd",
            (scratch / "signed-zstd.smolmachine").read_bytes(),
            "valid",
            "the signed bundle re-encoded as zstd: the signature still matches",
        ),
        (
            "signed-content-changed",
            rewrite_section(signed, SectionKind.MEMORY_DATA, flip_first_byte),
            "valid",
            "a RAM byte changed and its digest resealed: a valid file whose signature no longer matches",
        ),
        (
            "signature-malformed",
            rewrite_section(signed, SectionKind.SIGNATURE, too_many),
            "bad-section",
            "a signature list longer than 16",
        ),
    ]


def write_vectors(directory: Path) -> int:
    """Write every vector and manifest.json into ``directory`` (old vectors removed); returns the count."""
    directory.mkdir(exist_ok=True)
    for old in directory.glob("*.smolmachine"):
        old.unlink()
    manifest = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, data, expect, description in vectors(Path(scratch)):
            (directory / f"{name}.smolmachine").write_bytes(data)
            entry = {"file": f"{name}.smolmachine", "expect": expect, "description": description}
            if name in SIGNED:
                entry["signature"] = {"public_key": conformance_public_key().hex(), "valid": SIGNED[name]}
            manifest.append(entry)
    (directory / "manifest.json").write_text(
        json.dumps({"format_version": "1.0", "vectors": manifest}, indent=1) + "\n"
    )
    return len(manifest)


def main() -> int:
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else VECTORS
    print(f"{write_vectors(directory)} vectors in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
