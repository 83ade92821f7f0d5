"""Configuration and command-line input: every mistake gets one clear line and a non-zero exit."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from smolvmm import ConfigError, DiskConfig, MachineConfig, NetConfig
from smolvmm.config import MAX_MEMORY, MAX_VCPUS, MIN_MEMORY, parse_size


def test_sizes_macs_disks_and_networks_parse() -> None:
    assert parse_size("256M") == 256 << 20 and parse_size("1G") == 1 << 30 and parse_size("4096") == 4096
    disk = DiskConfig.parse("/tmp/a.img,ro,overlay=/tmp/o.cow")
    assert (str(disk.path), disk.read_only, str(disk.overlay)) == ("/tmp/a.img", True, "/tmp/o.cow")
    assert NetConfig.parse("tap=tap0,mac=52:54:00:12:34:56") == NetConfig("tap0", bytes.fromhex("525400123456"))


def test_paths_and_sequences_are_normalised(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"")
    disk = DiskConfig(str(kernel), overlay=str(tmp_path / "o.cow"))
    assert (disk.path, disk.overlay) == (kernel, tmp_path / "o.cow")
    config = MachineConfig(kernel=str(kernel), disks=[disk], networks=[NetConfig("t" * 15)], console_socket="c.sock")
    assert config.kernel == kernel and config.console_socket == Path("c.sock")
    assert config.disks == (disk,) and config.networks == (NetConfig("t" * 15),)
    hash(config)
    MachineConfig(vcpus=MAX_VCPUS, memory=MAX_MEMORY)
    MachineConfig(memory=MIN_MEMORY)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: parse_size("lots"), "invalid size"),
        (lambda: parse_size("-5M"), "invalid size"),
        (lambda: parse_size("0"), "invalid size"),
        (lambda: parse_size("0G"), "invalid size"),
        (lambda: parse_size("1.5G"), "invalid size"),
        (lambda: parse_size("256iB"), "invalid size"),
        (lambda: parse_size(""), "invalid size"),
        (lambda: parse_size(256), "invalid size"),
        (lambda: DiskConfig.parse("a.img,rw"), "unknown disk option 'rw'"),
        (lambda: DiskConfig.parse("a.img,ro=no"), "'ro' takes no value"),
        (lambda: DiskConfig.parse("a.img,overlay="), "'overlay' needs a PATH"),
        (lambda: DiskConfig.parse("a.img,overlay=a,overlay=b"), "repeated disk option 'overlay'"),
        (lambda: NetConfig.parse("mac=52:54:00:12:34:56"), "tap=NAME"),
        (lambda: NetConfig.parse("tap=t0,mac=01:00:00:00:00:00"), "multicast"),
        (lambda: MachineConfig(vcpus="2"), "MachineConfig.vcpus"),
        (lambda: MachineConfig(vcpus=1.5), "MachineConfig.vcpus"),
        (lambda: MachineConfig(vcpus=True), "MachineConfig.vcpus"),
        (lambda: MachineConfig(vcpus=0), "MachineConfig.vcpus"),
        (lambda: MachineConfig(vcpus=MAX_VCPUS + 1), "MachineConfig.vcpus"),
        (lambda: MachineConfig(memory="256M"), "MachineConfig.memory"),
        (lambda: MachineConfig(memory=256.0 * 2**20), "MachineConfig.memory"),
        (lambda: MachineConfig(memory=1 << 20), "MachineConfig.memory"),
        (lambda: MachineConfig(memory=(64 << 20) + 4096), "MachineConfig.memory"),
        (lambda: MachineConfig(memory=MAX_MEMORY + (2 << 20)), "MachineConfig.memory"),
        (lambda: MachineConfig(memory=1 << 50), "MachineConfig.memory"),
        (lambda: MachineConfig(kernel=5), "MachineConfig.kernel"),
        (lambda: MachineConfig(kernel=""), "MachineConfig.kernel"),
        (lambda: MachineConfig(kernel="/nonexistent/bzImage"), "MachineConfig.kernel"),
        (lambda: MachineConfig(initrd=Path("/etc/hostname")), "MachineConfig.initrd"),
        (lambda: MachineConfig(cmdline=b"console=ttyS0"), "MachineConfig.cmdline"),
        (lambda: MachineConfig(extra_cmdline="quiet\0"), "MachineConfig.extra_cmdline"),
        (lambda: MachineConfig(env={"A": 1}), "MachineConfig.env['A']"),
        (lambda: MachineConfig(env={"A": "x\0"}), "MachineConfig.env['A']"),
        (lambda: MachineConfig(env={"": "x"}), "MachineConfig.env names"),
        (lambda: MachineConfig(env={1: "x"}), "MachineConfig.env names"),
        (lambda: MachineConfig(env=[("A", "x")]), "MachineConfig.env"),
        (lambda: MachineConfig(secrets={"A=B": "x"}), "MachineConfig.secrets names"),
        (lambda: MachineConfig(secrets={"A\0": "x"}), "MachineConfig.secrets names"),
        (lambda: MachineConfig(disks="a.img"), "MachineConfig.disks"),
        (lambda: MachineConfig(disks=["/etc/hostname"]), "MachineConfig.disks[0]"),
        (lambda: MachineConfig(disks=(DiskConfig("/nonexistent.img"),)), "MachineConfig.disks[0].path"),
        (lambda: MachineConfig(networks=("tap0",)), "MachineConfig.networks[0]"),
        (lambda: MachineConfig(console="vga"), "MachineConfig.console"),
        (lambda: MachineConfig(console_socket=3), "MachineConfig.console_socket"),
        (lambda: MachineConfig(console_socket="/tmp/" + "x" * 200), "MachineConfig.console_socket"),
        (lambda: DiskConfig(5), "DiskConfig.path"),
        (lambda: DiskConfig(""), "DiskConfig.path"),
        (lambda: DiskConfig("a.img", read_only="no"), "DiskConfig.read_only"),
        (lambda: DiskConfig("a.img", read_only=1), "DiskConfig.read_only"),
        (lambda: DiskConfig("a.img", overlay=b"o.cow"), "DiskConfig.overlay"),
        (lambda: NetConfig(""), "NetConfig.tap"),
        (lambda: NetConfig("x" * 16), "NetConfig.tap"),
        (lambda: NetConfig("x" * 40), "NetConfig.tap"),
        (lambda: NetConfig("tap/0"), "NetConfig.tap"),
        (lambda: NetConfig("tap 0"), "NetConfig.tap"),
        (lambda: NetConfig(".."), "NetConfig.tap"),
        (lambda: NetConfig(42), "NetConfig.tap"),  # type: ignore[arg-type]
        (lambda: NetConfig("t0", b"\x01" * 6), "NetConfig.mac"),
        (lambda: NetConfig("t0", b"\xff" * 6), "NetConfig.mac"),
        (lambda: NetConfig("t0", bytes(6)), "NetConfig.mac"),
        (lambda: NetConfig("t0", b"\x02"), "NetConfig.mac"),
        (lambda: NetConfig("t0", "52:54:00:12:34:56"), "NetConfig.mac"),
    ],
)
def test_bad_values_are_refused_with_one_line_naming_the_field(make, field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)) as caught:
        make()
    assert "\n" not in str(caught.value)


def test_a_secret_value_is_not_quoted_when_refused() -> None:
    with pytest.raises(ConfigError, match=r"^MachineConfig.secrets\['TOKEN'\] must be a str") as caught:
        MachineConfig(secrets={"TOKEN": "hunter2\0"})
    assert "hunter2" not in str(caught.value)


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
