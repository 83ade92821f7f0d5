"""An image's root filesystem as an ext4 base disk (``mke2fs -d``), sparse, cached by content."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from smolvmm.config import cache_root
from smolvmm.errors import ImageError
from smolvmm.oci.layers import Budget, apply_layers
from smolvmm.oci.manifest import Image

MIB = 1 << 20
DEFAULT_HEADROOM = 256 * MIB
MAX_CONTENT = 64 << 30  # bytes of file content an image may unpack to
_FIXED_OVERHEAD = 64 * MIB  # journal, group descriptors, reserved blocks of a small ext4
_VERSION = "2"  # bump when the disk layout produced here changes (2: owners kept when not root)


def _usage(tree: Path) -> tuple[int, int]:
    """(bytes allocated, inodes) of the files under ``tree``, hard links counted once."""
    seen: set[tuple[int, int]] = set()
    used, inodes = 0, 1
    for directory, dirs, files in os.walk(tree):
        for name in dirs + files:
            info = os.lstat(os.path.join(directory, name))
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            inodes += 1
            used += max(info.st_blocks * 512, 4096 if info.st_size else 0)
    return used, inodes


def make_ext4(tree: Path, out: Path, headroom: int) -> None:
    """Write ``out``: ext4 holding ``tree`` (owners, modes, links, xattrs), its size the content plus
    ``headroom``; sparse (mke2fs writes only metadata)."""
    if shutil.which("mke2fs") is None:
        raise ImageError("mke2fs not found: apt-get install e2fsprogs")
    used, inodes = _usage(tree)
    inode_count = inodes + inodes // 4 + headroom // (16 << 10) + 1024
    size = used + used // 10 + inode_count * 256 + _FIXED_OVERHEAD + headroom
    size = -(-size // MIB) * MIB
    out.unlink(missing_ok=True)
    with open(out, "wb") as image:
        image.truncate(size)
    result = subprocess.run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "smolvmm-root",
            "-I",
            "256",
            "-N",
            str(inode_count),
            "-d",
            str(tree),
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1:] or [f"status {result.returncode}"]
        raise ImageError(f"mke2fs -d {tree} failed: {detail[0]}")


def set_owners(tree: Path, disk: Path, owners: Mapping[str, tuple[int, int]]) -> list[str]:
    """Give the files of ``disk``, made from ``tree`` by a user who is not root (so all that user's),
    the owners their layers gave them (``owners``: path under ``tree`` -> (uid, gid); root's for a
    path no entry named, as root's unpacking would), through ``debugfs``; returns notes."""
    wanted: dict[int, tuple[str, tuple[int, int]]] = {}  # inode -> (a path of it, owner): hard links once
    held: dict[int, tuple[int, int]] = {}
    paths = [""] + [
        os.path.relpath(os.path.join(directory, name), tree)
        for directory, dirs, files in os.walk(tree)
        for name in dirs + files
    ]
    for path in paths:
        info = os.lstat(tree / path)
        held[info.st_ino] = (info.st_uid, info.st_gid)
        if path in owners:
            wanted[info.st_ino] = (path, owners[path])
        else:
            wanted.setdefault(info.st_ino, (path, (0, 0)))
    commands, notes = [], []
    for inode, (path, (uid, gid)) in wanted.items():
        if (uid, gid) == held[inode]:
            continue  # mke2fs -d copied it
        if any(c in path for c in '"\\\n'):
            notes.append(f"the owner of /{path[:200]!r} was not kept: debugfs cannot name it")
            continue
        commands += [f'sif "/{path}" uid {uid}', f'sif "/{path}" gid {gid}']
    if not commands:
        return notes
    if shutil.which("debugfs") is None:
        raise ImageError("debugfs not found: apt-get install e2fsprogs")
    script = disk.with_name("owners.debugfs")
    script.write_text("\n".join(commands) + "\n")
    result = subprocess.run(["debugfs", "-w", "-f", str(script), str(disk)], capture_output=True, text=True)
    failed = [line for line in result.stderr.splitlines() if line and not line.startswith("debugfs ")]
    if result.returncode != 0 or failed:
        raise ImageError(f"debugfs could not set owners on {disk}: {(failed or [f'status {result.returncode}'])[0]}")
    return notes


def _free_bytes(path: Path) -> int:
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


def root_disk(
    image: Image,
    scratch: Path,
    headroom: int = DEFAULT_HEADROOM,
    *,
    max_content: int | None = None,
    progress: Callable[[str], None] | None = None,
    notes: list[str] | None = None,
) -> Path:
    """The base disk of ``image``: from the cache when this image and headroom were built before,
    else unpacked into a scratch directory beside the cache and made with mke2fs. Nothing
    partial is left behind on error. A ``rootfs:DIR`` image (whose files may change) is made
    afresh in ``scratch``. ``notes`` receives what unpacking skipped."""
    disks = cache_root() / "image-disks"
    disks.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{_VERSION}\0{image.key}\0{headroom}".encode()).hexdigest()[:24]
    final = disks / f"{key}.ext4"
    if image.directory is None and final.exists():
        return final
    with tempfile.TemporaryDirectory(dir=disks, prefix=".build-") as building:
        work = Path(building)
        partial = work / "disk.ext4"
        if image.directory is not None:
            if progress:
                progress("making the ext4 disk")
            make_ext4(image.directory, partial, headroom)
            return Path(shutil.move(partial, scratch / "rootfs.ext4"))
        tree = work / "root"
        tree.mkdir(mode=0o755)
        limit = min(_free_bytes(work) // 2, MAX_CONTENT if max_content is None else max_content)
        owners: dict[str, tuple[int, int]] | None = None if os.geteuid() == 0 else {}
        found = apply_layers(tree, image.layers, Budget(limit), progress, owners)
        if progress:
            progress("making the ext4 disk")
        make_ext4(tree, partial, headroom)
        if owners is not None:
            found += set_owners(tree, partial, owners)
        if notes is not None:
            notes.extend(found)
        os.replace(partial, final)
    return final
