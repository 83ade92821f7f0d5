"""A driver session: the queues a device works on between DRIVER_OK and the next reset."""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Callable, Sequence

import anyio

from ...memory import GuestMemory
from .buffers import total_length
from .queue import DescriptorChain, Queue

Producer = Callable[[DescriptorChain], "int | None"]


def drain_eventfd(fd: int) -> None:
    """Reset a non-blocking eventfd's counter (nothing to do if it is already zero)."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


class Session:
    """The device task's handle on its queues, safe against concurrent register access.

    All queue mutation happens under the transport's lock; a reset from a vCPU thread marks the
    session closed under the same lock, after which it touches nothing.
    """

    def __init__(
        self,
        memory: GuestMemory,
        queues: Sequence[Queue],
        notify_fds: Sequence[int],
        lock: threading.Lock,
        interrupt: Callable[[], None],
    ) -> None:
        self.memory = memory
        self.closed = False
        self._queues = queues
        self._notify_fds = notify_fds
        self._lock = lock
        self._interrupt = interrupt

    def fill(self, index: int, produce: Producer) -> int:
        """Hand available chains to ``produce`` until the ring is empty or it returns None.

        ``produce`` returns the number of bytes it wrote into the chain (the used length), or
        None to leave the chain in the ring for later. Runs under the lock: ``produce`` must be
        synchronous and quick. Interrupts the driver if it asked for it (§2.7.7).
        """
        queue = self._queues[index]
        used = 0
        with self._lock:
            if self.closed:
                return 0
            while (chain := queue.pop(self.memory)) is not None:
                length = produce(chain)
                if length is None:
                    queue.undo_pop()
                    break
                queue.add_used(self.memory, chain.head, length)
                queue.publish_used(self.memory)
                used += 1
            if used and queue.needs_interrupt(self.memory):
                self._interrupt()
        return used

    def spread(self, index: int, size: int, write: Callable[[list[DescriptorChain]], list[int]]) -> bool:
        """Take enough chains for ``size`` bytes and have ``write`` fill them as one unit.

        ``write`` returns the bytes it put in each chain; the used elements become visible to
        the driver together (VIRTIO_NET_F_MRG_RXBUF, §5.1.6.4). Returns False, leaving the ring
        as it was, when the available chains hold less than ``size`` bytes.
        """
        queue = self._queues[index]
        with self._lock:
            if self.closed:
                return False
            chains: list[DescriptorChain] = []
            room = 0
            while room < size:
                chain = queue.pop(self.memory)
                if chain is None:
                    for _ in chains:
                        queue.undo_pop()
                    return False
                chains.append(chain)
                room += total_length(chain.writable)
            for chain, length in zip(chains, write(chains)):
                queue.add_used(self.memory, chain.head, length)
            queue.publish_used(self.memory)
            if queue.needs_interrupt(self.memory):
                self._interrupt()
        return True

    async def wait_available(self, index: int) -> None:
        """Return once queue ``index`` has a chain available, sleeping on its notify eventfd."""
        fd = self._notify_fds[index]
        while True:
            with self._lock:
                if not self.closed and self._queues[index].enable_notification(self.memory):
                    return
            await anyio.wait_readable(fd)
            drain_eventfd(fd)

    async def wait_for_more(self, index: int) -> None:
        """Return once the driver has made more chains available on queue ``index`` than now."""
        queue, fd = self._queues[index], self._notify_fds[index]
        with self._lock:
            seen = queue.watch_avail(self.memory) if queue.ready else None
        while True:
            with self._lock:
                if not self.closed and seen is not None and queue.avail_index(self.memory) != seen:
                    return
            await anyio.wait_readable(fd)
            drain_eventfd(fd)

    async def process(
        self,
        index: int,
        handle: Producer,
        after_batch: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Serve a driver-to-device queue forever: each batch of chains, then ``after_batch``."""
        while True:
            await self.wait_available(index)
            self.fill(index, handle)
            if after_batch is not None:
                await after_batch()
