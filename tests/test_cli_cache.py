"""``smolvmm cache ls|prune`` on a cache laid out as smolvmm fills it (no guest needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

DAY = 86400


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """Two builds of the default guest, two versions of a package, a recent and an old bundle's
    disks, a leftover of an interrupted build, and a file of apt answers."""
    root = tmp_path / "smolvmm"
    now = time.time()

    def put(relative: str, size: int, age_days: float) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        for p in (path, path.parent) if path.parent != root else (path,):
            os.utime(p, (now - age_days * DAY, now - age_days * DAY))

    put("images/default-guest-0123456789abcdef/vmlinuz", 40960, 3)
    put("images/default-guest-fedcba9876543210/vmlinuz", 40960, 1)
    put("debs/busybox-static_1.35.deb", 8192, 3)
    put("debs/busybox-static_1.36.deb", 8192, 1)
    put("debs/linux-image-cloud_6.1.deb", 8192, 3)  # another package: current
    put("bundle-disks/" + "a" * 64 + "/disk0.img", 16384, 30)
    put("bundle-disks/" + "b" * 64 + "/disk0.img", 16384, 0)
    put("images/.default-guest-xyz/initrd.img", 4096, 1)
    put("apt-cache.json", 100, 0)
    return tmp_path


def smolvmm(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smolvmm", "cache", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_CACHE_HOME": str(cache)},
        timeout=60,
    )


STALE = {
    "images/default-guest-0123456789abcdef",
    "debs/busybox-static_1.35.deb",
    "bundle-disks/" + "a" * 64,
    "images/.default-guest-xyz",
}


def test_ls_shows_sizes_and_what_is_stale(cache: Path) -> None:
    done = smolvmm(cache, "ls")
    assert done.returncode == 0 and done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{cache / 'smolvmm'}: ") and "in 9 entries" in lines[0]
    stale = {line.split()[-1] for line in lines[1:] if "stale: " in line}
    assert stale == STALE
    assert any("superseded by a newer build" in line for line in lines)
    assert any("unused for 7 days" in line for line in lines)
    report = json.loads(smolvmm(cache, "ls", "--json").stdout)
    root = cache / "smolvmm"
    assert {str(Path(e["path"]).relative_to(root)) for e in report["entries"] if e["stale"]} == STALE
    assert all(e["bytes"] >= 4096 for e in report["entries"] if e["kind"] != "other")


def test_prune_removes_exactly_the_stale_entries(cache: Path) -> None:
    root = cache / "smolvmm"
    before = {str(p.relative_to(root)) for p in root.glob("*/*")}
    dry = smolvmm(cache, "prune", "--dry-run")
    assert dry.returncode == 0 and "would free" in dry.stdout and dry.stderr.count("would remove") == 4
    assert {str(p.relative_to(root)) for p in root.glob("*/*")} == before
    done = smolvmm(cache, "prune")
    assert done.returncode == 0 and "freed" in done.stdout and "(4 entries)" in done.stdout
    assert {str(p.relative_to(root)) for p in root.glob("*/*")} == before - STALE
    assert (root / "apt-cache.json").exists()
    assert smolvmm(cache, "prune", "--all").returncode == 0
    assert [p for p in root.rglob("*") if not p.is_dir()] == []


def test_cache_needs_an_action(cache: Path) -> None:
    done = smolvmm(cache)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
