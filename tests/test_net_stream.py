"""The stream network backend (passt's framing) against a socketpair playing passt, natively."""

from __future__ import annotations

import os
import socket
import struct

import anyio
import pytest
from virtio_driver import RING_FEATURES, Driver, running

from smolvmm.devices.virtio.net import F_CSUM, F_GUEST_CSUM, F_HOST_TSO4, F_MAC, F_MRG_RXBUF, VirtioNet
from smolvmm.devices.virtio.stream import SEND_BACKLOG, StreamBackend

HDR = 12
MAC = bytes.fromhex("020000c0ffee")


def framed(frame: bytes) -> bytes:
    return struct.pack(">I", len(frame)) + frame


def pair(max_frame: int = 1514) -> tuple[StreamBackend, socket.socket]:
    ours, peer = socket.socketpair()
    return StreamBackend(ours, max_frame), peer


def read_frame(backend: StreamBackend, size: int = 2048) -> bytes | None:
    buffer = bytearray(size)
    length = backend.read_into([memoryview(buffer)])
    return None if length is None else bytes(buffer[:length])


def test_frames_split_anywhere_across_reads_come_out_whole() -> None:
    backend, peer = pair()
    frames = [os.urandom(n) for n in (60, 1514, 1, 700)]
    wire = b"".join(framed(f) for f in frames)
    received = []
    for cut in range(0, len(wire), 7):  # 7-byte pieces split both lengths and frames
        peer.sendall(wire[cut : cut + 7])
        while (frame := read_frame(backend)) is not None:
            received.append(frame)
    assert received == [bytes(HDR) + f for f in frames]
    assert read_frame(backend) is None  # nothing waiting: None, never a block


def test_frame_scatters_over_views_and_is_cut_where_they_end() -> None:
    backend, peer = pair()
    frame = os.urandom(100)
    peer.sendall(framed(frame) + framed(b"next"))
    first, second = bytearray(HDR), bytearray(50)
    assert backend.read_into([memoryview(first), memoryview(second)]) == HDR + 50
    assert bytes(first) == bytes(HDR) and bytes(second) == frame[:50]
    assert read_frame(backend) == bytes(HDR) + b"next"  # the cut frame's rest did not leak into the next


def test_a_frame_over_the_limit_is_skipped_and_the_stream_stays_in_step() -> None:
    backend, peer = pair(max_frame=1000)
    huge = os.urandom(300_000)  # more than the receive buffer: it is discarded, not buffered
    with anyio.from_thread.start_blocking_portal() as portal:  # the peer writes while we read
        sender = portal.start_task_soon(anyio.to_thread.run_sync, peer.sendall, framed(huge) + framed(b"after"))
        received = []
        while not received:
            frame = read_frame(backend)
            if frame is not None:
                received.append(frame)
        sender.result()
    assert received == [bytes(HDR) + b"after"]


def test_transmit_strips_the_virtio_header_and_frames_the_rest() -> None:
    backend, peer = pair()
    frame = os.urandom(300)
    header = b"\x01" * HDR  # whatever the guest put there, the wire never sees it
    data = header + frame
    backend.write_from([memoryview(data[:5]), memoryview(data[5:20]), memoryview(data[20:])])
    assert peer.recv(1000) == framed(frame)


@pytest.mark.anyio
async def test_a_full_socket_finishes_started_frames_and_drops_beyond_the_backlog() -> None:
    backend, peer = pair(max_frame=65536)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    frame = os.urandom(60000)
    count = 2 * SEND_BACKLOG // len(frame)
    for _ in range(count):  # nobody reads: the socket fills, then the backlog, then frames drop
        backend.write_from([memoryview(bytes(HDR) + frame)])
    assert 0 < backend.dropped < count
    sent = count - backend.dropped
    received = bytearray()
    async with anyio.create_task_group() as tg:
        tg.start_soon(backend.serve)
        with anyio.fail_after(10):
            while len(received) < sent * (4 + len(frame)):
                await anyio.wait_readable(peer)
                received += peer.recv(1 << 20)
        tg.cancel_scope.cancel()
    assert bytes(received) == framed(frame) * sent  # every started frame arrived whole, in order


def test_a_closed_peer_is_an_error_then_silence() -> None:
    backend, peer = pair()
    peer.sendall(framed(b"last"))
    peer.close()
    assert read_frame(backend) == bytes(HDR) + b"last"
    with pytest.raises(ConnectionResetError):
        read_frame(backend)


@pytest.mark.anyio
async def test_the_device_over_a_stream_offers_no_offloads_and_moves_frames_both_ways() -> None:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    device = VirtioNet(StreamBackend(ours, 65536 + 256), MAC)
    driver = Driver(device)
    offered = driver.offered()
    assert offered & (1 << F_MAC | 1 << F_MRG_RXBUF) == 1 << F_MAC | 1 << F_MRG_RXBUF
    assert not offered & (1 << F_CSUM | 1 << F_GUEST_CSUM | 1 << F_HOST_TSO4)
    driver.start(RING_FEATURES | 1 << F_MAC | 1 << F_MRG_RXBUF)
    async with running(driver):
        rx = {}
        for _ in range(8):
            gpa = driver.alloc(2048)
            rx[driver.submit(0, [(gpa, 2048, True)])] = gpa
        jumbo = os.urandom(9000)  # five merged buffers
        peer.send(framed(b"\xff" * 6 + b"small frame"))
        peer.send(framed(jumbo))
        used = await driver.wait_used(0, count=6)
        data = [driver.memory.read(rx[head], length) for head, length in used]
        assert struct.unpack_from("<H", data[0], 10)[0] == 1 and data[0][HDR:] == b"\xff" * 6 + b"small frame"
        assert struct.unpack_from("<H", data[1], 10)[0] == 5 and b"".join(data[1:])[HDR:] == jumbo
        out = os.urandom(1500)
        tx = driver.alloc(HDR + len(out), bytes(HDR) + out)
        driver.submit(1, [(tx, HDR, False), (tx + HDR, len(out), False)])
        await driver.wait_used(1)
        with anyio.fail_after(3):
            await anyio.wait_readable(peer)
        assert peer.recv(4096) == framed(out)
    driver.transport.close()
    peer.close()
