"""The virtio-mmio transport: identification, feature negotiation, reset, interrupts, state."""

from __future__ import annotations

import dataclasses

import anyio

import pytest
from virtio_driver import RING_FEATURES, Driver, anyio_backend, running  # noqa: F401

from smolvmm.devices.virtio.device import F_VERSION_1
from smolvmm.devices.virtio.mmio import MAGIC, STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET
from smolvmm.devices.virtio.rng import VirtioRng
from smolvmm.errors import BundleError


def test_identification_registers() -> None:
    driver = Driver(VirtioRng())
    assert driver.read(0x000) == MAGIC
    assert driver.read(0x004) == 2
    assert driver.read(0x008) == 4
    assert driver.read(0x0B0) == 0xFFFFFFFF  # no shared memory region
    assert driver.offered() >> F_VERSION_1 & 1


def test_unaligned_register_access_is_ignored() -> None:
    driver = Driver(VirtioRng())
    assert driver.transport.mmio_read(0x001, 4) == 0
    assert driver.transport.mmio_read(0x000, 2) == 0


def test_features_ok_refused_for_unoffered_feature() -> None:
    driver = Driver(VirtioRng())
    driver.negotiate(RING_FEATURES)
    assert driver.read(0x070) & STATUS_FEATURES_OK
    driver.write(0x070, 0)
    driver.write(0x070, 3)
    driver.set_driver_features(RING_FEATURES | 1 << 40)
    driver.write(0x070, 3 | STATUS_FEATURES_OK)
    assert not driver.read(0x070) & STATUS_FEATURES_OK


def test_features_ok_refused_without_version_1() -> None:
    driver = Driver(VirtioRng())
    assert not driver.negotiate(0) & STATUS_FEATURES_OK


def test_driver_ok_needs_features_ok() -> None:
    driver = Driver(VirtioRng())
    driver.write(0x070, 3)
    driver.write(0x070, 3 | STATUS_DRIVER_OK)
    assert not driver.read(0x070) & STATUS_DRIVER_OK


def test_reset_clears_status_and_queues() -> None:
    driver = Driver(VirtioRng())
    driver.start()
    driver.write(0x030, 0)
    assert driver.read(0x044) == 1
    driver.write(0x070, 0)
    assert driver.read(0x070) == 0
    assert driver.read(0x044) == 0
    assert driver.transport.save_state().queues[0].desc_addr == 0


def test_queue_num_max_is_zero_for_absent_queue() -> None:
    driver = Driver(VirtioRng())
    driver.write(0x030, 5)
    assert driver.read(0x034) == 0


@pytest.mark.anyio
async def test_direct_queue_notify_write_and_interrupt_ack() -> None:
    driver = Driver(VirtioRng())
    driver.start()
    async with running(driver):
        buf = driver.alloc(32)
        head = driver.submit(0, [(buf, 32, True)], kick=False)
        driver.write(0x050, 0)
        assert await driver.wait_used(0) == [(head, 32)]
    assert driver.interrupts() >= 1
    assert driver.read(0x060) & 1
    driver.write(0x064, 1)
    assert driver.read(0x060) == 0


@pytest.mark.anyio
async def test_reset_then_restart_serves_again() -> None:
    driver = Driver(VirtioRng())
    driver.start()
    async with running(driver):
        driver.submit(0, [(driver.alloc(8), 8, True)])
        await driver.wait_used(0)
        driver.start()
        buf = driver.alloc(8)
        head = driver.submit(0, [(buf, 8, True)])
        assert await driver.wait_used(0) == [(head, 8)]


@pytest.mark.anyio
async def test_save_restore_round_trip() -> None:
    driver = Driver(VirtioRng())
    driver.start()
    async with running(driver):
        driver.submit(0, [(driver.alloc(8), 8, True)])
        await driver.wait_used(0)
    state = driver.transport.save_state()
    clone = Driver(VirtioRng(), driver.memory)
    clone.transport.restore_state(state)
    assert clone.transport.save_state() == state
    clone.sizes, clone._next_desc, clone._seen_used = driver.sizes, [1], [1]
    async with running(clone):
        head = clone.submit(0, [(clone.alloc(8), 8, True)])
        assert await clone.wait_used(0) == [(head, 8)]


@pytest.mark.parametrize(
    "change",
    [
        {"driver_features": 1 << 45},
        {"status": 0x10},
        {"device_id": 2},
        {"queues": ()},
    ],
)
def test_restore_rejects_invalid_transport_state(change: dict) -> None:
    driver = Driver(VirtioRng())
    driver.start()
    state = dataclasses.replace(driver.transport.save_state(), **change)
    with pytest.raises(BundleError):
        Driver(VirtioRng(), driver.memory).transport.restore_state(state)


@pytest.mark.parametrize(
    "change",
    [{"size": 100}, {"size": 512}, {"next_avail": 7}, {"next_used": 3}, {"used_addr": 1 << 40}],
)
def test_restore_rejects_invalid_queue_state(change: dict) -> None:
    driver = Driver(VirtioRng())
    driver.start()
    state = driver.transport.save_state()
    queue = dataclasses.replace(state.queues[0], **change)
    with pytest.raises(BundleError):
        Driver(VirtioRng(), driver.memory).transport.restore_state(dataclasses.replace(state, queues=(queue,)))


@pytest.mark.anyio
async def test_event_idx_suppresses_interrupts_until_used_event() -> None:
    driver = Driver(VirtioRng())
    driver.start(RING_FEATURES)
    size = driver.sizes[0]
    driver.memory.write_u16(driver.avail_addr(0) + 4 + 2 * size, 4)  # used_event: after the 5th
    async with running(driver):
        for _ in range(3):
            driver.submit(0, [(driver.alloc(8), 8, True)])
            await driver.wait_used(0)
        assert driver.interrupts() == 0
        # avail_event tells the driver which index to notify at next (§2.7.10)
        assert driver.memory.read_u16(driver.used_addr(0) + 4 + 8 * size) == 3
        for _ in range(2):
            driver.submit(0, [(driver.alloc(8), 8, True)])
            await driver.wait_used(0)
        assert driver.interrupts() == 1


@pytest.mark.anyio
async def test_no_interrupt_flag_without_event_idx() -> None:
    driver = Driver(VirtioRng())
    driver.start(1 << F_VERSION_1)
    driver.memory.write_u16(driver.avail_addr(0), 1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
    async with running(driver):
        driver.submit(0, [(driver.alloc(8), 8, True)])
        await driver.wait_used(0)
    assert driver.interrupts() == 0


@pytest.mark.anyio
async def test_indirect_descriptor_without_the_feature_needs_reset() -> None:
    driver = Driver(VirtioRng())
    driver.start(1 << F_VERSION_1)
    async with running(driver):
        driver.submit(0, [(driver.alloc(8), 8, True)], indirect=True)
        with anyio.fail_after(3):
            while not driver.read(0x070) & STATUS_NEEDS_RESET:
                await anyio.sleep(0.001)
    assert driver.read(0x060) & 2
    assert driver.interrupts() == 1


@pytest.mark.anyio
async def test_cancelling_the_task_leaves_no_taken_chain_unused() -> None:
    driver = Driver(VirtioRng())
    driver.start(RING_FEATURES)
    size = driver.sizes[0]
    for _ in range(size):
        driver.submit(0, [(driver.alloc(4096), 4096, True)], kick=False)
    driver.kick(0)
    with anyio.move_on_after(0.002):
        await driver.transport.run()
    queue = driver.transport.save_state().queues[0]
    assert queue.next_avail == queue.next_used == driver.used_idx(0)
