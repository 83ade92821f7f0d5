"""A device's queues handed to a kernel data path (``Session.serve_in_kernel``, as vhost-net takes
them), driven by a test driver with a double standing in for the kernel: what it is given, how its
signals become interrupts, where the rings go on after it stops or after a reset. The real
vhost-net is exercised by tests/test_devices_guest.py with a guest on KVM."""

from __future__ import annotations

import os

import anyio
import pytest
from virtio_driver import RING_FEATURES, Driver, running

from smolvmm.devices.virtio.device import VirtioDevice
from smolvmm.devices.virtio.mmio import INT_USED_BUFFER
from smolvmm.devices.virtio.queue import Queue
from smolvmm.devices.virtio.session import Session

pytestmark = pytest.mark.anyio


class Kernel:
    """Records the rings it is given; ``use`` publishes used elements and signals, as the kernel does."""

    def __init__(self) -> None:
        self.rings: dict[int, tuple[int, int, int, int]] = {}  # index -> (size, next_avail, kick, call)
        self.stopped: list[int] = []
        self.consumed: dict[int, int] = {}  # index -> available chains taken

    def start(self, index: int, queue: Queue, kick: int, call: int) -> None:
        self.rings[index] = (queue.size, queue.next_avail, kick, call)

    def stop(self, index: int) -> int:
        self.stopped.append(index)
        return self.consumed.get(index, self.rings[index][1])


class InKernel(VirtioDevice):
    device_id = 1
    queue_sizes = (16, 16)

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.started = anyio.Event()

    def features(self) -> int:
        return 0

    def config(self) -> bytes:
        return b""

    async def serve(self, session: Session) -> None:
        self.started.set()
        await session.serve_in_kernel(self.kernel.start, self.kernel.stop)


def started() -> tuple[Kernel, InKernel, Driver]:
    """A device whose queues go to a kernel double, brought up by a test driver."""
    kernel = Kernel()
    device = InKernel(kernel)
    driver = Driver(device)
    driver.start(RING_FEATURES)
    return kernel, device, driver


async def test_the_kernel_gets_each_ready_ring_its_signal_interrupts_and_the_ring_goes_on_where_it_stopped() -> None:
    kernel, device, driver = started()
    async with running(driver):
        with anyio.fail_after(5):
            await device.started.wait()
        assert sorted(kernel.rings) == [0, 1]
        assert [kernel.rings[i][:3] for i in (0, 1)] == [(16, 0, driver.transport.notify_fds[i]) for i in (0, 1)]
        # The kernel takes three chains of queue 1 and uses them, then signals.
        for _ in range(3):
            driver.submit(1, [(driver.alloc(64), 64, False)], kick=False)
        used = driver.used_addr(1)
        for slot in range(3):
            driver.memory.write(used + 4 + 8 * slot, slot.to_bytes(4, "little") + bytes(4))
        driver.memory.write_u16(used + 2, 3)
        kernel.consumed[1] = 3
        os.eventfd_write(kernel.rings[1][3], 1)
        with anyio.fail_after(5):
            while not driver.interrupts():
                await anyio.sleep(0.001)
        assert driver.read(0x060) & INT_USED_BUFFER
    # Stopped with the device's task: each ring given back, its positions the kernel's.
    assert sorted(kernel.stopped) == [0, 1]
    queues = driver.transport.save_state().queues
    assert (queues[1].next_avail, queues[1].next_used) == (3, 3)
    assert (queues[0].next_avail, queues[0].next_used) == (0, 0)


async def test_a_reset_stops_the_kernel_before_it_returns_and_leaves_the_rings_reset() -> None:
    kernel, device, driver = started()
    async with running(driver):
        with anyio.fail_after(5):
            await device.started.wait()
        kernel.consumed[0] = 5
        driver.write(0x070, 0)  # the driver resets the device
        assert sorted(kernel.stopped) == [0, 1]  # before the register write returned
        await anyio.sleep(0.01)
    assert sorted(kernel.stopped) == [0, 1]  # and not again when the task ended
    assert all((q.next_avail, q.ready) == (0, False) for q in driver.transport.save_state().queues)
