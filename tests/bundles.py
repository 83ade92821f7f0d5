"""Helpers for tests of the bundle format: the contents of a small, realistic bundle, and a writer's
temporary files (to kill a writer midway and look for what it left)."""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import time
from pathlib import Path

from smolformat import BundleContents, make_metadata, open_bundle, repack_bundle, samples
from smolformat.crafting import edit_table, find_entry, parse_frame, section_digest
from smolformat.layout import SectionKind

MIB = 1 << 20


def contents(tmp_path: Path, arch: str = "x86_64", memory: list[bytearray] | None = None) -> BundleContents:
    ram = [(0, 4 * MIB), (1 << 32, MIB)] if arch == "x86_64" else [(0x4000_0000, 4 * MIB)]
    memory = memory or [samples.realistic_memory(size, seed=i) for i, (_, size) in enumerate(ram)]
    disk = tmp_path / "base.img"
    disk.write_bytes(random.Random(3).randbytes(1_600_000) + bytes(300_000) + b"tail")  # > 1 MiB run, odd size
    device_config, states = samples.devices(1)
    vcpu, vm = (
        (samples.x86_64_vcpu, samples.x86_64_vm_state)
        if arch == "x86_64"
        else (samples.arm64_vcpu, samples.arm64_vm_state)
    )
    return BundleContents(
        config=samples.machine_config(arch, ram, device_config, vcpus=2),
        vcpus=[vcpu(0), vcpu(1)],
        vm_state=vm(),
        devices=states,
        memory=memory,
        disks=[disk],
        kernel=b"bzImage" * 100,
        initrd=b"070701" * 50,
        metadata=make_metadata("kvm-pvm", labels={"app": "demo"}, parent_digest=bytes(32)),
    )


def leftovers(directory: Path, name: str) -> list[str]:
    """Temporary files of a writer of ``name`` in ``directory``, or in a jail's staging directory
    there (a jailed monitor writes its files in one: smolvmm.host.keeper), as paths relative to it."""
    places = [directory, *directory.glob(".smolvmm-jail-*")]
    return sorted(
        str(p.relative_to(directory)) for place in places for p in place.iterdir() if p.name.startswith(f".{name}.")
    )


def kill_when(process: subprocess.Popen[bytes], directory: Path, name: str, size: int) -> bool:
    """SIGKILL ``process`` once its temporary file for ``name`` holds ``size`` bytes; False if it
    ended first."""
    while process.poll() is None:
        if any(_size(directory / t) >= size for t in leftovers(directory, name)):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    return False


def _size(path: Path) -> int:
    """``path``'s size, or -1 once it is gone (the writer renamed it into place since it was listed)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def digest(path: Path) -> str:
    """The SHA-256 of a file's bytes (to show a file was not changed)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def with_broken_zstd_chunk(source: Path, target: Path, kind: SectionKind = SectionKind.MEMORY_DATA) -> Path:
    """``source`` repacked with zstd RAM and disks into ``target``, one byte in the first frame of
    section ``kind`` flipped and the digests re-sealed: a bundle whose frame and digests check out
    but whose chunk does not decode (``verify`` says bad-chunk)."""
    repack_bundle(source, target, memory_encoding="zstd", disk_encoding="zstd")
    data = bytearray(target.read_bytes())
    entry = find_entry(parse_frame(bytes(data))[1], kind)
    with open_bundle(target) as bundle:
        image = next(image for section, image in bundle.images() if section.kind == kind)
    extent = image.extents[0]
    data[entry["offset"] + extent.offset] ^= 0x5A  # its zstd magic number
    section = bytes(data[entry["offset"] : entry["offset"] + entry["length"]])
    target.write_bytes(
        edit_table(bytes(data), lambda _, entries: find_entry(entries, kind).update(digest=section_digest(section)))
    )
    return target
