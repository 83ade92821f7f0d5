"""What a virtio-net device's frames travel over on the host: a TAP interface or a stream socket.

Every frame crosses this interface with the 12-byte virtio_net_hdr_v1 (§5.1.6) in front of it,
as the guest's driver exchanges it; a backend whose wire has no such header (passt's stream)
makes one up on receive and drops it on transmit, and offers no offloads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import anyio

# virtio_net_hdr_v1 (§5.1.6): the legacy 10-byte header plus num_buffers.
VNET_HDR_SIZE = 12


class NetBackend(ABC):
    """One network card's host side; non-blocking, used from the device's task only."""

    mode: ClassVar[str]
    """What kind of wire: "tap", "user" (passt), "stream" (another peer); saved with a bundle."""
    takes_offloads: bool = False
    """Whether it takes frames with partial checksums and TSO frames from the guest."""
    offloads: int = 0
    """The TUN_F_* offloads (partial checksums, TSO) it can hand the guest; none by default."""

    def set_offloads(self, flags: int) -> None:
        """Which of ``offloads`` the guest's driver accepted (0 after a reset)."""

    @abstractmethod
    async def wait_readable(self) -> None:
        """Return once ``read_into`` has a frame to give (or an error to raise)."""

    @abstractmethod
    def read_into(self, views: Sequence[memoryview]) -> int | None:
        """Read one frame, header first, into ``views`` (cut short where they end); returns its
        length, or None when no frame is waiting."""

    @abstractmethod
    def write_from(self, views: Sequence[memoryview]) -> None:
        """Send one frame, header first, gathered from ``views``; a frame the host cannot take
        now is dropped (as a full NIC queue drops it), never waited for."""

    async def serve(self) -> None:
        """Background work while the device runs (e.g. sending what a full socket held back)."""
        await anyio.sleep_forever()

    @abstractmethod
    def close(self) -> None:
        """Release the host side (fds, helper processes)."""
