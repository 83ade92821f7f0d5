"""Configuration and command-line input: every mistake gets one clear line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from smolvmm import ConfigError, DiskConfig, MachineConfig, NetConfig, parse_size


def test_sizes_macs_disks_and_networks_parse() -> None:
    assert parse_size("256M") == 256 << 20 and parse_size("1G") == 1 << 30 and parse_size("4096") == 4096
    disk = DiskConfig.parse("/tmp/a.img,ro,overlay=/tmp/o.cow")
    assert (str(disk.path), disk.read_only, str(disk.overlay)) == ("/tmp/a.img", True, "/tmp/o.cow")
    assert NetConfig.parse("tap=tap0,mac=52:54:00:12:34:56") == NetConfig("tap0", bytes.fromhex("525400123456"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: parse_size("lots"), "invalid size"),
        (lambda: DiskConfig.parse("a.img,rw"), "unknown disk option 'rw'"),
        (lambda: NetConfig.parse("mac=52:54:00:12:34:56"), "tap=NAME"),
        (lambda: NetConfig.parse("tap=t0,mac=01:00:00:00:00:00"), "multicast"),
        (lambda: MachineConfig(vcpus=0), "--cpus"),
        (lambda: MachineConfig(memory=1 << 20), "--mem must be at least"),
        (lambda: MachineConfig(memory=(64 << 20) + 4096), "multiple of 2 MiB"),
        (lambda: MachineConfig(kernel=Path("/nonexistent/bzImage")), "does not exist"),
        (lambda: MachineConfig(console="vga"), "console must be"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize(
    "args, message",
    [
        (["boot", "--kernel", "/nonexistent"], "kernel /nonexistent does not exist"),
        (["boot", "--kernel", "/etc/passwd"], "not a bzImage"),
        (["boot", "--mem", "12Q"], "invalid size"),
        (["run", "/nonexistent.smolmachine"], "cannot open /nonexistent.smolmachine"),
        (["/etc/hostname"], "not a .smolmachine bundle"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(args: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "smolvmm", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if not line.startswith("smolvmm: warning:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
