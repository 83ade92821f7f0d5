"""``smolvmm doctor`` as a user runs it: the host in a few lines, exit 1 where guests cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smolvmm.config import cache_root
from smolvmm.host.kvmprobe import probe


def doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smolvmm", "doctor", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_doctor_describes_this_host_and_exits_by_whether_guests_run(tmp_path: Path) -> None:
    (tmp_path / "cache" / "smolvmm" / "debs").mkdir(parents=True)
    (tmp_path / "cache" / "smolvmm" / "debs" / "tool_1.0.deb").write_bytes(bytes(8192))
    done = doctor(env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["kvm", "/dev/kvm", "tools", "cache", "nested", "verdict"], lines
    kind = probe().kind
    if kind == "pvm":
        assert "PVM" in lines[1] and "README, 'PVM hosts and the nested machine'" in lines[1]
        assert done.returncode == 1 and "not ready" in lines[-1] and "tools/nested-kvm" in lines[-1]
    elif kind == "hardware":
        assert "hardware-assisted" in lines[1]
    assert lines[4] == f"cache     {tmp_path / 'cache' / 'smolvmm'}: 8.0 KiB"
    assert done.stderr == ""


def test_doctor_names_the_package_of_each_missing_tool(tmp_path: Path) -> None:
    done = doctor(env={**os.environ, "PATH": str(tmp_path)})  # no program can be found
    assert done.returncode == 1
    for tool, package in (
        ("apt-get", "apt"),
        ("dpkg-deb", "dpkg"),
        ("gcc", "gcc"),
        ("qemu-system-x86_64", "qemu-system-x86"),
    ):
        assert f"missing {tool}: apt-get install {package} (for " in done.stdout
    assert "nested    cannot run: apt-get install" in done.stdout


def test_doctor_json() -> None:
    report = json.loads(doctor("--json").stdout)
    assert report["kvm"]["kind"] == probe().kind
    assert {t["package"] for t in report["tools"]} >= {
        "apt",
        "dpkg",
        "gcc",
        "libc6-dev",
        "qemu-system-x86",
        "python3-dev",
    }
    assert next(t for t in report["tools"] if t["name"] == "Python.h")["present"]  # tools/setup builds with it
    assert isinstance(report["can_run_guests"], bool) and report["cache"]["path"] == str(cache_root())


@pytest.mark.kvm
def test_doctor_on_hardware_kvm_is_ready(tmp_path: Path) -> None:
    # An empty cache: the host's, seen over 9p from the nested machine, takes minutes to size.
    done = doctor(env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout
    assert "hardware-assisted" in done.stdout and done.stdout.splitlines()[-1].startswith("verdict   ready")
