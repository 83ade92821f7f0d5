"""The minimal guest kernel: Debian's kernel source, ``make tinyconfig`` with the project's fragment
merged over it (allnoconfig), built niced into the cache (keyed by the source version and the
fragment), checked against the fragment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from smolvmm import progress
from smolvmm.config import cache_root
from smolvmm.errors import ImageError
from smolvmm.images.cache import cached_build
from smolvmm.images.debian import Package
from smolvmm.kernel import config

SOURCE_PACKAGE = "linux-source-6.1"  # the source of the Debian cloud kernel the default guest runs
MAKE_ARCH = "x86_64"
TARGET = "bzImage"
BUILT_IMAGE = "arch/x86/boot/bzImage"
KERNEL = "bzImage"  # in the cache entry, beside CONFIG and RECORD
CONFIG = "config"
RECORD = "build.json"
TOOLS = ("make", "gcc", "flex", "bison", "bc", "perl", "xz")  # what a kernel build runs (tools/setup installs them)
NICE = ("nice", "-n", "19")  # the host's other work comes first: a build takes every core for minutes
_POLL = 0.25  # seconds between looks at a running make (its last output line)


@dataclass(frozen=True)
class BuiltKernel:
    """A built minimal kernel in the cache: the image, its ``.config``, the source package it came
    from (``name=version``), the wall-clock seconds its build took and with how many jobs."""

    kernel: Path
    config: Path
    source: str
    seconds: float
    jobs: int


def build_key(source: str, fragment: bytes) -> str:
    """The cache key of a build: the source package (``name=version``) and the fragment's bytes."""
    return hashlib.sha256(source.encode() + b"\0" + fragment).hexdigest()[:16]


def log_path() -> Path:
    """The output of the last kernel build (kept for a failed build, whose scratch directory goes)."""
    return cache_root() / "kernel-build.log"


def minimal_kernel(jobs: int | None = None) -> BuiltKernel:
    """The minimal kernel, built into the cache on first use and whenever the source package's
    version or the fragment changes (downloads ~139 MB; minutes of ``jobs`` parallel compiles)."""
    with progress.task(f"looking up {SOURCE_PACKAGE}"):
        package = Package.candidate(SOURCE_PACKAGE)
    fragment = config.FRAGMENT.read_bytes()
    source = f"{package.name}={package.version}"
    directory = cached_build(
        "minimal-kernel",
        build_key(source, fragment),
        lambda out: _build(out, package, fragment, jobs or os.cpu_count() or 1),
    )
    record = json.loads((directory / RECORD).read_text())
    return BuiltKernel(directory / KERNEL, directory / CONFIG, record["source"], record["seconds"], record["jobs"])


def _build(out: Path, package: Package, fragment: bytes, jobs: int) -> None:
    """Unpack the source under ``out``, configure and build it, keep the image and ``.config``, drop the source."""
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        raise ImageError(f"building the kernel needs {', '.join(absent)} (tools/setup installs the build dependencies)")
    package.download()
    log_path().parent.mkdir(parents=True, exist_ok=True)
    log_path().write_bytes(b"")
    started = time.monotonic()
    source = out / "source"
    with progress.task(f"building the minimal guest kernel ({package.name} {package.version}, {jobs} jobs)") as shown:
        shown.status("unpacking the source")
        package.unpack(out / "deb")
        tarballs = sorted((out / "deb" / "usr" / "src").glob("linux-source-*.tar.*"))
        if len(tarballs) != 1:
            raise ImageError(
                f"{package.name} {package.version} holds {len(tarballs)} usr/src/linux-source-*.tar.* files, expected 1"
            )
        source.mkdir()
        _run(shown, "tar", "tar", "-xf", str(tarballs[0]), "--strip-components=1", cwd=source)
        shutil.rmtree(out / "deb")
        (out / "fragment.config").write_bytes(fragment)
        _run(shown, "make tinyconfig", "make", "tinyconfig", cwd=source)
        # -n: allnoconfig over tinyconfig + fragment, so what the fragment makes visible starts off
        # (olddefconfig would turn on every default: IPv6, wireless, PS/2 mice, ...).
        merge = ("scripts/kconfig/merge_config.sh", "-n", ".config", str(out / "fragment.config"))
        _run(shown, "merge_config.sh", *merge, cwd=source)
        _run(shown, f"make {TARGET}", "make", f"-j{jobs}", TARGET, cwd=source)
        built = (source / ".config").read_text()
        absent = config.missing(config.parse(fragment.decode()), config.parse(built))
        if absent:
            raise ImageError(f"the built kernel lacks options its configuration requires: {', '.join(absent)}")
        (source / BUILT_IMAGE).rename(out / KERNEL)
        (out / CONFIG).write_text(built)
        shutil.rmtree(source)
    record = {
        "source": f"{package.name}={package.version}",
        "seconds": round(time.monotonic() - started, 1),
        "jobs": jobs,
    }
    (out / RECORD).write_text(json.dumps(record) + "\n")


def _run(shown: progress.Task, label: str, *command: str, cwd: Path) -> None:
    """Run ``command`` in ``cwd`` under ``nice -n 19``, its output appended to the build log, showing
    its last line as the status; on failure raise ImageError naming ``label`` with that line."""
    log = log_path()
    with log.open("ab") as sink:
        sink.write(f"$ {' '.join(command)}\n".encode())
        sink.flush()
        start = sink.tell()
        process = subprocess.Popen(
            [*NICE, *command],
            cwd=cwd,
            env={**os.environ, "ARCH": MAKE_ARCH},  # merge_config.sh runs make itself
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            while process.poll() is None:
                time.sleep(_POLL)
                shown.status(_last_line(log, start) or label)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    if process.returncode != 0:
        raise ImageError(f"{label} failed (exit {process.returncode}): {_last_line(log, start)} (log: {log})")


def _last_line(log: Path, start: int) -> str:
    """The last non-blank line written to ``log`` after offset ``start``."""
    with log.open("rb") as file:
        file.seek(max(start, file.seek(0, os.SEEK_END) - 4096))
        lines = [line for line in file.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
