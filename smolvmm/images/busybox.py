"""A kernel plus a busybox initramfs holding a chosen set of that kernel's modules."""

from __future__ import annotations

import shutil
from pathlib import Path

from smolvmm.errors import ImageError
from smolvmm.images.cpio import Initramfs
from smolvmm.images.debian import Package
from smolvmm.images.kmod import ModuleTree

KERNEL = "vmlinuz"
INITRD = "initrd.img"

# Shell for /init: insmod the modules listed in /etc/smolvmm/modules in order, each with its
# `module.param=value` words from the kernel command line (what kmod's modprobe would do).
LOAD_MODULES = r"""
load_modules() {
    set -f
    while read -r name path; do
        set --
        for word in $(cat /proc/cmdline); do
            case "$word" in "$name".*=*) set -- "$@" "${word#"$name".}" ;; esac
        done
        insmod "$path" "$@" || echo "smolvmm: insmod $name failed" >&2
    done < /etc/smolvmm/modules
    set +f
}
"""


def build(
    out: Path,
    kernel: Package | None,
    busybox: Package,
    modules: list[str],
    init: str,
    programs: dict[str, bytes] | None = None,
) -> None:
    """Write ``out/initrd.img``: busybox, ``modules`` of ``kernel`` with their dependencies, ``init``,
    and ``programs`` (initramfs path -> executable); and ``kernel``'s image as ``out/vmlinuz``.
    Without a kernel package (a kernel with everything built in) the initramfs loads no modules."""
    image = Initramfs()
    for directory in ("dev", "proc", "sys", "tmp", "mnt", "run"):
        image.directory(directory)
    image.char_device("dev/console", 5, 1)
    work = out / "unpacked"
    loaded: list[tuple[str, str]] = []
    if kernel is not None:
        kernel.unpack(work)
        vmlinuz = sorted((work / "boot").glob("vmlinuz-*"))
        if len(vmlinuz) != 1:
            raise ImageError(f"{kernel.name} {kernel.version} holds {len(vmlinuz)} boot/vmlinuz-* files, expected 1")
        vmlinuz[0].rename(out / KERNEL)
        loaded = ModuleTree(work).add_to(image, modules)
        shutil.rmtree(work)
    image.file("etc/smolvmm/modules", "".join(f"{name} {path}\n" for name, path in loaded).encode())
    busybox.unpack(work)
    image.file("bin/busybox", (work / "bin" / "busybox").read_bytes(), 0o755)
    shutil.rmtree(work)
    for path, program in (programs or {}).items():
        image.file(path, program, 0o755)
    image.file("init", init.encode(), 0o755)
    image.save(out / INITRD)
