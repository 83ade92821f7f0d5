"""User-mode networking: one passt process per network card, no root, no daemon.

passt (Debian package ``passt``) gets one end of a socketpair (``-F``) and speaks the stream
framing on it; the device's backend holds the other end. That socket is passt's lifeline: when
the machine closes it, or the monitor dies however it dies (SIGKILL included), the kernel closes
it and passt exits, so no passt outlives its machine. (PR_SET_PDEATHSIG would not do: passt
changes its credentials when started as root, which clears it.) ``close`` also stops and reaps it.

The host ports of the forwards are checked (and picked, for port 0) here before passt starts, so
a port in use is one clear error, not a passt that silently forwards nothing. passt starts while
the machine restores (``wait_started`` waits for it): frames the guest sends meanwhile wait in
the socket.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import anyio

from smolvmm.config import NetConfig, PortForward
from smolvmm.devices.virtio.backend import VNET_HDR_SIZE, NetBackend
from smolvmm.devices.virtio.buffers import gather
from smolvmm.devices.virtio.net import MAX_FRAME
from smolvmm.devices.virtio.stream import StreamBackend
from smolvmm.devices.virtio.tap import Tap
from smolvmm.errors import ConfigError
from smolvmm.host.vhost import VhostNet
from smolvmm.monitor.handshakes import HEAD_BYTES, Handshakes

START_TIMEOUT = 30.0  # seconds for passt to bind its ports (the nested test machine is slow)
SOCKET_BUFFER = 4 << 20
SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>
_log = logging.getLogger(__name__)
_NOISE = ("Failed to send", "Don't run as root")  # passt's syslog fallback and its uid drop


def user_networking_unavailable() -> str | None:
    """Why this host cannot give a machine user networking (passt is not installed, or no
    interface has a default route, which passt takes its addresses from); None when it can."""
    if shutil.which("passt") is None:
        return "passt is not installed (apt-get install passt)"
    ipv4 = [f for f in _route_table("route") if len(f) > 1 and f[1] == "00000000" and f[0] != "lo"]
    ipv6 = [f for f in _route_table("ipv6_route") if len(f) > 9 and f[:2] == ["0" * 32, "00"] and f[9] != "lo"]
    if not ipv4 and not ipv6:
        return "this host has no default route, which passt needs"
    return None


def _route_table(name: str) -> list[list[str]]:
    """The rows of ``/proc/net/NAME`` in this thread's network namespace, split (IPv4's ``route``:
    interface, destination, ...; ``ipv6_route``: destination, prefix length, ..., interface tenth)."""
    try:
        return [line.split() for line in Path("/proc/thread-self/net", name).read_text().splitlines()]
    except OSError:
        return []


def open_backend(net: NetConfig) -> NetBackend:
    """The host side of network card ``net``: its TAP device, or a passt of its own."""
    if net.tap is not None:
        return Tap(net.tap)
    return PasstBackend(net.forwards)


def open_vhost(net: NetConfig) -> VhostNet | None:
    """The host kernel's data path for TAP card ``net``: None for user networking, with
    ``vhost`` False, or where /dev/vhost-net cannot be used and ``vhost`` does not require it."""
    if net.tap is None or net.vhost is False:
        return None
    try:
        return VhostNet()
    except ConfigError as exc:
        if net.vhost:
            raise
        _log.info("%s: frames of tap %s go through the monitor", exc, net.tap)
        return None


class UnpluggedBackend(NetBackend):
    """The wire of a card saved on user networking, restored on a host that cannot give it: as
    a pulled cable, nothing arrives and what the guest sends is dropped. Saved again as "user"."""

    mode = "user"

    async def wait_readable(self) -> None:
        await anyio.sleep_forever()

    def read_into(self, views: Sequence[memoryview]) -> int | None:
        return None

    def write_from(self, views: Sequence[memoryview]) -> None:
        pass

    def close(self) -> None:
        pass


class PasstBackend(StreamBackend):
    """A stream backend whose peer is a passt started for it, with ``forwards`` bound on the host;
    a guest's retransmitted SYN that passt would answer with a reset never reaches it (``Handshakes``)."""

    mode = "user"

    def __init__(self, forwards: tuple[PortForward, ...]) -> None:
        self._handshakes = Handshakes()
        binary = shutil.which("passt")
        if binary is None:
            raise ConfigError(
                "user networking needs passt, which is not installed: apt-get install passt (Debian package passt)"
            )
        self.forwards = tuple(_resolve(forward) for forward in forwards)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (ours, theirs):
            _deep_send_buffer(end)
        self._runtime = Path(tempfile.mkdtemp(prefix="smolvmm-passt-"))
        # Reached through descriptors: a jailed monitor no longer sees the path.
        self._parent_fd = os.open(self._runtime.parent, os.O_RDONLY | os.O_DIRECTORY)
        self._runtime_fd = os.open(self._runtime, os.O_RDONLY | os.O_DIRECTORY)
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        try:
            super().__init__(ours, MAX_FRAME - VNET_HDR_SIZE)
            self._process = self._spawn(binary, theirs)
        except BaseException:
            ours.close()
            self._cleanup()
            raise
        finally:
            theirs.close()

    def _spawn(self, binary: str, theirs: socket.socket) -> subprocess.Popen[bytes]:
        args = [
            binary,
            "--foreground",
            "--quiet",
            "--stderr",
            "--fd",
            str(theirs.fileno()),
            "--pid",
            str(self._pidfile),
        ]
        for protocol, flag in (("tcp", "-t"), ("udp", "-u")):
            ports = ",".join(f"{f.host}:{f.guest}" for f in self.forwards if f.protocol == protocol)
            args += [flag, ports or "none"]
        if os.geteuid() == 0:
            # passt leaves root for "nobody" before it writes its pid file: let it write there.
            nobody = pwd.getpwnam("nobody")
            os.chown(self._runtime, nobody.pw_uid, nobody.pw_gid)
        self._log = tempfile.TemporaryFile(dir=self._runtime)
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log, pass_fds=(theirs.fileno(),)
        )

    def read_into(self, views: Sequence[memoryview]) -> int | None:
        length = super().read_into(views)
        if length is not None:
            self._handshakes.to_guest(gather(views, VNET_HDR_SIZE, min(length - VNET_HDR_SIZE, HEAD_BYTES)))
        return length

    def write_from(self, views: Sequence[memoryview]) -> None:
        if not self._handshakes.duplicate_syn(gather(views, VNET_HDR_SIZE, HEAD_BYTES)):
            super().write_from(views)

    @property
    def _pidfile(self) -> Path:
        return self._runtime / "passt.pid"

    async def wait_started(self) -> None:
        """Return once passt has bound the forwarded ports and serves (it then writes its pid
        file); ConfigError with passt's own words if it fails or takes over START_TIMEOUT."""
        assert self._process is not None and self._log is not None
        delay = 0.0005
        with anyio.move_on_after(START_TIMEOUT):
            while not self._pid_written():
                if self._process.poll() is not None:
                    break
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.02)
            else:
                return
        _stop(self._process)
        self._log.seek(0)
        lines = [line for line in self._log.read().decode(errors="replace").splitlines() if line.strip()]
        said = next((line for line in reversed(lines) if not line.startswith(_NOISE)), "no message")
        why = "failed" if self._process.returncode and self._process.returncode > 0 else "did not start in time"
        raise ConfigError(f"passt {why}: {said.strip()} (user networking needs a host interface with a default route)")

    def _pid_written(self) -> bool:
        try:
            return os.stat(self._pidfile.name, dir_fd=self._runtime_fd).st_size > 0
        except FileNotFoundError:
            return False

    def close(self) -> None:
        super().close()
        if self._process is not None:
            _stop(self._process)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._log is not None:
            self._log.close()
        if self._parent_fd < 0:
            return
        shutil.rmtree(self._runtime.name, dir_fd=self._parent_fd, ignore_errors=True)
        os.close(self._runtime_fd)
        os.close(self._parent_fd)
        self._runtime_fd = self._parent_fd = -1


def _deep_send_buffer(end: socket.socket) -> None:
    """Let the socket hold SOCKET_BUFFER bytes of frames (beyond net.core.wmem_max where allowed):
    the passt in Debian 12 drops the rest of a frame it could send only in part to a slow reader."""
    try:
        end.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCKET_BUFFER)
    except PermissionError:
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End passt (it exits by itself once its socket closes) and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _resolve(forward: PortForward) -> PortForward:
    """``forward`` with a free host port picked for 0, after checking that its host port is free."""
    kind = socket.SOCK_STREAM if forward.protocol == "tcp" else socket.SOCK_DGRAM
    families = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6 and Path("/proc/net/if_inet6").exists():
        families.append((socket.AF_INET6, "::"))
    port = forward.host
    for family, address in families:
        with socket.socket(family, kind) as probe:
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if kind == socket.SOCK_STREAM:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as passt binds
            try:
                probe.bind((address, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"host port {port}/{forward.protocol} is in use: forward another (forward=0:{forward.guest} picks a free one)"
                    ) from None
                if exc.errno == errno.EACCES:
                    raise ConfigError(
                        f"host port {port}/{forward.protocol} needs privileges: forward a port above 1023"
                    ) from None
                raise ConfigError(f"cannot use host port {port}/{forward.protocol}: {exc.strerror}") from None
            port = probe.getsockname()[1]
    return PortForward(port, forward.guest, forward.protocol)
