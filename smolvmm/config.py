"""Machine configuration: typed, validated, and parsed from the CLI's flag syntax.

Every class checks its fields on construction and raises ConfigError with one line naming the
field (``MachineConfig.vcpus must be ...``); path fields accept str or os.PathLike and hold a Path.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, TypeVar

from smolvmm.errors import BundleError, ConfigError

if TYPE_CHECKING:
    import smolformat

MIB = 1 << 20
GIB = 1 << 30
MEMORY_ALIGN = 2 * MIB
MIN_MEMORY = 32 * MIB
# Ends guest RAM (MEMORY + the 0.75 GiB MMIO gap) below 2**39, the narrowest physical address
# width of current x86_64 hosts; the guest sees the host's width.
MAX_MEMORY = 256 * GIB
# CPUID leaf 4 holds cores per package - 1 in 6 bits (arch.x86_64.cpuid); the MADT's one-byte
# APIC ids (0xFF is the broadcast id) would allow 255.
MAX_VCPUS = 64
IFNAMSIZ = 16  # Linux interface names, including the NUL
SUN_PATH_SIZE = 108  # AF_UNIX socket paths, including the NUL
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def special_file(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is if it is neither a regular file nor a directory ("a FIFO", "a character
    device"...): reading it could wait, or go on, for ever. None otherwise, a missing path too
    (its reader says so)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kinds = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
    return kinds.get(stat.S_IFMT(mode), "a socket")


def parse_size(text: str) -> int:
    """'256M', '1G', '65536' -> bytes (binary units); ConfigError unless positive."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:([KMG])i?)?B?\s*", text, re.I) if isinstance(text, str) else None
    if not match or not int(match.group(1)):
        raise ConfigError(f"invalid size {text!r}: use a positive number with an optional K, M or G suffix")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()]


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes (NetConfig checks that it is unicast)."""
    if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", text):
        raise ConfigError(f"invalid MAC address {text!r}: use six hex pairs like 52:54:00:12:34:56")
    return bytes.fromhex(text.replace(":", ""))


def _invalid(name: str, expected: str, value: object) -> ConfigError:
    return ConfigError(f"{name} must be {expected}, not {value!r}")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _path(name: str, value: object, optional: bool = False) -> Path | None:
    """``value`` as a Path (None passes when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, (str, os.PathLike)) and isinstance(os.fspath(value), str) and os.fspath(value):
        return Path(value)
    raise _invalid(name, "a path (str or os.PathLike)" + (" or None" if optional else ""), value)


def _check_text(name: str, value: object, optional: bool = False) -> None:
    if not (value is None and optional or isinstance(value, str) and "\0" not in value):
        raise _invalid(name, "a str without NUL characters" + (" or None" if optional else ""), value)


def check_environment(name: str, values: object) -> dict[str, str]:
    """``values`` (env or secrets) as a new dict: names non-empty str without '=' or NUL, values
    str without NUL. A value is never quoted: it may be a secret."""
    if not isinstance(values, dict):
        raise _invalid(name, "a dict of str to str", values)
    for key, value in values.items():
        if not (isinstance(key, str) and key and "=" not in key and "\0" not in key):
            raise _invalid(f"{name} names", "non-empty str without '=' or NUL characters", key)
        if not (isinstance(value, str) and "\0" not in value):
            raise ConfigError(f"{name}[{key!r}] must be a str without NUL characters")
    return dict(values)


def check_vcpus(name: str, value: object) -> None:
    """``value`` is a vCPU count a machine can have."""
    if not _is_int(value) or not 1 <= value <= MAX_VCPUS:
        raise _invalid(name, f"an int from 1 to {MAX_VCPUS}", value)


def check_memory(name: str, value: object) -> None:
    """``value`` is a size of guest RAM a machine can have."""
    if not _is_int(value) or value % MEMORY_ALIGN or not MIN_MEMORY <= value <= MAX_MEMORY:
        limits = f"from {MIN_MEMORY // MIB} MiB to {MAX_MEMORY // GIB} GiB"
        raise _invalid(name, f"a number of bytes, a multiple of 2 MiB {limits}", value)


_T = TypeVar("_T")


def _items(name: str, value: object, kind: type[_T]) -> tuple[_T, ...]:
    """``value`` (a list or tuple of ``kind``) as a tuple."""
    if not isinstance(value, (list, tuple)):
        raise _invalid(name, f"a tuple of {kind.__name__}", value)
    for index, item in enumerate(value):
        if not isinstance(item, kind):
            raise _invalid(f"{name}[{index}]", f"a {kind.__name__}", item)
    return tuple(value)


def _options(spec: str, what: str) -> tuple[str, dict[str, str]]:
    first, *rest = spec.split(",")
    options: dict[str, str] = {}
    for item in rest:
        key, _, value = item.partition("=")
        if not key.strip():
            raise ConfigError(f"empty {what} option in {spec!r}")
        if key.strip() in options:
            raise ConfigError(f"repeated {what} option {key.strip()!r} in {spec!r}")
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _path("DiskConfig.path", self.path))
        object.__setattr__(self, "overlay", _path("DiskConfig.overlay", self.overlay, optional=True))
        if not isinstance(self.read_only, bool):
            raise _invalid("DiskConfig.read_only", "True or False", self.read_only)

    @classmethod
    def parse(cls, spec: str) -> DiskConfig:
        """``PATH[,ro][,overlay=PATH]``"""
        path, options = _options(spec, "disk")
        unknown = set(options) - {"ro", "overlay"}
        if unknown:
            raise ConfigError(f"unknown disk option {sorted(unknown)[0]!r} in {spec!r} (known: ro, overlay=PATH)")
        if options.get("ro"):
            raise ConfigError(f"disk option 'ro' takes no value, in {spec!r}")
        if options.get("overlay") == "":
            raise ConfigError(f"disk option 'overlay' needs a PATH, in {spec!r}")
        overlay = options.get("overlay")
        return cls(Path(path), "ro" in options, Path(overlay) if overlay else None)


@dataclass(frozen=True)
class PortForward:
    """Host port ``host`` forwarded to guest port ``guest`` over ``protocol`` (user networking).

    ``host`` 0 asks for a free port, picked when the machine starts (``Machine.forwards`` says
    which). The host side listens on all the host's addresses, as ``docker run -p`` does.
    """

    host: int
    guest: int
    protocol: Literal["tcp", "udp"] = "tcp"

    def __post_init__(self) -> None:
        if not _is_int(self.host) or not 0 <= self.host <= 65535:
            raise _invalid("PortForward.host", "a port from 0 (pick a free one) to 65535", self.host)
        if not _is_int(self.guest) or not 1 <= self.guest <= 65535:
            raise _invalid("PortForward.guest", "a port from 1 to 65535", self.guest)
        if self.protocol not in ("tcp", "udp"):
            raise _invalid("PortForward.protocol", "'tcp' or 'udp'", self.protocol)

    @classmethod
    def parse(cls, spec: str) -> PortForward:
        """``HOST:GUEST[/udp]`` (or ``/tcp``, the default)."""
        match = re.fullmatch(r"(\d{1,5}):(\d{1,5})(?:/(tcp|udp))?", spec.strip())
        if not match:
            raise ConfigError(
                f"invalid port forward {spec!r}: use HOST:GUEST or HOST:GUEST/udp, e.g. 8080:80 (HOST 0 picks a free port)"
            )
        protocol: Literal["tcp", "udp"] = "udp" if match.group(3) == "udp" else "tcp"
        return cls(int(match.group(1)), int(match.group(2)), protocol)

    def __str__(self) -> str:
        return f"{self.host}:{self.guest}/{self.protocol}"


@dataclass(frozen=True)
class NetConfig:
    """A virtio-net device. With ``tap`` its wire is that existing host TAP device; without
    (``NetConfig()``, ``mode`` "user") smolvmm starts a passt of its own for this machine:
    user-mode networking, no root, with ``forwards`` from host ports to guest ports.

    The guest's view of user networking: DHCP gives it the host's own address and netmask, the
    host's default gateway as its gateway and the host's DNS servers; connections to the gateway
    address reach the host's loopback (127.0.0.1), everything else leaves through the host's
    sockets as the host's own traffic; nothing outside reaches the guest except ``forwards``.
    A random MAC when ``mac`` is None.

    A TAP device's frames move in the host kernel (vhost-net) when ``/dev/vhost-net`` can be
    opened, and through the monitor otherwise; ``vhost`` True requires the kernel's path (one
    error if unavailable), False keeps frames in the monitor.
    """

    tap: str | None = None
    mac: bytes | None = None
    forwards: tuple[PortForward, ...] = ()
    vhost: bool | None = None

    @property
    def mode(self) -> Literal["tap", "user"]:
        """ "tap" for a TAP device, "user" for user networking."""
        return "user" if self.tap is None else "tap"

    def __post_init__(self) -> None:
        tap = self.tap
        if tap is not None and not (
            isinstance(tap, str)
            and 0 < len(os.fsencode(tap)) < IFNAMSIZ
            and tap not in (".", "..")
            and not re.search(r"[/:\s]", tap)
        ):
            raise _invalid("NetConfig.tap", "a Linux interface name: 1 to 15 bytes without '/', ':' or spaces", tap)
        object.__setattr__(self, "forwards", _items("NetConfig.forwards", self.forwards, PortForward))
        if tap is not None and self.forwards:
            raise ConfigError("NetConfig.forwards need user networking (no tap): a TAP device is reached directly")
        if self.vhost not in (None, True, False):
            raise _invalid("NetConfig.vhost", "True, False or None", self.vhost)
        if tap is None and self.vhost is not None:
            raise ConfigError("NetConfig.vhost needs a TAP device: user networking goes through passt")
        taken = [(f.host, f.protocol) for f in self.forwards if f.host]
        for port, protocol in taken:
            if taken.count((port, protocol)) > 1:
                raise ConfigError(f"NetConfig.forwards use host port {port}/{protocol} twice")
        if self.mac is None:
            return
        if not isinstance(self.mac, bytes) or len(self.mac) != 6:
            raise _invalid("NetConfig.mac", "6 bytes or None", self.mac)
        if self.mac[0] & 1 or not any(self.mac):
            kind = "multicast" if self.mac[0] & 1 else "all zero"
            raise ConfigError(
                f"NetConfig.mac must be a unicast address like 52:54:00:12:34:56, not {self.mac.hex(':')} ({kind})"
            )

    @classmethod
    def parse(cls, spec: str) -> NetConfig:
        """``user[,forward=HOST:GUEST[/udp]]...[,mac=MAC]`` or ``tap=NAME[,mac=MAC][,vhost=on|off]``."""
        first, *rest = spec.split(",")
        if first.strip() == "user":
            forwards, mac = [], None
            for item in rest:
                key, _, value = item.partition("=")
                if key.strip() == "forward":
                    forwards.append(PortForward.parse(value))
                elif key.strip() == "mac" and mac is None:
                    mac = parse_mac(value.strip())
                else:
                    raise ConfigError(f"invalid network {spec!r}: use user[,forward=HOST:GUEST[/udp]]...[,mac=MAC]")
            return cls(None, mac, tuple(forwards))
        _, options = _options("net," + spec, "network")
        unknown = set(options) - {"tap", "mac", "vhost"}
        if unknown or not options.get("tap") or options.get("vhost", "on") not in ("on", "off"):
            raise ConfigError(
                f"invalid network {spec!r}: use user[,forward=HOST:GUEST[/udp]]...,"
                " tap=NAME[,mac=MAC][,vhost=on|off] or none"
            )
        vhost = {"on": True, "off": False, None: None}[options.get("vhost")]
        return cls(options["tap"], parse_mac(options["mac"]) if "mac" in options else None, vhost=vhost)

    @classmethod
    def parse_flags(cls, specs: list[str]) -> tuple[NetConfig, ...]:
        """The CLI's ``--net`` flags (or a Smolfile's ``net``): ``()`` for ``--net none`` or none."""
        if not specs:
            return ()
        if "none" in (spec.strip() for spec in specs):
            if len(specs) > 1:
                raise ConfigError("--net none cannot be combined with other --net flags")
            return ()
        return tuple(cls.parse(spec) for spec in specs)


MINIMAL_KERNEL = "minimal"
"""``MachineConfig(kernel=MINIMAL_KERNEL)``: the minimal guest kernel built from Debian's source."""

IMAGE_NETWORKS: tuple[NetConfig, ...] = (NetConfig(),)
"""The networks of a machine built from an image when the user names none and this host can give
them: user networking, as ``docker run`` has a network by default (the demo guest and
``--kernel`` keep none)."""


@dataclass(frozen=True)
class MachineConfig:
    """What to boot: kernel, initrd and command line (the default guest's when None; the minimal
    guest's, ``smolvmm kernel build``, with ``kernel="minimal"``), vCPUs, RAM, devices."""

    kernel: Path | Literal["minimal"] | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    vcpus: int = 1
    memory: int = 256 * MIB
    disks: tuple[DiskConfig, ...] = ()
    networks: tuple[NetConfig, ...] = ()
    console_socket: Path | None = None
    console: Literal["serial", "virtio"] = "serial"
    extra_cmdline: str = field(default="")
    # Every exec's environment, and secrets handed over only through the guest agent (see Machine.restore).
    env: dict[str, str] = field(default_factory=dict, hash=False)
    secrets: dict[str, str] = field(default_factory=dict, repr=False, hash=False)

    @classmethod
    def from_bundle(
        cls, path: str | os.PathLike[str], *, networks: tuple[NetConfig, ...] = (), console_socket: Path | None = None
    ) -> MachineConfig:
        """The configuration that cold-boots bundle ``path`` with its own kernel and initrd (saved
        with ``snapshot(..., bootable=True)``): its vCPUs, RAM, command line, console and disks
        (as saved, under a fresh overlay); ``networks`` and ``console_socket`` serve its devices.

        The kernel, initrd and disks are written once into the cache, keyed by the bundle's digest.
        """
        with open_bundle(path) as bundle, format_errors(path):  # a disk decoded, the kernel's digest checked
            if bundle.config.arch != "x86_64":
                raise BundleError(f"the bundle is for {bundle.config.arch}; this monitor runs x86_64 guests")
            kernel, initrd = bundle.kernel, bundle.initrd
            if kernel is None:
                raise BundleError(f"{path} has no kernel to cold-boot (save it with `build --bootable`)")
            labels = bundle.labels
            roles = console_roles(bundle)
            devices = bundle.config.devices
            networks = networks_for(labels, sum(1 for d in devices if d.kind == "virtio-net"), networks)
            if "socket" in roles and console_socket is None:
                raise ConfigError("the bundle has a console socket device: pass --console-socket PATH")
            disks = tuple(
                DiskConfig(bundle_disk(bundle, d.params.disk), read_only=d.params.read_only)
                for d in devices
                if d.kind == "virtio-blk"
            )
            cmdline = re.sub(r"\s*\bsmolvmm\.(?:agent|dhcp)=\S+", "", bundle.config.cmdline)  # added again by the boot
            return cls(
                kernel=bundle_file(bundle.digest, BUNDLE_BOOT_DIR, "vmlinuz", kernel),
                initrd=bundle_file(bundle.digest, BUNDLE_BOOT_DIR, "initrd.img", initrd) if initrd else None,
                cmdline=cmdline,
                vcpus=bundle.config.vcpu_count,
                memory=sum(r.size for r in bundle.config.ram),
                disks=disks,
                networks=networks,
                console="virtio" if "main" in roles else "serial",
                console_socket=console_socket if "socket" in roles else None,
            )

    def __post_init__(self) -> None:
        for name in ("kernel", "initrd", "console_socket"):
            if not (name == "kernel" and self.kernel == MINIMAL_KERNEL):
                object.__setattr__(self, name, _path(f"MachineConfig.{name}", getattr(self, name), optional=True))
        object.__setattr__(self, "disks", _items("MachineConfig.disks", self.disks, DiskConfig))
        object.__setattr__(self, "networks", _items("MachineConfig.networks", self.networks, NetConfig))
        _check_text("MachineConfig.cmdline", self.cmdline, optional=True)
        _check_text("MachineConfig.extra_cmdline", self.extra_cmdline)
        object.__setattr__(self, "env", check_environment("MachineConfig.env", self.env))
        object.__setattr__(self, "secrets", check_environment("MachineConfig.secrets", self.secrets))
        check_vcpus("MachineConfig.vcpus", self.vcpus)
        check_memory("MachineConfig.memory", self.memory)
        if self.console not in ("serial", "virtio"):
            raise _invalid("MachineConfig.console", "'serial' (ttyS0) or 'virtio' (hvc0)", self.console)
        if self.console_socket is not None and len(os.fsencode(self.console_socket)) >= SUN_PATH_SIZE:
            raise _invalid(
                "MachineConfig.console_socket",
                f"a path under {SUN_PATH_SIZE} bytes (AF_UNIX)",
                str(self.console_socket),
            )
        if self.initrd is not None and self.kernel is None:
            raise ConfigError("MachineConfig.initrd needs MachineConfig.kernel (the default guest brings its own)")
        if self.initrd is not None and self.kernel == MINIMAL_KERNEL:
            raise ConfigError("MachineConfig.initrd does not go with kernel='minimal' (it brings its own initramfs)")
        files = [
            ("MachineConfig.kernel", self.kernel if isinstance(self.kernel, Path) else None),  # not "minimal"
            ("MachineConfig.initrd", self.initrd),
        ]
        files += [(f"MachineConfig.disks[{i}].path", disk.path) for i, disk in enumerate(self.disks)]
        for name, path in files:
            if path is not None and not path.is_file():
                raise ConfigError(f"{name} {path} does not exist or is not a file")


CONSOLE_ROLES_LABEL = "smolvmm.virtio-console-roles"
"""A bundle's label: the host side of each virtio console in slot order (main, agent, socket)."""
CONSOLE_ROLES = ("main", "agent", "socket")
NET_MODES_LABEL = "smolvmm.net-modes"
"""A bundle's label: each network card's wire ("tap", "user"), in slot order."""
BUNDLE_BOOT_DIR = "bundle-boot"  # a bootable bundle's kernel and initrd, under the cache, by digest
BUNDLE_DISKS_DIR = "bundle-disks"  # a bundle's base disks, under the cache, by digest


def open_bundle(path: str | os.PathLike[str], *, on_config: Callable[[Any], None] | None = None) -> smolformat.Bundle:
    """``smolformat.open_bundle``, its errors as one-line BundleErrors."""
    import smolformat

    try:
        with format_errors(path):
            return smolformat.open_bundle(path, on_config=on_config)
    except OSError as exc:
        raise BundleError(f"cannot open {path}: {exc.strerror}") from None


@contextlib.contextmanager
def format_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """A ``smolformat.FormatError`` raised in the block as the one-line BundleError naming ``path``:
    for what an open bundle reads later (zstd RAM decoded, a disk materialised, a section's digest)."""
    import smolformat

    try:
        yield
    except smolformat.FormatError as exc:
        raise BundleError(f"{path}: {exc}") from exc


def console_roles(bundle: smolformat.Bundle) -> list[str]:
    """The role of each of the bundle's virtio consoles, in CONFIG order, from its CONSOLE_ROLES_LABEL
    (a bundle without the label has socket consoles only). BundleError for a role that is not main,
    agent or socket, or a count that is not the consoles'."""
    consoles = sum(1 for d in bundle.config.devices if d.kind == "virtio-console")
    value = bundle.labels.get(CONSOLE_ROLES_LABEL)
    if value is None:
        return ["socket"] * consoles
    roles = value.split(",") if value else []
    where = f"{bundle.path}: its {CONSOLE_ROLES_LABEL} label"
    for role in roles:
        if role not in CONSOLE_ROLES:
            raise BundleError(f"{where} has {role[:40]!r}, which is not main, agent or socket")
    if len(roles) != consoles:
        raise BundleError(f"{where} names {len(roles)} role(s) for the bundle's {consoles} virtio console(s)")
    return roles


def networks_for(labels: dict[str, str], saved: int, given: tuple[NetConfig, ...]) -> tuple[NetConfig, ...]:
    """The networks for a bundle's ``saved`` network cards: ``given``, one per card, or when none
    are given, a user network (its own passt, no forwards) for each card saved on one."""
    modes = [mode for mode in labels.get(NET_MODES_LABEL, "").split(",") if mode]
    if given:
        if len(given) != saved:
            raise ConfigError(f"the bundle has {saved} network device(s): pass one --net for each")
        for index, (net, mode) in enumerate(zip(given, modes)):
            if mode == "tap" and net.mode == "user":
                raise ConfigError(
                    f"network device {index} was saved on a TAP device whose checksum and TSO offloads the guest "
                    "uses; user networking cannot take them: pass --net tap=NAME for it"
                )
        return given
    if saved and (len(modes) != saved or set(modes) != {"user"}):
        raise ConfigError(f"the bundle has {saved} network device(s): pass --net tap=NAME or --net user for each")
    return (NetConfig(),) * saved


def write_once(path: Path, write: Callable[[Path], object]) -> Path:
    """The read-only file ``path``, made by ``write(tmp)`` and renamed into place if absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            write(partial)
            os.chmod(partial, 0o444)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return path


def cache_root() -> Path:
    """Where smolvmm keeps what it builds and fetches: ``$XDG_CACHE_HOME/smolvmm`` (``~/.cache/smolvmm``
    when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "smolvmm"


def bundle_file(digest: bytes, directory: str, name: str, content: bytes | Callable[[Path], None]) -> Path:
    """The read-only cache file ``directory/<digest>/name`` holding ``content`` (bytes, or a
    function that writes the file at the path it is given), written once."""
    write = content if callable(content) else lambda partial: partial.write_bytes(content)
    return write_once(cache_root() / directory / digest.hex() / name, write)


def bundle_disk(bundle: smolformat.Bundle, index: int) -> Path:
    """The bundle's base disk ``index`` as a read-only file in the cache (materialised once)."""
    return bundle_file(bundle.digest, BUNDLE_DISKS_DIR, f"disk{index}.img", bundle.disk(index).materialise)
