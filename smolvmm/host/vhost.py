"""vhost-net (``/dev/vhost-net``, linux/vhost.h): the host kernel moves a virtio-net device's frames
between its rings in guest RAM and a TAP device, woken by KVM's ioeventfd for the driver's
notifications and signalling an eventfd of ours when it has used buffers.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Sequence

from smolvmm.errors import ConfigError
from smolvmm.host.memory import Region

_VHOST = 0xAF


def _io(direction: int, number: int, size: int) -> int:
    return direction << 30 | size << 16 | _VHOST << 8 | number


_WRITE, _READ = 1, 2
GET_FEATURES = _io(_READ, 0x00, 8)
SET_FEATURES = _io(_WRITE, 0x00, 8)
SET_OWNER = _io(0, 0x01, 0)
SET_MEM_TABLE = _io(_WRITE, 0x03, 8)
SET_VRING_NUM = _io(_WRITE, 0x10, 8)
SET_VRING_ADDR = _io(_WRITE, 0x11, 40)
SET_VRING_BASE = _io(_WRITE, 0x12, 8)
GET_VRING_BASE = _io(_READ | _WRITE, 0x12, 8)
SET_VRING_KICK = _io(_WRITE, 0x20, 8)
SET_VRING_CALL = _io(_WRITE, 0x21, 8)
NET_SET_BACKEND = _io(_WRITE, 0x30, 8)

_STATE = struct.Struct("<II")  # vhost_vring_state: index, num
_FILE = struct.Struct("<Ii")  # vhost_vring_file: index, fd
_ADDR = struct.Struct("<IIQQQQ")  # vhost_vring_addr: index, flags, desc, used, avail, log
_MEMORY = struct.Struct("<II")  # vhost_memory: nregions, padding
_REGION = struct.Struct("<QQQQ")  # vhost_memory_region: guest address, size, user address, flags


class VhostNet:
    """One ``/dev/vhost-net`` instance, owned by this process (its worker maps our guest RAM)."""

    def __init__(self) -> None:
        try:
            self.fd = os.open("/dev/vhost-net", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"vhost-net is unavailable: /dev/vhost-net: {exc.strerror}") from exc
        try:
            fcntl.ioctl(self.fd, SET_OWNER)
            (self.features,) = struct.unpack("<Q", fcntl.ioctl(self.fd, GET_FEATURES, bytes(8)))
        except OSError as exc:
            os.close(self.fd)
            raise ConfigError(f"vhost-net refused this process: {exc.strerror}") from exc

    def set_features(self, features: int) -> None:
        """The features the driver accepted that the kernel's data path must honour."""
        fcntl.ioctl(self.fd, SET_FEATURES, struct.pack("<Q", features))

    def set_memory(self, regions: Sequence[Region]) -> None:
        """Where guest RAM lives in this process, so the kernel can follow ring addresses."""
        table = _MEMORY.pack(len(regions), 0) + b"".join(
            _REGION.pack(region.gpa, region.size, region.host_address, 0) for region in regions
        )
        fcntl.ioctl(self.fd, SET_MEM_TABLE, table)

    def start_ring(
        self, index: int, size: int, rings: tuple[int, int, int], next_avail: int, kick: int, call: int
    ) -> None:
        """Hand ring ``index`` (host addresses of its descriptor table, available and used rings)
        to the kernel from available index ``next_avail`` on; it reads the used index from RAM."""
        desc, avail, used = rings
        fcntl.ioctl(self.fd, SET_VRING_NUM, _STATE.pack(index, size))
        fcntl.ioctl(self.fd, SET_VRING_BASE, _STATE.pack(index, next_avail))
        fcntl.ioctl(self.fd, SET_VRING_ADDR, _ADDR.pack(index, 0, desc, used, avail, 0))
        fcntl.ioctl(self.fd, SET_VRING_KICK, _FILE.pack(index, kick))
        fcntl.ioctl(self.fd, SET_VRING_CALL, _FILE.pack(index, call))

    def attach(self, index: int, tap: int) -> None:
        """Start moving frames between ring ``index`` and TAP device ``tap``."""
        fcntl.ioctl(self.fd, NET_SET_BACKEND, _FILE.pack(index, tap))

    def stop_ring(self, index: int) -> int:
        """Stop ring ``index`` (the kernel finishes what it was doing first); its next available index."""
        fcntl.ioctl(self.fd, NET_SET_BACKEND, _FILE.pack(index, -1))
        _, next_avail = _STATE.unpack(fcntl.ioctl(self.fd, GET_VRING_BASE, _STATE.pack(index, 0)))
        return int(next_avail)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
