"""Kernel modules of an unpacked kernel package: names, dependencies, load order.

Dependencies come from each module's own ``.modinfo`` section, so no ``depmod`` is needed on the
host; Debian's packages ship no modules.dep (depmod runs at install time).
"""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

from smolvmm.errors import ImageError
from smolvmm.images.cpio import Initramfs

_SUFFIXES = (".ko.xz", ".ko")


def module_name(path: Path | str) -> str:
    """The kernel's name for a module file: ``virtio-rng.ko.xz`` -> ``virtio_rng``."""
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def read_module(path: Path) -> bytes:
    """The module's ELF image, decompressed when it is shipped as .ko.xz."""
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of the module's ``.modinfo`` section (a key may repeat)."""
    if elf[:5] != b"\x7fELF\x02":
        raise ImageError("not a 64-bit ELF kernel module")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + index * shentsize)
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        if elf[strtab + name : elf.index(b"\0", strtab + name)] == b".modinfo":
            info: dict[str, list[str]] = {}
            for entry in elf[offset : offset + size].split(b"\0"):
                key, sep, value = entry.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    return {}


class ModuleTree:
    """The modules under ``<root>/lib/modules/<release>`` of an unpacked kernel package."""

    def __init__(self, root: Path) -> None:
        releases = sorted((root / "lib" / "modules").iterdir())
        if len(releases) != 1:
            raise ImageError(f"expected one kernel release under {root}/lib/modules, found {len(releases)}")
        self.release = releases[0].name
        self.directory = releases[0]
        self.paths = {
            module_name(path): path for path in self.directory.rglob("*.ko*") if path.name.endswith(_SUFFIXES)
        }
        builtin = self.directory / "modules.builtin"
        self.builtin = {module_name(line) for line in builtin.read_text().split()} if builtin.exists() else set()
        self._depends: dict[str, list[str]] = {}

    def depends(self, name: str) -> list[str]:
        """The modules ``name`` needs loaded first (its direct dependencies)."""
        if name not in self._depends:
            values = modinfo(read_module(self.paths[name])).get("depends", [""])
            self._depends[name] = [dep.replace("-", "_") for dep in ",".join(values).split(",") if dep]
        return self._depends[name]

    def load_order(self, names: list[str]) -> list[str]:
        """The dependency closure of ``names``, each module after its dependencies; built-ins dropped."""
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            name = name.replace("-", "_")
            if name in order or name in self.builtin:
                return
            if name not in self.paths:
                raise ImageError(f"kernel {self.release} has no module {name!r} (neither built in nor shipped)")
            if name in visiting:
                raise ImageError(f"kernel {self.release}: module dependency cycle through {name!r}")
            visiting.add(name)
            for dep in self.depends(name):
                visit(dep)
            order.append(name)

        for name in names:
            visit(name)
        return order

    def add_to(self, image: Initramfs, names: list[str]) -> list[tuple[str, str]]:
        """Put the closure of ``names`` (decompressed) into ``image``; return (name, path) in load order."""
        loaded = []
        for name in self.load_order(names):
            relative = self.paths[name].relative_to(self.directory).as_posix().removesuffix(".xz")
            path = f"lib/modules/{self.release}/{relative}"
            image.file(path, read_module(self.paths[name]))
            loaded.append((name, f"/{path}"))
        return loaded
