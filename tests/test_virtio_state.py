"""Every virtio device through save, restore and resume (pausing twice is safe; state round-trips)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from virtio_driver import RING_FEATURES, Driver

from smolvmm.devices.virtio.block import VirtioBlock
from smolvmm.devices.virtio.console import VirtioConsole
from smolvmm.devices.virtio.device import VirtioDevice
from smolvmm.devices.virtio.ports import UnixSocketPort
from smolvmm.devices.virtio.rng import VirtioRng

Factory = Callable[[Path], VirtioDevice]


def block(tmp: Path) -> VirtioDevice:
    image = tmp / "disk.img"
    if not image.exists():
        image.write_bytes(bytes(1 << 20))
    return VirtioBlock(image, serial="state-test")


def console(tmp: Path) -> VirtioDevice:
    return VirtioConsole(UnixSocketPort(tmp / f"console-{len(list(tmp.iterdir()))}.sock"))


def rng(tmp: Path) -> VirtioDevice:
    return VirtioRng()


async def run_for_a_moment(driver: Driver) -> None:
    with anyio.move_on_after(0.01):
        await driver.transport.run()


def post_request(driver: Driver) -> int:
    """A request every device here completes: a block read of sector 0, entropy, or (for the
    console) an output buffer."""
    header = driver.alloc(16, bytes(16))
    data, status = driver.alloc(512), driver.alloc(1)
    device = driver.transport.device
    if isinstance(device, VirtioBlock):
        return driver.submit(0, [(header, 16, False), (data, 512, True), (status, 1, True)])
    if isinstance(device, VirtioConsole):
        return driver.submit(1, [(data, 512, False)])
    return driver.submit(0, [(data, 512, True)])


@pytest.mark.parametrize("factory", [block, console, rng])
@pytest.mark.anyio
async def test_pause_twice_then_resume_and_round_trip(factory: Factory, tmp_path: Path) -> None:
    driver = Driver(factory(tmp_path))
    driver.start(RING_FEATURES)
    await run_for_a_moment(driver)
    first = driver.transport.save_state()
    await run_for_a_moment(driver)
    assert driver.transport.save_state() == first
    queue = 1 if isinstance(driver.transport.device, VirtioConsole) else 0
    head = post_request(driver)
    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(driver.transport.run)
            [(used_head, _)] = await driver.wait_used(queue)
            tg.cancel_scope.cancel()
    assert used_head == head
    first = driver.transport.save_state()
    clone = Driver(factory(tmp_path), driver.memory)
    clone.transport.restore_state(first)
    assert clone.transport.save_state() == first
    for d in (driver, clone):
        d.transport.close()


@pytest.mark.parametrize("factory", [block, rng])
@pytest.mark.anyio
async def test_request_made_before_the_snapshot_is_served_after_restore(factory: Factory, tmp_path: Path) -> None:
    """The kick that announced it is lost with the old eventfd; the restored device must look."""
    driver = Driver(factory(tmp_path))
    driver.start(RING_FEATURES)
    head = post_request(driver)
    state = driver.transport.save_state()
    driver.transport.close()
    clone = Driver(factory(tmp_path), driver.memory)
    clone.transport.restore_state(state)
    clone.adopt(driver)
    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(clone.transport.run)
            [(used_head, _)] = await clone.wait_used(0)
            tg.cancel_scope.cancel()
    assert used_head == head
    clone.transport.close()
