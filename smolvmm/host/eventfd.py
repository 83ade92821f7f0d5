"""An eventfd: the one cross-thread and kernel-to-task wakeup the monitor uses."""

from __future__ import annotations

import os

import anyio


class EventFd:
    """A counter any thread (or KVM) can signal and an async task can wait on."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def signal(self) -> None:
        os.eventfd_write(self.fd, 1)

    def take(self) -> int:
        """The count accumulated since the last take, or 0 (never blocks)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    async def wait(self) -> int:
        """Wait until signalled; returns (and resets) the count."""
        while True:
            count = self.take()
            if count:
                return count
            await anyio.wait_readable(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
