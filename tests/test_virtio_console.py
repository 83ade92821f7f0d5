"""virtio-console both ways, over a pipe pair (as for hvc0 on stdio) and over the Unix socket port."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import anyio
import pytest
from virtio_driver import RING_FEATURES, Driver, running

from smolvmm.devices.virtio.console import RX, TX, VirtioConsole
from smolvmm.devices.virtio.ports import FdPort, UnixSocketPort


def post_receive_buffers(driver: Driver, count: int = 4, size: int = 64) -> dict[int, int]:
    buffers = {}
    for _ in range(count):
        gpa = driver.alloc(size)
        buffers[driver.submit(RX, [(gpa, size, True)])] = gpa
    return buffers


async def guest_reads(driver: Driver, buffers: dict[int, int], length: int) -> bytes:
    data = b""
    with anyio.fail_after(3):
        while len(data) < length:
            for head, length in await driver.wait_used(RX):
                data += driver.memory.read(buffers[head], length)
    return data


def guest_writes(driver: Driver, data: bytes) -> None:
    driver.submit(TX, [(driver.alloc(len(data), data), len(data), False)])


@pytest.mark.anyio
async def test_console_over_pipes_both_ways() -> None:
    to_guest_r, to_guest_w = os.pipe()
    from_guest_r, from_guest_w = os.pipe()
    driver = Driver(VirtioConsole(FdPort(to_guest_r, from_guest_w)))
    assert driver.transport.mmio_read(0x104, 4) == 1  # max_nr_ports
    driver.start(RING_FEATURES)
    async with running(driver):
        buffers = post_receive_buffers(driver, size=8)
        os.write(to_guest_w, b"echo hello from the host\n")
        assert await guest_reads(driver, buffers, 25) == b"echo hello from the host\n"
        guest_writes(driver, b"login: ")
        guest_writes(driver, b"root\n")
        await driver.wait_used(TX, 2)
        with anyio.fail_after(3):
            out = b""
            while out != b"login: root\n":
                await anyio.wait_readable(from_guest_r)
                out += os.read(from_guest_r, 100)
    driver.transport.close()
    for fd in (to_guest_r, to_guest_w, from_guest_r, from_guest_w):
        os.close(fd)


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.setblocking(False)
    return sock


async def receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    with anyio.fail_after(3):
        while len(data) < size:
            await anyio.wait_readable(sock)
            data += sock.recv(100)
    return data


@pytest.mark.anyio
async def test_console_socket_port_serves_one_client_after_another(tmp_path: Path) -> None:
    path = tmp_path / "console.sock"
    driver = Driver(VirtioConsole(UnixSocketPort(path)))
    driver.start(RING_FEATURES)
    async with running(driver):
        guest_writes(driver, b"nobody is listening\n")  # dropped, and must not block the guest
        await driver.wait_used(TX)
        buffers = post_receive_buffers(driver)
        first = connect(path)
        first.send(b"ping\n")
        assert await guest_reads(driver, buffers, 5) == b"ping\n"
        guest_writes(driver, b"pong\n")
        assert await receive(first, 5) == b"pong\n"
        first.close()
        second = connect(path)
        second.send(b"again\n")
        assert await guest_reads(driver, buffers, 6) == b"again\n"
        guest_writes(driver, b"still here\n")
        assert await receive(second, 11) == b"still here\n"
        second.close()
    driver.transport.close()
    assert not path.exists()


@pytest.mark.anyio
async def test_fd_port_drops_output_once_the_reader_is_gone() -> None:
    read_end, write_end = os.pipe()
    port = FdPort(read_end, write_end)
    os.close(read_end)
    with anyio.fail_after(3):
        await port.send(b"nobody reads this")
        await port.send(b"nor this")
    os.close(write_end)


@pytest.mark.anyio
async def test_a_receive_buffer_keeps_nothing_of_an_earlier_longer_input() -> None:
    """A buffer the guest posts again holds only the new input: the rest of an earlier one (a
    secret, say, before a snapshot) is cleared, whatever length the new input has."""
    to_guest_r, to_guest_w = os.pipe()
    from_guest_r, from_guest_w = os.pipe()
    driver = Driver(VirtioConsole(FdPort(to_guest_r, from_guest_w)))
    driver.start(RING_FEATURES)
    async with running(driver):
        gpa = driver.alloc(64)
        buffers = {driver.submit(RX, [(gpa, 64, True)]): gpa}
        os.write(to_guest_w, b"TOKEN=s3cr3t-0123456789abcdef\n")
        assert await guest_reads(driver, buffers, 30) == b"TOKEN=s3cr3t-0123456789abcdef\n"
        buffers = {driver.submit(RX, [(gpa, 64, True)]): gpa}
        os.write(to_guest_w, b"ok")
        assert await guest_reads(driver, buffers, 2) == b"ok"
        assert driver.memory.read(gpa, 64) == b"ok" + bytes(62)
    driver.transport.close()
    for fd in (to_guest_r, to_guest_w, from_guest_r, from_guest_w):
        os.close(fd)
