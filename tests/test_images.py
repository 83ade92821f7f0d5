"""Guest image building blocks: the cpio writer, module dependencies, the cache, the default guest."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from smolvmm.errors import ImageError
from smolvmm.images.cache import cache_key, cached_build
from smolvmm.images.cpio import Initramfs
from smolvmm.images.disk import ext4_image
from smolvmm.images.guest import default_guest
from smolvmm.images.kmod import ModuleTree, modinfo, module_name


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes, int]]:
    """name -> (mode, data, rdev) of a newc archive, checking magic and 4-byte alignment."""
    entries, offset = {}, 0
    while True:
        assert data[offset : offset + 6] == b"070701" and offset % 4 == 0
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev = fields[1], fields[6], (fields[9] << 8) | fields[10]
        name_start = offset + 110
        name = data[name_start : name_start + fields[11] - 1].decode()
        body = (name_start + fields[11] + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[body : body + size], rdev)
        offset = (body + size + 3) & ~3


def test_cpio_round_trip_with_implicit_parents(tmp_path: Path) -> None:
    image = Initramfs()
    image.file("bin/busybox", b"\x7fELF" * 3, 0o755)
    image.symlink("bin/sh", "busybox")
    image.char_device("dev/console", 5, 1)
    image.file("etc/smolvmm/modules", b"")
    image.save(tmp_path / "plain")
    image.save(tmp_path / "gz", compress=True)
    entries = parse_newc((tmp_path / "plain").read_bytes())
    assert gzip.decompress((tmp_path / "gz").read_bytes()) == (tmp_path / "plain").read_bytes()
    assert list(entries) == [
        "bin",
        "bin/busybox",
        "bin/sh",
        "dev",
        "dev/console",
        "etc",
        "etc/smolvmm",
        "etc/smolvmm/modules",
    ]
    assert entries["bin/busybox"] == (0o100755, b"\x7fELF" * 3, 0)
    assert entries["bin/sh"] == (0o120777, b"busybox", 0)
    assert entries["dev/console"] == (0o020600, b"", (5 << 8) | 1)
    if shutil.which("cpio"):
        listing = subprocess.run(["cpio", "-t"], input=(tmp_path / "plain").read_bytes(), capture_output=True)
        assert listing.stdout.decode().split() == list(entries)


def fake_module(depends: str) -> bytes:
    """A minimal ELF64 with a .modinfo section, enough for modinfo()."""
    modinfo_data = f"license=GPL\0depends={depends}\0".encode()
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    data_offset = 64
    shoff = data_offset + len(modinfo_data) + len(shstrtab)
    header = (
        b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    )
    sections = bytes(64) + struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, data_offset, len(modinfo_data), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, data_offset + len(modinfo_data), len(shstrtab), 0, 0, 1, 0)
    return header + modinfo_data + shstrtab + sections


@pytest.fixture
def module_root(tmp_path: Path) -> Path:
    release = tmp_path / "lib" / "modules" / "6.1.0-test"
    modules = {
        "virtio_ring": "",
        "virtio": "virtio_ring",
        "virtio_net": "virtio,net_failover",
        "net_failover": "failover",
        "failover": "",
        "virtio-rng": "virtio,virtio_ring",
    }
    for name, depends in modules.items():
        path = release / "kernel" / f"{name}.ko"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(fake_module(depends))
    (release / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    return tmp_path


def test_module_closure_puts_dependencies_first(module_root: Path) -> None:
    tree = ModuleTree(module_root)
    assert modinfo(fake_module("a,b"))["depends"] == ["a,b"]
    order = tree.load_order(["virtio_net", "virtio-rng", "ext4"])
    assert order == ["virtio_ring", "virtio", "failover", "net_failover", "virtio_net", "virtio_rng"]
    assert module_name("virtio-rng.ko.xz") == "virtio_rng"
    with pytest.raises(ImageError, match="no module 'virtio_gpu'"):
        tree.load_order(["virtio_gpu"])


def test_cache_key_follows_inputs_and_sources(tmp_path: Path) -> None:
    source = tmp_path / "builder.py"
    source.write_text("a = 1\n")
    before = cache_key(["kernel=1"], [source])
    assert cache_key(["kernel=2"], [source]) != before
    source.write_text("a = 2\n")
    assert cache_key(["kernel=1"], [source]) != before


def test_cached_build_is_atomic_and_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def crash(out: Path) -> None:
        (out / "half").write_text("x")
        raise ImageError("boom")

    with pytest.raises(ImageError):
        cached_build("thing", "k1", crash)
    assert list((tmp_path / "smolvmm" / "images").iterdir()) == []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "done").write_text("x")

    first = cached_build("thing", "k1", build)
    assert cached_build("thing", "k1", build) == first == tmp_path / "smolvmm" / "images" / "thing-k1"
    assert len(calls) == 1 and (first / "done").exists()


needs_apt = pytest.mark.skipif(
    shutil.which("apt-get") is None and not os.environ.get("CI"), reason="building the default guest needs apt-get"
)


@needs_apt
def test_default_guest_has_kernel_init_and_virtio_modules() -> None:
    guest = default_guest()
    assert guest.kernel.read_bytes()[0x202:0x206] == b"HdrS"
    entries = parse_newc(guest.initrd.read_bytes())
    assert b"smolvmm: guest ready" in entries["init"][1] and entries["init"][0] & 0o111
    assert entries["bin/busybox"][1].startswith(b"\x7fELF")
    assert entries["dev/console"][2] == (5 << 8) | 1
    loaded = [line.split()[0] for line in entries["etc/smolvmm/modules"][1].decode().splitlines()]
    for name in ("virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng"):
        assert name in loaded
    assert loaded.index("virtio_ring") < loaded.index("virtio") < loaded.index("virtio_mmio")
    assert guest.ready_marker == "smolvmm: guest ready" and "console=ttyS0" in guest.cmdline


def test_ext4_image_holds_the_files(tmp_path: Path) -> None:
    if shutil.which("mke2fs") is None and not os.environ.get("CI"):
        pytest.skip("needs mke2fs (apt-get install e2fsprogs)")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "greeting").write_text("hello\n")
    disk = ext4_image(tmp_path / "disk.img", tmp_path / "src", size_mib=8)
    assert disk.stat().st_size == 8 << 20
    shown = subprocess.run(["debugfs", "-R", "cat /greeting", str(disk)], capture_output=True, text=True)
    assert shown.stdout == "hello\n"


def test_apt_cache_answers_are_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from smolvmm.images import debian

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(debian, "_with_lists", lambda *args: calls.append(args) or "Version: 1.0\n")
    assert debian.Package.candidate("busybox-static") == debian.Package("busybox-static", "1.0")
    assert debian.Package.candidate("busybox-static").version == "1.0"
    assert len(calls) == 1
