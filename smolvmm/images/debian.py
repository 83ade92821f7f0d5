"""Debian packages: resolve a metapackage to a concrete package, download it, unpack it.

Packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``; nothing is
installed into the host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from smolvmm import progress
from smolvmm.config import cache_root
from smolvmm.errors import ImageError

_updated = False
_POLL = 0.25  # seconds between looks at a running apt command (its download's size)


def _run(*args: str, cwd: Path | None = None, meanwhile: Callable[[], None] | None = None) -> str:
    """Run an apt/dpkg tool, calling ``meanwhile`` every quarter second while it runs; on failure
    raise ImageError carrying its last error line."""
    if shutil.which(args[0]) is None:
        raise ImageError(f"{args[0]} not found: smolvmm builds guest images from Debian packages (needs apt and dpkg)")
    with subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        while True:
            try:
                stdout, stderr = process.communicate(timeout=_POLL)
                break
            except subprocess.TimeoutExpired:  # retrying communicate loses no output
                if meanwhile is not None:
                    meanwhile()
    if process.returncode != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        raise ImageError(f"{' '.join(args)} failed: {lines[-1] if lines else f'exit {process.returncode}'}")
    return stdout


def _with_lists(
    *args: str, cwd: Path | None = None, expect_output: bool = True, meanwhile: Callable[[], None] | None = None
) -> str:
    """Run an apt command; if it fails (or prints nothing when output is expected), run
    ``apt-get update`` once per process and retry: a fresh host may have no package lists yet."""
    global _updated
    try:
        output = _run(*args, cwd=cwd, meanwhile=meanwhile)
        if output.strip() or not expect_output or _updated:
            return output
    except ImageError:
        if _updated:
            raise
    _updated = True
    with progress.task("updating apt's package lists"):
        _run("apt-get", "update", "-qq")
    return _run(*args, cwd=cwd, meanwhile=meanwhile)


def _apt_cache(*args: str) -> str:
    """``apt-cache ARGS``, remembered in the cache until apt's package lists change (a query costs ~1 s)."""
    lists = Path("/var/lib/apt/lists")
    stamp = lists.stat().st_mtime_ns if lists.exists() else 0
    memo_path = cache_root() / "apt-cache.json"
    memo: dict[str, str]
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    key = f"{stamp} {' '.join(args)}"
    if key not in memo:
        memo = {k: v for k, v in memo.items() if k.startswith(f"{stamp} ")}
        memo[key] = _with_lists("apt-cache", *args)
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=memo_path.parent, delete=False) as tmp:
                json.dump(memo, tmp)
            os.replace(tmp.name, memo_path)
        except OSError:
            pass  # a read-only cache only costs the next query
    return memo[key]


@dataclass(frozen=True)
class Package:
    """A concrete Debian package at the version apt would pick now."""

    name: str
    version: str
    size: int | None = field(default=None, compare=False)  # of the .deb, as the archive states it

    @classmethod
    def candidate(cls, name: str) -> Package:
        """``name`` at apt's candidate version."""
        fields = dict(
            line.split(":", 1) for line in _apt_cache("show", "--no-all-versions", name).splitlines() if ":" in line
        )
        if "Version" not in fields:
            raise ImageError(f"apt-cache show {name} printed no Version: is {name} in this host's apt sources?")
        size = fields.get("Size", "").strip()
        return cls(name, fields["Version"].strip(), int(size) if size.isdigit() else None)

    @property
    def deb_name(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}.deb"

    def download(self) -> Path:
        """The package's .deb, from the cache or fetched with ``apt-get download``."""
        debs = cache_root() / "debs"
        target = debs / self.deb_name
        if target.exists():
            return target
        debs.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
            os.chmod(tmp, 0o755)  # apt's _apt user may then write there instead of warning
            spec = f"{self.name}={self.version}"
            with progress.task(f"downloading {self.name}", self.size) as shown:

                def fetched() -> None:
                    shown.update(_bytes_under(Path(tmp)))

                _with_lists("apt-get", "download", "-qq", spec, cwd=Path(tmp), expect_output=False, meanwhile=fetched)
            found = list(Path(tmp).glob("*.deb"))
            if len(found) != 1:
                raise ImageError(f"apt-get download {self.name}={self.version} produced {len(found)} .deb files")
            found[0].rename(target)
        return target

    def unpack(self, dest: Path) -> None:
        """Extract the package's files into ``dest`` (``dpkg-deb -x``)."""
        _run("dpkg-deb", "-x", str(self.download()), str(dest))


def _bytes_under(directory: Path) -> int:
    """The size of the files under ``directory`` now (apt renames them as it goes)."""
    total = 0
    for path in directory.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:
            pass
    return total


def dependency_of(metapackage: str, prefix: str) -> str:
    """The first dependency of ``metapackage`` whose name starts with ``prefix``.

    ``dependency_of("linux-image-cloud-amd64", "linux-image-")`` -> ``linux-image-6.1.0-56-cloud-amd64``.
    """
    for line in _apt_cache("depends", metapackage).splitlines():
        kind, _, name = line.strip().partition(": ")
        if kind.endswith("Depends") and name.startswith(prefix):
            return name
    raise ImageError(f"apt-cache depends {metapackage} names no {prefix}* package")
