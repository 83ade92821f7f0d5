"""The virtio-mmio transport: identification, feature negotiation, reset, interrupts, state."""

from __future__ import annotations

import ctypes
import dataclasses

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from virtio_driver import RING_FEATURES, Driver, running

from smolvmm.devices.virtio.device import F_VERSION_1
from smolvmm.devices.virtio.mmio import (
    MAGIC,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    MmioState,
)
from smolvmm.devices.virtio.queue import DescriptorChain, QueueState
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


def test_a_status_bit_is_cleared_only_by_a_reset() -> None:
    driver = Driver(VirtioRng())
    driver.start()
    live = driver.read(0x070)
    assert live & STATUS_DRIVER_OK
    driver.write(0x070, STATUS_ACKNOWLEDGE)  # §2.1.2: not a reset, so nothing is cleared
    assert driver.read(0x070) == live
    driver.write(0x030, 0)
    driver.write(0x044, 0)  # a queue may still be stopped, but not moved and restarted
    driver.write(0x080, 0x4000)
    driver.write(0x044, 1)
    assert driver.read(0x044) == 0
    assert driver.transport.save_state().queues[0].desc_addr != 0x4000


def test_queue_can_be_stopped_but_not_restarted_while_live() -> None:
    driver = Driver(VirtioRng())
    driver.start()
    driver.write(0x030, 0)
    driver.write(0x044, 0)
    assert driver.read(0x044) == 0  # Linux checks this when it deletes a queue
    driver.write(0x044, 1)
    assert driver.read(0x044) == 0


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


def test_interrupt_status_word_is_the_registers_own() -> None:
    """The word a hypervisor serves InterruptStatus and InterruptACK from (``interrupt_words``)
    is the one the registers, the interrupts, a reset and save/restore use."""
    driver = Driver(VirtioRng())
    driver.start()
    words = driver.transport.interrupt_words(0x1000)
    if not words:
        pytest.skip("no C compiler: the word is Python's and no hypervisor is handed it")
    (status, word, status_clears), (ack, same, ack_clears) = words
    assert (status, ack, status_clears, ack_clears, same) == (0x1060, 0x1064, False, True, word)
    cell = ctypes.c_uint32.from_address(word)
    driver.transport.config_changed()
    assert cell.value == driver.read(0x060) == 2
    cell.value = 3  # as the vCPU loop's C leaves it
    assert driver.read(0x060) == 3
    driver.write(0x064, 1)
    assert cell.value == 2
    assert driver.transport.save_state().interrupt_status == 2
    driver.write(0x070, 0)  # reset
    assert cell.value == 0


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
    clone.adopt(driver)
    async with running(clone):
        head = clone.submit(0, [(clone.alloc(8), 8, True)])
        assert await clone.wait_used(0) == [(head, 8)]


class Configurable(VirtioRng):
    """An rng with a one-byte configuration the test can change."""

    value = 1

    def config(self) -> bytes:
        return bytes([self.value])


def test_config_change_moves_the_generation_and_notifies_a_live_driver() -> None:
    driver = Driver(Configurable())
    device = driver.transport.device
    assert isinstance(device, Configurable)
    driver.negotiate()
    device.value = 2
    driver.transport.config_changed()  # no live driver yet: no notification
    assert (driver.read(0x100) & 0xFF, driver.read(0x0FC), driver.read(0x060)) == (2, 1, 0)
    assert driver.interrupts() == 0

    driver.start()
    state = driver.transport.save_state()
    clone = Driver(Configurable(), driver.memory)
    clone.transport.restore_state(state)  # a restored driver is live ...
    assert clone.read(0x0FC) == 1
    clone.transport.config_changed()  # ... so it hears of the change
    assert (clone.read(0x0FC), clone.read(0x060)) == (2, 2)
    assert clone.interrupts() == 1


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


@pytest.mark.anyio
async def test_a_driver_that_keeps_its_ring_full_gets_one_batch_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = Driver(VirtioRng())
    driver.start(RING_FEATURES, size=8)
    served_since_yield = most = 0

    def refill(chain: DescriptorChain) -> int:
        # The guest posts the buffer again as soon as the device takes it, from another vCPU.
        nonlocal served_since_yield, most
        served_since_yield += 1
        most = max(most, served_since_yield)
        if served_since_yield < 1000:  # without a bound the device would never stop
            driver.publish(0, chain.head)
        return 0

    monkeypatch.setattr(VirtioRng, "_fill", staticmethod(refill))
    driver.submit(0, [(driver.alloc(16), 16, True)])
    async with running(driver):
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
            served_since_yield = 0
    # A batch is at most the queue size; a scheduler may run the device twice in a row.
    assert 0 < most <= 2 * 8


register_ops = st.lists(
    st.tuples(
        st.booleans(),
        st.one_of(st.integers(0, 0x1FF), st.sampled_from(list(range(0, 0x100, 4)))),
        st.sampled_from([1, 2, 4, 8]),
        st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 1, 0xF, 0xFF, 0x1000, 1 << 31])),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=register_ops)
def test_random_register_traffic_never_raises(ops) -> None:
    driver = Driver(VirtioRng())
    driver.negotiate()  # halfway through a bring-up, so random writes reach deeper states
    for is_write, offset, size, value in ops:
        if is_write:
            driver.transport.mmio_write(offset, size, value)
        else:
            assert 0 <= driver.transport.mmio_read(offset, size) < 1 << (8 * size)

    async def run_briefly() -> None:
        with anyio.move_on_after(0.001):
            await driver.transport.run()

    anyio.run(run_briefly)
    driver.transport.close()


index = st.one_of(st.integers(0, 0xFFFF), st.integers(-(2**70), 2**70))
queue_states = st.builds(
    QueueState,
    size=st.sampled_from([0, 1, 3, 64, 256, 512]),
    ready=st.booleans(),
    desc_addr=st.one_of(st.just(0x10000), index),
    avail_addr=st.one_of(st.just(0x14000), index),
    used_addr=st.one_of(st.just(0x18000), index),
    next_avail=index,
    next_used=index,
    event_idx=st.booleans(),
)


@settings(max_examples=500, deadline=None)
@given(
    status=st.integers(0, 0xFF),
    features=st.one_of(st.just(RING_FEATURES), st.integers(0, 2**64)),
    queue=queue_states,
)
def test_restore_of_random_state_loads_or_raises_bundle_error(status, features, queue) -> None:
    driver = Driver(VirtioRng())
    state = MmioState(4, status, RING_FEATURES, features, 0, 0, 0, 0, 0, (queue,), None)
    try:
        driver.transport.restore_state(state)
    except BundleError:
        return
    finally:
        driver.transport.close()
    assert queue.size in (1, 64, 256) and 0 <= queue.next_avail <= 0xFFFF
