"""A driver session: the queues a device works on between DRIVER_OK and the next reset."""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import anyio

from smolvmm.devices.virtio.buffers import total_length
from smolvmm.devices.virtio.queue import DescriptorChain, Queue
from smolvmm.host.eventfd import EventFd
from smolvmm.host.memory import GuestMemory

Producer = Callable[[DescriptorChain], "int | None"]


class NativeLoop(Protocol):
    """Code that serves a queue by itself (native code, the GIL and the lock released): it sleeps
    on the queue's notify eventfd, takes and completes chains, writing their used elements and the
    used index, and returns only when Python is needed."""

    def start(self, queue: Queue, notify_fd: int, stop_fd: int) -> None:
        """Take the queue's ring addresses and positions (the session's lock is held)."""

    def serve(self) -> tuple[int, bool]:
        """Serve until ``stop_fd`` is readable or ``cancel`` (STOPPED), an interrupt is due
        (INTERRUPT), or the next chain is one for the Python producer (PYTHON_NEXT); returns that
        and whether an interrupt is due. A malformed ring raises QueueError."""
        ...

    def finish(self, queue: Queue) -> None:
        """Hand the ring positions back to the queue (lock held)."""

    def cancel(self) -> None:
        """From another thread (a reset): stop after the chain in hand, without using it."""

    def pause(self) -> None:
        """From another thread (the driver stopped the queue): return STOPPED after the chain in
        hand, having used it."""


STOPPED, PYTHON_NEXT, INTERRUPT = 0, 1, 2  # NativeLoop.serve's outcomes


def drain_eventfd(fd: int) -> None:
    """Reset a non-blocking eventfd's counter (nothing to do if it is already zero)."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


class Session:
    """The device task's handle on its queues, safe against concurrent register access.

    All queue mutation happens under the transport's lock; a reset from a vCPU thread closes the
    session under the same lock (``close``), after which it touches nothing.
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
        self._idle = threading.Condition(lock)
        self._busy = False  # a chain is out with ``produce``, or a native loop is running, outside the lock
        self._native: NativeLoop | None = None  # the native loop serving a queue, if one is
        self._interrupt = interrupt
        self._in_kernel: list[int] = []  # queues a kernel data path holds (``serve_in_kernel``)
        self._stop_in_kernel: Callable[[int], int] | None = None

    def close(self) -> None:
        """Stop touching the queues; the caller holds the lock (a reset, from a vCPU thread).

        Waits, with the lock released, for a request in flight, and stops a kernel data path:
        the device then writes no guest buffer after the reset that the driver sees completed,
        as with a real device's reset.
        """
        self.closed = True
        if self._native is not None:
            self._native.cancel()
        self._idle.wait_for(lambda: not self._busy)
        self._take_back(keep=False)

    def queue_stopped(self) -> None:
        """The driver stopped a queue (QueueReady 0); the caller holds the lock. A native loop
        serving it returns after the chain in hand, and the queue is not served again."""
        if self._native is not None:
            self._native.pause()

    async def serve_in_kernel(self, start: Callable[[int, Queue, int, int], None], stop: Callable[[int], int]) -> None:
        """Hand every ready queue to a kernel data path until cancelled or closed:
        ``start(index, queue, notify fd, call fd)`` for each, ``stop(index)`` on the way out
        (returning its next available index, where this session's queue goes on from). The
        kernel's signals on the call eventfd become the transport's interrupts, relayed by a thread
        of this session's own (``_relay``) so that no interrupt waits for the event loop."""
        call = EventFd()
        try:
            with self._lock:
                if self.closed:
                    return
                self._stop_in_kernel = stop
                for index, queue in enumerate(self._queues):
                    if queue.ready:
                        start(index, queue, self._notify_fds[index], call.fd)
                        self._in_kernel.append(index)
            await self._in_thread(lambda stop: self._relay(call.fd, stop), "virtio-irq-relay")
        finally:
            with self._lock:
                self._take_back(keep=not self.closed)
                if call.take() and not self.closed:
                    self._interrupt()
            call.close()

    def _take_back(self, keep: bool) -> None:
        """Stop the kernel data path, if one holds queues; ``keep`` its ring positions (not after a reset)."""
        while self._in_kernel:
            index = self._in_kernel.pop()
            assert self._stop_in_kernel is not None
            next_avail = self._stop_in_kernel(index)
            if keep:
                self._queues[index].continue_from(self.memory, next_avail)

    def fill(self, index: int, produce: Producer, limit: int | None = None) -> int:
        """Hand available chains to ``produce``, at most a queue's worth (or ``limit``), until the
        ring is empty or it returns None; returns how many it used.

        ``produce`` returns the number of bytes it wrote into the chain (the used length), or
        None to leave the chain in the ring for later. It runs outside the lock, so it may take
        its time (see ``process_in_thread``) without holding up the vCPUs' register accesses.
        Interrupts the driver if it asked for it (§2.7.7).
        """
        queue = self._queues[index]
        used = 0
        for _ in range(queue.size if limit is None else limit):
            with self._lock:
                chain = None if self.closed else queue.pop(self.memory)
                if chain is None:
                    break
                self._busy = True
            try:
                length = produce(chain)
            except BaseException:
                with self._lock:
                    self._busy = False
                    self._idle.notify_all()
                raise
            with self._lock:
                self._busy = False
                if self.closed:  # a reset is waiting in close() for this chain to be done
                    self._idle.notify_all()
                    break
                if length is None:
                    queue.undo_pop()
                    break
                queue.add_used(chain.head, length)
                queue.publish_used()
            used += 1
        with self._lock:
            if used and not self.closed and queue.needs_interrupt():
                self._interrupt()
        return used

    def serve_natively(self, index: int, loop: NativeLoop, stop: int) -> int:
        """Let ``loop`` serve queue ``index`` until it needs Python for more than an interrupt;
        returns its outcome, having raised the interrupts it asked for (STOPPED at once if the
        session is closed or the queue not ready)."""
        queue = self._queues[index]
        with self._lock:
            if self.closed or not queue.ready:
                return STOPPED
            loop.start(queue, self._notify_fds[index], stop)
            self._busy, self._native = True, loop
        try:
            while True:
                due = False  # a serve that raises has raised no interrupt
                outcome, due = loop.serve()
                if outcome != INTERRUPT:
                    return outcome
                with self._lock:
                    if not self.closed:
                        self._interrupt()
        finally:
            with self._lock:
                self._busy, self._native = False, None
                self._idle.notify_all()
                if not self.closed:  # after a reset, the queue's positions are its own again
                    loop.finish(queue)
                    if due:
                        self._interrupt()

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
                queue.add_used(chain.head, length)
            queue.publish_used()
            if queue.needs_interrupt():
                self._interrupt()
        return True

    async def wait_available(self, index: int) -> None:
        """Return once queue ``index`` has a chain available, sleeping on its notify eventfd.

        Always yields to the event loop, so a driver that keeps its ring full gets one batch
        (``fill``) at a time and the other tasks run in between.
        """
        fd = self._notify_fds[index]
        while True:
            with self._lock:
                available = not self.closed and self._queues[index].enable_notification()
            if available:
                await anyio.lowlevel.checkpoint()
                return
            await anyio.wait_readable(fd)
            drain_eventfd(fd)

    async def wait_for_more(self, index: int) -> None:
        """Return once the driver has made more chains available on queue ``index`` than now."""
        queue, fd = self._queues[index], self._notify_fds[index]
        with self._lock:
            seen = queue.watch_avail() if queue.ready else None
        while True:
            with self._lock:
                if not self.closed and seen is not None and queue.avail_index() != seen:
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

    async def process_in_thread(self, index: int, handle: Producer, loop: NativeLoop | None = None) -> None:
        """Like ``process``, but in a thread of this session's own that sleeps on the queue's
        notify eventfd, so ``handle`` may block on the host (disk I/O, fdatasync) without
        stalling the event loop or any other device. Cancelling stops the thread after its
        current batch and waits for it, so every chain taken is completed in the used ring.
        With ``loop``, that serves the chains and ``handle`` one at a time those it leaves."""
        await self._in_thread(lambda stop: self._serve(index, handle, loop, stop), "virtio-io")

    async def _in_thread(self, work: Callable[[int], None], name: str) -> None:
        """Run ``work(stop fd)`` in a thread until it fails (raised here) or, cancelled, until it
        returns once ``stop`` is readable; cancelling waits for the thread."""
        stop, done = EventFd(), EventFd()
        failure: list[Exception] = []

        def run() -> None:
            try:
                work(stop.fd)
            except Exception as exc:  # raised again in the device's task, e.g. QueueError: NEEDS_RESET
                failure.append(exc)
            finally:
                done.signal()

        try:
            thread = threading.Thread(target=run, name=name, daemon=True)
            thread.start()
            try:
                await anyio.wait_readable(done.fd)
            finally:
                stop.signal()
                with anyio.CancelScope(shield=True):
                    await anyio.wait_readable(done.fd)
                thread.join()
        finally:
            stop.close()
            done.close()
        raise failure[0]  # uncancelled, the thread only ends on an error

    def _serve(self, index: int, handle: Producer, loop: NativeLoop | None, stop: int) -> None:
        """The thread of ``process_in_thread``: batches until ``stop`` (or an error)."""
        poll = select.poll()
        poll.register(stop, select.POLLIN)
        poll.register(self._notify_fds[index], select.POLLIN)
        while True:
            if loop is not None:
                if self.serve_natively(index, loop, stop) == PYTHON_NEXT:
                    self.fill(index, handle, limit=1)
                    continue
                available = False  # stopped, or closed by a reset: only ``stop`` is left to wait for
            else:
                with self._lock:
                    available = not self.closed and self._queues[index].enable_notification()
                if available:
                    self.fill(index, handle)
            ready = dict(poll.poll(0 if available else None))
            if stop in ready:
                return
            if ready:
                drain_eventfd(self._notify_fds[index])

    def _relay(self, call: int, stop: int) -> None:
        """The thread of ``serve_in_kernel``: each signal of the kernel's ``call`` eventfd becomes an
        interrupt, until ``stop``."""
        poll = select.poll()
        poll.register(stop, select.POLLIN)
        poll.register(call, select.POLLIN)
        while True:
            ready = dict(poll.poll())
            if stop in ready:
                return
            drain_eventfd(call)
            with self._lock:
                if not self.closed:
                    self._interrupt()
