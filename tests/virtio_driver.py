"""A virtio-mmio driver that plays the guest for device tests: no VM, just memory and eventfds."""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from smolvmm.devices.virtio.device import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, VirtioDevice
from smolvmm.devices.virtio.mmio import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    MmioTransport,
)
from smolvmm.devices.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from smolvmm.host.memory import GuestMemory

RAM_SIZE = 16 << 20
RING_AREA = 0x10000  # one 64 KiB area per queue: descriptors, avail ring, used ring
HEAP_START = 1 << 20
Buffer = tuple[int, int, bool]  # (gpa, length, device-writable)


class Driver:
    """Negotiates features, sets up split queues, posts buffers and reads used rings."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory | None = None) -> None:
        self.memory = memory or GuestMemory.anonymous([(0, RAM_SIZE)])
        self.transport = MmioTransport(device, self.memory)
        self.sizes: list[int] = []
        self._heap = HEAP_START
        self._next_desc: list[int] = []
        self._seen_used: list[int] = []

    # registers
    def read(self, offset: int) -> int:
        return self.transport.mmio_read(offset, 4)

    def write(self, offset: int, value: int) -> None:
        self.transport.mmio_write(offset, 4, value)

    def offered(self) -> int:
        features = 0
        for sel in (0, 1):
            self.write(0x014, sel)
            features |= self.read(0x010) << (32 * sel)
        return features

    def negotiate(self, accept: int = -1) -> int:
        """Reset, acknowledge, accept ``accept & offered`` and set FEATURES_OK; returns the status."""
        self.write(0x070, 0)
        self.write(0x070, STATUS_ACKNOWLEDGE)
        self.write(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        self.features = self.offered() & accept
        self.set_driver_features(self.features)
        self.write(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        return self.read(0x070)

    def set_driver_features(self, features: int) -> None:
        for sel in (0, 1):
            self.write(0x024, sel)
            self.write(0x020, features >> (32 * sel) & 0xFFFFFFFF)

    def setup_queues(self, size: int | None = None) -> None:
        count = len(self.transport.notify_fds)
        self.sizes, self._next_desc, self._seen_used = [], [0] * count, [0] * count
        for index in range(count):
            self.write(0x030, index)
            qsize = size or self.read(0x034)
            self.sizes.append(qsize)
            self.write(0x038, qsize)
            base = RING_AREA * (index + 1)
            self.memory.write(base, bytes(RING_AREA))  # fresh rings, as a real driver allocates
            for offset, addr in ((0x080, base), (0x090, base + 0x4000), (0x0A0, base + 0x8000)):
                self.write(offset, addr & 0xFFFFFFFF)
                self.write(offset + 4, addr >> 32)
            self.write(0x044, 1)

    def start(self, accept: int = -1, size: int | None = None) -> None:
        """The whole driver bring-up of §3.1.1 ending in DRIVER_OK."""
        status = self.negotiate(accept)
        assert status & STATUS_FEATURES_OK, "device refused the features"
        self.setup_queues(size)
        self.write(0x070, status | STATUS_DRIVER_OK)

    def adopt(self, other: Driver) -> None:
        """Continue the driver-side bookkeeping of ``other`` (same memory, e.g. after a restore)."""
        self.sizes, self._next_desc, self._seen_used = other.sizes, other._next_desc, other._seen_used

    # rings
    def desc_addr(self, q: int) -> int:
        return RING_AREA * (q + 1)

    def avail_addr(self, q: int) -> int:
        return RING_AREA * (q + 1) + 0x4000

    def used_addr(self, q: int) -> int:
        return RING_AREA * (q + 1) + 0x8000

    def alloc(self, length: int, data: bytes = b"") -> int:
        gpa = self._heap
        self._heap += (length + 15) & ~15
        assert self._heap <= RAM_SIZE, "test heap exhausted"
        self.memory.write(gpa, data)
        return gpa

    def _take_desc(self, q: int) -> int:
        index = self._next_desc[q]
        self._next_desc[q] = (index + 1) % self.sizes[q]
        return index

    def submit(self, q: int, buffers: list[Buffer], indirect: bool = False, kick: bool = True) -> int:
        """Post one chain on queue ``q`` (optionally through an indirect table); returns its head."""
        if indirect:
            table = self.alloc(16 * len(buffers))
            for i, (gpa, length, writable) in enumerate(buffers):
                flags = (DESC_F_WRITE if writable else 0) | (DESC_F_NEXT if i + 1 < len(buffers) else 0)
                self.memory.write(table + 16 * i, struct.pack("<QIHH", gpa, length, flags, i + 1))
            head = self._take_desc(q)
            self._write_desc(q, head, table, 16 * len(buffers), DESC_F_INDIRECT, 0)
        else:
            indices = [self._take_desc(q) for _ in buffers]
            for i, (gpa, length, writable) in enumerate(buffers):
                last = i + 1 == len(buffers)
                flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
                self._write_desc(q, indices[i], gpa, length, flags, 0 if last else indices[i + 1])
            head = indices[0]
        self.publish(q, head)
        if kick:
            self.kick(q)
        return head

    def _write_desc(self, q: int, index: int, gpa: int, length: int, flags: int, next_: int) -> None:
        self.memory.write(self.desc_addr(q) + 16 * index, struct.pack("<QIHH", gpa, length, flags, next_))

    def publish(self, q: int, head: int) -> None:
        """Put ``head`` in the available ring and advance its index."""
        avail = self.avail_addr(q)
        idx = self.memory.read_u16(avail + 2)
        self.memory.write_u16(avail + 4 + 2 * (idx % self.sizes[q]), head)
        self.memory.write_u16(avail + 2, (idx + 1) & 0xFFFF)

    def kick(self, q: int) -> None:
        os.eventfd_write(self.transport.notify_fds[q], 1)

    def used_idx(self, q: int) -> int:
        return self.memory.read_u16(self.used_addr(q) + 2)

    def take_used(self, q: int) -> list[tuple[int, int]]:
        """The (head, length) elements the device used since the last call."""
        out = []
        while self._seen_used[q] != self.used_idx(q):
            slot = self.used_addr(q) + 4 + 8 * (self._seen_used[q] % self.sizes[q])
            out.append(struct.unpack("<II", self.memory.read(slot, 8)))
            self._seen_used[q] = (self._seen_used[q] + 1) & 0xFFFF
        return out

    async def wait_used(self, q: int, count: int = 1, timeout: float = 3.0) -> list[tuple[int, int]]:
        """Wait for ``count`` more used elements on queue ``q``."""
        got: list[tuple[int, int]] = []
        with anyio.fail_after(timeout):
            while len(got) < count:
                got += self.take_used(q)
                await anyio.sleep(0.001)
        return got

    def interrupts(self) -> int:
        """How many interrupts the device raised since the last call."""
        try:
            return os.eventfd_read(self.transport.irq_fd)
        except BlockingIOError:
            return 0


# Features every test driver accepts by default (the rest are per-device choices).
RING_FEATURES = (1 << F_VERSION_1) | (1 << F_RING_EVENT_IDX) | (1 << F_RING_INDIRECT_DESC)


@asynccontextmanager
async def running(*drivers: Driver) -> AsyncIterator[None]:
    """Run the devices' tasks for the duration of the block."""
    async with anyio.create_task_group() as tg:
        for driver in drivers:
            tg.start_soon(driver.transport.run)
        yield
        tg.cancel_scope.cancel()


def serve_until_settled(driver: Driver, posted: int, timeout: float = 3.0) -> None:
    """Run the device's task until queue 0 has used ``posted`` chains or the device needs a reset."""

    def settled() -> bool:
        return bool(driver.read(0x070) & STATUS_NEEDS_RESET) or driver.used_idx(0) == posted

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(driver.transport.run)
            with anyio.fail_after(timeout):
                while not settled():
                    await anyio.sleep(0.001)
            tg.cancel_scope.cancel()

    anyio.run(run)
