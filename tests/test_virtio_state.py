"""Every virtio device through save, restore and resume (pausing twice is safe; state round-trips).

The net device's wire is a stream socket (passt's framing) whose far end the test holds, as passt
would: what crosses it is what a user of the machine's network sees.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from virtio_driver import RING_FEATURES, Driver

from smolvmm.devices.virtio.block import VirtioBlock
from smolvmm.devices.virtio.console import VirtioConsole
from smolvmm.devices.virtio.device import VirtioDevice
from smolvmm.devices.virtio.net import MAX_FRAME, VirtioNet
from smolvmm.devices.virtio.ports import UnixSocketPort
from smolvmm.devices.virtio.rng import VirtioRng
from smolvmm.devices.virtio.stream import StreamBackend

Factory = Callable[[Path], VirtioDevice]
NET_HEADER = 12  # struct virtio_net_hdr with num_buffers (VERSION_1)
GUEST_MAC = bytes.fromhex("020000c0ffee")
WIRES: dict[int, socket.socket] = {}
"""The far end of each net device's wire, by ``id`` of the device."""


def block(tmp: Path) -> VirtioDevice:
    image = tmp / "disk.img"
    if not image.exists():
        image.write_bytes(bytes(1 << 20))
    return VirtioBlock(image, serial="state-test")


def console(tmp: Path) -> VirtioDevice:
    return VirtioConsole(UnixSocketPort(tmp / f"console-{len(list(tmp.iterdir()))}.sock"))


def rng(tmp: Path) -> VirtioDevice:
    return VirtioRng()


def net(tmp: Path) -> VirtioDevice:
    ours, far = socket.socketpair()
    device = VirtioNet(StreamBackend(ours, MAX_FRAME), GUEST_MAC)
    far.settimeout(3)
    WIRES[id(device)] = far
    return device


def ethernet_frame(payload: bytes) -> bytes:
    """A broadcast frame from the guest carrying ``payload`` (an experimental EtherType)."""
    return b"\xff" * 6 + GUEST_MAC + b"\x88\xb5" + payload


def frame_on_the_wire(device: VirtioDevice) -> bytes:
    """The next frame the device put on its wire, read at the far end."""
    wire = WIRES[id(device)]
    (length,) = struct.unpack(">I", wire.recv(4, socket.MSG_WAITALL))
    return wire.recv(length, socket.MSG_WAITALL)


def close(driver: Driver) -> None:
    driver.transport.close()
    wire = WIRES.pop(id(driver.transport.device), None)
    if wire is not None:
        wire.close()


async def run_for_a_moment(driver: Driver) -> None:
    with anyio.move_on_after(0.01):
        await driver.transport.run()


def request_queue(device: VirtioDevice) -> int:
    """The queue ``post_request`` uses: the console's and the network card's transmit queue, else 0."""
    return 1 if isinstance(device, VirtioConsole | VirtioNet) else 0


def post_request(driver: Driver) -> int:
    """A request every device here completes: a block read of sector 0, entropy, (for the console)
    an output buffer, or (for the network card) a frame to send carrying b"before"."""
    header = driver.alloc(16, bytes(16))
    data, status = driver.alloc(512), driver.alloc(1)
    device = driver.transport.device
    if isinstance(device, VirtioBlock):
        return driver.submit(0, [(header, 16, False), (data, 512, True), (status, 1, True)])
    if isinstance(device, VirtioConsole):
        return driver.submit(1, [(data, 512, False)])
    if isinstance(device, VirtioNet):
        frame = ethernet_frame(b"before")
        sent = driver.alloc(NET_HEADER + len(frame), bytes(NET_HEADER) + frame)
        return driver.submit(1, [(sent, NET_HEADER + len(frame), False)])
    return driver.submit(0, [(data, 512, True)])


@pytest.mark.parametrize("factory", [block, console, rng, net])
@pytest.mark.anyio
async def test_pause_twice_then_resume_and_round_trip(factory: Factory, tmp_path: Path) -> None:
    driver = Driver(factory(tmp_path))
    driver.start(RING_FEATURES)
    await run_for_a_moment(driver)
    first = driver.transport.save_state()
    await run_for_a_moment(driver)
    assert driver.transport.save_state() == first
    head = post_request(driver)
    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(driver.transport.run)
            [(used_head, _)] = await driver.wait_used(request_queue(driver.transport.device))
            tg.cancel_scope.cancel()
    assert used_head == head
    if isinstance(driver.transport.device, VirtioNet):
        assert frame_on_the_wire(driver.transport.device) == ethernet_frame(b"before")
    first = driver.transport.save_state()
    clone = Driver(factory(tmp_path), driver.memory)
    clone.transport.restore_state(first)
    assert clone.transport.save_state() == first
    for d in (driver, clone):
        close(d)


@pytest.mark.parametrize("factory", [block, rng, net])
@pytest.mark.anyio
async def test_request_made_before_the_snapshot_is_served_after_restore(factory: Factory, tmp_path: Path) -> None:
    """The kick that announced it is lost with the old eventfd; the restored device must look."""
    driver = Driver(factory(tmp_path))
    driver.start(RING_FEATURES)
    head = post_request(driver)
    state = driver.transport.save_state()
    close(driver)
    clone = Driver(factory(tmp_path), driver.memory)
    clone.transport.restore_state(state)
    clone.adopt(driver)
    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(clone.transport.run)
            [(used_head, _)] = await clone.wait_used(request_queue(clone.transport.device))
            tg.cancel_scope.cancel()
    assert used_head == head
    if isinstance(clone.transport.device, VirtioNet):  # the frame goes out on the restored machine's wire
        assert frame_on_the_wire(clone.transport.device) == ethernet_frame(b"before")
    close(clone)


@pytest.mark.anyio
async def test_net_receives_into_buffers_posted_before_the_snapshot(tmp_path: Path) -> None:
    """A user's traffic reaches a restored guest: frames arriving on the restored machine's wire
    land, whole and in order, in the receive buffers the guest posted before it was saved."""
    driver = Driver(net(tmp_path))
    driver.start(RING_FEATURES)
    buffers = {driver.submit(0, [(gpa, 1526, True)]): gpa for gpa in (driver.alloc(1526) for _ in range(2))}
    state = driver.transport.save_state()
    close(driver)
    clone = Driver(net(tmp_path), driver.memory)
    clone.transport.restore_state(state)
    clone.adopt(driver)
    frames = [ethernet_frame(b"after-%d" % i) for i in range(2)]
    wire = WIRES[id(clone.transport.device)]
    for frame in frames:
        wire.sendall(struct.pack(">I", len(frame)) + frame)
    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(clone.transport.run)
            used = await clone.wait_used(0, count=2)
            tg.cancel_scope.cancel()
    received = [clone.memory.read(buffers[head], length)[NET_HEADER:] for head, length in used]
    assert received == frames
    close(clone)
