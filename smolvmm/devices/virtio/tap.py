"""A Linux TAP interface opened with a virtio-net header on every frame (tun.c, if_tun.h)."""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Sequence

import anyio

from smolvmm.devices.virtio.backend import VNET_HDR_SIZE, NetBackend
from smolvmm.errors import ConfigError

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
IFNAMSIZ = 16


class Tap(NetBackend):
    """A non-blocking TAP file descriptor whose frames carry a 12-byte virtio-net header."""

    mode = "tap"
    takes_offloads = True

    def __init__(self, name: str) -> None:
        if not name or len(name.encode()) >= IFNAMSIZ:
            raise ConfigError(f"tap name {name!r} must be 1 to {IFNAMSIZ - 1} bytes")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"cannot open /dev/net/tun for tap {name}: {exc.strerror}") from exc
        try:
            ifreq = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(self.fd, TUNSETIFF, ifreq)
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        except OSError as exc:
            os.close(self.fd)
            raise ConfigError(f"cannot attach to tap {name}: {exc.strerror}") from exc
        self.name = name
        self.offloads = self._probe_offloads()

    def _probe_offloads(self) -> int:
        """The richest offload set the host kernel accepts, then none until a driver asks."""
        for candidate in (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6, TUN_F_CSUM):
            try:
                self.set_offloads(candidate)
            except OSError:
                continue
            self.set_offloads(0)
            return candidate
        return 0

    def set_offloads(self, flags: int) -> None:
        """Which partial checksums and TSO frames the kernel may hand us (TUNSETOFFLOAD)."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    async def wait_readable(self) -> None:
        await anyio.wait_readable(self.fd)

    def read_into(self, views: Sequence[memoryview]) -> int | None:
        """Read one frame (header first) into ``views``; None when no frame is waiting."""
        try:
            return os.readv(self.fd, views)
        except BlockingIOError:
            return None

    def write_from(self, views: Sequence[memoryview]) -> None:
        """Send one frame (header first) gathered from ``views``."""
        os.writev(self.fd, views)

    def close(self) -> None:
        os.close(self.fd)
