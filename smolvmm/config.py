"""Machine configuration: typed, validated, and parsed from the CLI's flag syntax."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import ConfigError

MIB = 1 << 20
MIN_MEMORY = 32 * MIB
MAX_VCPUS = 254  # APIC ids fit in the MADT's one-byte field
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'256M', '1G', '65536' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", text, re.I)
    if not match:
        raise ConfigError(f"invalid size {text!r}: use a number with an optional K, M or G suffix")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def parse_mac(text: str) -> bytes:
    if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", text):
        raise ConfigError(f"invalid MAC address {text!r}: use six hex pairs like 52:54:00:12:34:56")
    mac = bytes(int(part, 16) for part in text.split(":"))
    if mac[0] & 1:
        raise ConfigError(f"MAC address {text} is a multicast address")
    return mac


def _options(spec: str, what: str) -> tuple[str, dict[str, str]]:
    first, *rest = spec.split(",")
    options: dict[str, str] = {}
    for item in rest:
        key, _, value = item.partition("=")
        options[key.strip()] = value.strip()
    if not first:
        raise ConfigError(f"empty {what} specification {spec!r}")
    return first, options


@dataclass(frozen=True)
class DiskConfig:
    """A virtio-blk disk: ``path`` is the read-only base; writes go to ``overlay`` (temporary if None)."""

    path: Path
    read_only: bool = False
    overlay: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> DiskConfig:
        """``PATH[,ro][,overlay=PATH]``"""
        path, options = _options(spec, "disk")
        unknown = set(options) - {"ro", "overlay"}
        if unknown:
            raise ConfigError(f"unknown disk option {sorted(unknown)[0]!r} in {spec!r} (known: ro, overlay=PATH)")
        overlay = options.get("overlay")
        return cls(Path(path), "ro" in options, Path(overlay) if overlay else None)


@dataclass(frozen=True)
class NetConfig:
    """A virtio-net device backed by host TAP device ``tap``; a random MAC when ``mac`` is None."""

    tap: str
    mac: bytes | None = None

    @classmethod
    def parse(cls, spec: str) -> NetConfig:
        """``tap=NAME[,mac=MAC]``"""
        _, options = _options("net," + spec, "network")
        unknown = set(options) - {"tap", "mac"}
        if unknown or not options.get("tap"):
            raise ConfigError(f"invalid network {spec!r}: use tap=NAME[,mac=MAC]")
        return cls(options["tap"], parse_mac(options["mac"]) if "mac" in options else None)


@dataclass(frozen=True)
class MachineConfig:
    """What to boot: kernel, initrd and command line (the default guest's when None), vCPUs, RAM, devices."""

    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    vcpus: int = 1
    memory: int = 256 * MIB
    disks: tuple[DiskConfig, ...] = ()
    networks: tuple[NetConfig, ...] = ()
    console_socket: Path | None = None
    console: Literal["serial", "virtio"] = "serial"
    extra_cmdline: str = field(default="")

    def __post_init__(self) -> None:
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError(f"--cpus must be between 1 and {MAX_VCPUS}, not {self.vcpus}")
        if self.memory < MIN_MEMORY:
            raise ConfigError(f"--mem must be at least {MIN_MEMORY // MIB} MiB")
        if self.memory % (2 * MIB):
            raise ConfigError("--mem must be a multiple of 2 MiB")
        for label, path in (("kernel", self.kernel), ("initrd", self.initrd)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{label} {path} does not exist or is not a file")
        for disk in self.disks:
            if not disk.path.is_file():
                raise ConfigError(f"disk image {disk.path} does not exist or is not a file")
        if self.console not in ("serial", "virtio"):
            raise ConfigError(f"console must be 'serial' (ttyS0) or 'virtio' (hvc0), not {self.console!r}")
        if self.initrd is not None and self.kernel is None:
            raise ConfigError("--initrd needs --kernel")
