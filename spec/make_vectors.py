"""Generate the conformance vectors in spec/vectors/ and their manifest.json.

Run: ``python spec/make_vectors.py``. Output is deterministic. Each vector's expected outcome is
that of opening the file and then verifying it: "valid", or the FormatError code raised first.
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

from smolformat import BundleContents, samples, write_bundle
from smolformat.crafting import (
    append_section,
    edit_table,
    find_entry,
    parse_frame,
    reseal,
    rewrite_section,
)
from smolformat.layout import SectionFlag, SectionKind
from smolformat.pages import PageIndex

VECTORS = Path(__file__).resolve().parent / "vectors"
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
    write_bundle(path, contents, memory_encoding=encoding, min_zero_gap=1)
    return path.read_bytes()


def _edit_memory_index(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    def change(payload: bytearray) -> None:
        index = PageIndex.parse(bytes(payload))
        extents = [
            dict(address=e.address, length=e.length, offset=e.offset, stored=e.stored) for e in index.extents
        ]
        value = {"encoding": index.encoding, "granule": index.granule, "extents": extents}
        edit(value)
        payload[:] = PageIndex.build(value)

    return rewrite_section(data, SectionKind.MEMORY_INDEX, change)


def _put(at: int, value: bytes) -> Callable[[bytearray], None]:
    def change(payload: bytearray) -> None:
        payload[at : at + len(value)] = value

    return change


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def vectors(scratch: Path) -> list[tuple[str, bytes, str, str]]:
    """(file name, bytes, expected outcome, description) for every vector."""
    x86_raw = _bundle("x86_64", "raw", scratch)
    x86_zstd = _bundle("x86_64", "zstd", scratch)
    arm_raw = _bundle("arm64", "raw", scratch)
    header, entries = parse_frame(x86_raw)
    mem_data = find_entry(entries, SectionKind.MEMORY_DATA)
    config = find_entry(entries, SectionKind.CONFIG)
    vcpu = find_entry(entries, SectionKind.VCPU_STATE)
    out: list[tuple[str, bytes, str, str]] = [
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
            "bad-checksum",
            _flip(x86_raw, header["table_offset"] + 20),
            "bad-checksum",
            "a table byte changed, not resealed",
        ),
        (
            "section-overlap",
            edit_table(
                x86_raw, lambda h, es: find_entry(es, SectionKind.METADATA).update(offset=config["offset"])
            ),
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
            edit_table(
                x86_raw, lambda h, es: find_entry(es, SectionKind.KERNEL).update(length=(1 << 64) - 8)
            ),
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
            _edit_memory_index(x86_raw, lambda v: v["extents"][-1].update(offset=mem_data["length"])),
            "map-outside-file",
            "a memory extent points past its data section",
        ),
        (
            "memory-map-past-ram",
            _edit_memory_index(x86_raw, lambda v: v["extents"][-1].update(address=RAM)),
            "map-outside-ram",
            "a memory extent lies past guest RAM",
        ),
        (
            "memory-map-overlap",
            _edit_memory_index(x86_raw, lambda v: v["extents"][1].update(address=v["extents"][0]["address"])),
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
    boundaries = sorted(
        {b for e in entries for b in (e["offset"], e["offset"] + e["length"])} | {header["table_offset"]}
    )
    for boundary in boundaries:
        out.append(
            (
                f"truncated-at-{boundary}",
                x86_raw[:boundary],
                "truncated",
                f"file cut at section boundary {boundary}",
            )
        )
    return out


def main() -> int:
    VECTORS.mkdir(exist_ok=True)
    for old in VECTORS.glob("*.smolmachine"):
        old.unlink()
    manifest = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, data, expect, description in vectors(Path(scratch)):
            (VECTORS / f"{name}.smolmachine").write_bytes(data)
            manifest.append({"file": f"{name}.smolmachine", "expect": expect, "description": description})
    (VECTORS / "manifest.json").write_text(
        json.dumps({"format_version": "1.0", "vectors": manifest}, indent=1) + "\n"
    )
    print(f"{len(manifest)} vectors in {VECTORS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
