"""virtio-net over a real TAP device in a private network namespace (needs root)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator

import anyio
import pytest
from network import checksum, echo, in_netns
from virtio_driver import RING_FEATURES, Driver, running

from smolvmm.devices.virtio.net import (
    F_CSUM,
    F_GUEST_CSUM,
    F_GUEST_TSO4,
    F_HOST_TSO4,
    F_MAC,
    F_MRG_RXBUF,
    MAX_FRAME,
    VirtioNet,
    random_mac,
)
from smolvmm.devices.virtio.session import Session
from smolvmm.devices.virtio.stream import StreamBackend
from smolvmm.devices.virtio.tap import TUN_F_CSUM, TUN_F_TSO4, Tap
from smolvmm.errors import ConfigError

HOST_IP, GUEST_IP = "10.77.0.1", "10.77.0.2"
GUEST_MAC = bytes.fromhex("020000c0ffee")
HDR = 12
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating network namespaces needs root")


def namespace(role: str) -> Iterator[str]:
    name = f"smolvmm-{role}-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """The host side: where the device's tap lives."""
    yield from namespace("host")


@pytest.fixture
def guest_netns() -> Iterator[str]:
    """A stand-in for the guest's network stack, on the far side of the test driver."""
    yield from namespace("guest")


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout


def udp_frame(dst_mac: bytes, src_port: int, dst_port: int, payload: bytes) -> bytes:
    """An Ethernet/IPv4/UDP frame from the guest to the host (UDP checksum 0: none)."""
    udp = struct.pack("!HHHH", src_port, dst_port, 8 + len(payload), 0) + payload
    ip_header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        1,
        0,
        64,
        17,
        0,
        socket.inet_aton(GUEST_IP),
        socket.inet_aton(HOST_IP),
    )
    ip_header = ip_header[:10] + struct.pack("!H", checksum(ip_header)) + ip_header[12:]
    return dst_mac + GUEST_MAC + b"\x08\x00" + ip_header + udp


def attach(ns: str) -> tuple[Driver, bytes]:
    """A net device on tap0 inside ``ns``, the tap configured; returns the driver and tap MAC."""
    device = in_netns(ns, lambda: VirtioNet(Tap("tap0"), GUEST_MAC))
    ip(ns, "link", "set", "tap0", "up")
    ip(ns, "addr", "add", f"{HOST_IP}/24", "dev", "tap0")
    ip(ns, "neigh", "add", GUEST_IP, "lladdr", GUEST_MAC.hex(":"), "dev", "tap0")
    tap_mac = bytes.fromhex(ip(ns, "-br", "link", "show", "tap0").split()[2].replace(":", ""))
    return Driver(device), tap_mac


def host_udp_socket(ns: str) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((HOST_IP, 9999))
        sock.setblocking(False)
        return sock

    return in_netns(ns, make)


def count_ring_attempts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the device's attempts to put frames in the RX ring (``fill`` and ``spread``): a
    device that spins on a readable tap makes thousands a second, a waiting one none."""
    calls = [0]
    for name in ("fill", "spread"):
        original = getattr(Session, name)

        def counted(self: Session, *args: object, _original: Callable[..., object] = original) -> object:
            calls[0] += 1
            return _original(self, *args)

        monkeypatch.setattr(Session, name, counted)
    return calls


async def wait_frame(driver: Driver, buffers: dict[int, int], match: Callable[[bytes], bool]) -> tuple[bytes, bytes]:
    """Wait for a received frame that ``match`` accepts; returns its virtio header and the frame."""
    with anyio.fail_after(3):
        while True:
            for head, length in await driver.wait_used(0):
                frame = driver.memory.read(buffers[head], length)
                assert frame[10:12] == b"\x01\x00"  # num_buffers
                if match(frame[HDR:]):
                    return frame[:HDR], frame[HDR:]


@pytest.mark.anyio
async def test_udp_crosses_the_device_both_ways(netns: str) -> None:
    driver, tap_mac = attach(netns)
    host = host_udp_socket(netns)
    driver.start(RING_FEATURES | 1 << F_MAC | 1 << F_CSUM | 1 << F_GUEST_CSUM)
    assert driver.transport.mmio_read(0x100, 4) | driver.transport.mmio_read(0x104, 2) << 32 == int.from_bytes(
        GUEST_MAC, "little"
    )
    async with running(driver):
        rx = {}
        for _ in range(8):
            gpa = driver.alloc(1526)
            rx[driver.submit(0, [(gpa, 1526, True)])] = gpa
        # guest -> host
        frame = udp_frame(tap_mac, 5555, 9999, b"hello host")
        tx = driver.alloc(HDR + len(frame), bytes(HDR) + frame)
        driver.submit(1, [(tx, HDR, False), (tx + HDR, len(frame), False)])
        await driver.wait_used(1)
        with anyio.fail_after(3):
            await anyio.wait_readable(host)
        data, sender = host.recvfrom(100)
        assert (data, sender) == (b"hello host", (GUEST_IP, 5555))
        # host -> guest
        host.sendto(b"hello guest", (GUEST_IP, 7777))
        header, received = await wait_frame(driver, rx, lambda f: f[12:14] == b"\x08\x00" and f[23] == 17)
        assert header[0] & 1  # VIRTIO_NET_HDR_F_NEEDS_CSUM: the checksum offload reached the guest
        assert received[:6] == GUEST_MAC
        assert received.endswith(b"hello guest")
    host.close()
    driver.transport.close()


def swap_addresses(request: bytes) -> bytes:
    """The IPv4 header of ``request`` turned around, checksum recomputed."""
    header = bytearray(request[14:34])
    header[12:16], header[16:20] = request[30:34], request[26:30]
    header[10:12] = b"\0\0"
    header[10:12] = struct.pack("!H", checksum(bytes(header)))
    return bytes(header)


@pytest.mark.anyio
async def test_ping_from_host_is_answered_through_the_device(netns: str) -> None:
    driver, tap_mac = attach(netns)
    pinger = in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
    pinger.setblocking(False)
    driver.start(RING_FEATURES | 1 << F_MAC)
    async with running(driver):
        rx = {}
        for _ in range(8):
            gpa = driver.alloc(1526)
            rx[driver.submit(0, [(gpa, 1526, True)])] = gpa
        pinger.sendto(echo(8, 0x5A5A, b"smolvmm ping"), (GUEST_IP, 0))
        _, request = await wait_frame(driver, rx, lambda f: f[23] == 1 and f[34] == 8)
        reply = tap_mac + GUEST_MAC + b"\x08\x00" + swap_addresses(request) + echo(0, 0x5A5A, b"smolvmm ping")
        tx = driver.alloc(HDR + len(reply), bytes(HDR) + reply)
        driver.submit(1, [(tx, HDR + len(reply), False)])
        with anyio.fail_after(3):
            while True:
                await anyio.wait_readable(pinger)
                packet = pinger.recv(1500)
                if packet[20] == 0:
                    break
    assert packet[20:] == echo(0, 0x5A5A, b"smolvmm ping")
    pinger.close()
    driver.transport.close()


@pytest.mark.anyio
async def test_rx_waits_for_guest_buffers_without_spinning(netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    driver, _ = attach(netns)
    attempts = count_ring_attempts(monkeypatch)
    host = host_udp_socket(netns)
    driver.start(RING_FEATURES | 1 << F_MAC)
    async with running(driver):
        for _ in range(3):
            host.sendto(b"queued", (GUEST_IP, 7777))
        await anyio.sleep(0.3)
        assert attempts[0] == 0  # no buffers: the device sleeps on the queue, not on the tap
        gpa = driver.alloc(1526)
        rx = {driver.submit(0, [(gpa, 1526, True)]): gpa}
        header, _ = await wait_frame(driver, rx, lambda f: f.endswith(b"queued"))
        assert header[0] == 0  # no GUEST_CSUM negotiated: the kernel checksummed it
    host.close()
    driver.transport.close()


def test_bad_mac_and_tap_name_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        VirtioNet(StreamBackend(socket.socketpair()[0], 1514), b"\x01\x02\x03\x04\x05\x06")
    with pytest.raises(ConfigError):
        Tap("x" * 20)
    mac = random_mac()
    assert mac[0] & 3 == 2


async def merged_frame(driver: Driver, buffers: dict[int, int]) -> tuple[int, bytes]:
    """Reassemble one frame received into merged buffers; returns (num_buffers, frame)."""
    used = await driver.wait_used(0)
    data = b"".join(driver.memory.read(buffers[head], length) for head, length in used)
    count = struct.unpack_from("<H", data, 10)[0]
    assert len(used) == count  # all of a frame's buffers are published together
    return count, data[HDR:]


@pytest.mark.anyio
async def test_mergeable_rx_buffers_carry_a_jumbo_frame(netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    driver, _ = attach(netns)
    attempts = count_ring_attempts(monkeypatch)
    ip(netns, "link", "set", "tap0", "mtu", "9000")
    host = host_udp_socket(netns)
    driver.start(RING_FEATURES | 1 << F_MAC | 1 << F_MRG_RXBUF)
    async with running(driver):
        rx = {}
        for _ in range(2):
            gpa = driver.alloc(1024)
            rx[driver.submit(0, [(gpa, 1024, True)])] = gpa
        payload = os.urandom(8000)
        host.sendto(payload, (GUEST_IP, 7777))
        await anyio.sleep(0.2)  # 2 KiB of buffers cannot hold it: the device waits without spinning
        assert attempts[0] <= 2
        assert driver.take_used(0) == []
        for _ in range(14):
            gpa = driver.alloc(1024)
            rx[driver.submit(0, [(gpa, 1024, True)])] = gpa
        count, frame = await merged_frame(driver, rx)
    assert count == 8  # 12 + 14 + 20 + 8 + 8000 = 8054 bytes in 1 KiB buffers
    assert frame[:6] == GUEST_MAC and frame.endswith(payload)
    host.close()
    driver.transport.close()


class KernelGuest:
    """Plays a guest whose network stack is a real kernel: the driver relays the device's queues
    to a second tap in another namespace, so TCP (with TSO and checksum offload) crosses the
    device between two kernels."""

    def __init__(self, driver: Driver, tap: Tap) -> None:
        self.driver, self.tap = driver, tap
        self.gso_received = self.gso_sent = 0

    async def relay_rx(self) -> None:
        buffers = {}
        for _ in range(64):
            gpa = self.driver.alloc(4096)
            buffers[self.driver.submit(0, [(gpa, 4096, True)])] = gpa
        used: list[tuple[int, int]] = []
        while True:
            used += await self.driver.wait_used(0, timeout=60)
            while used:
                count = struct.unpack("<H", self.driver.memory.read(buffers[used[0][0]] + 10, 2))[0]
                if len(used) < count:
                    break
                frame, used = used[:count], used[count:]
                data = b"".join(self.driver.memory.read(buffers[head], length) for head, length in frame)
                self.gso_received += data[1] != 0  # gso_type: a TSO frame reached the guest whole
                os.write(self.tap.fd, data)
                for head, _ in frame:
                    buffers[self.driver.submit(0, [(buffers[head], 4096, True)], kick=False)] = buffers[head]
                self.driver.kick(0)

    async def relay_tx(self) -> None:
        slot = self.driver.alloc(MAX_FRAME)
        while True:
            await anyio.wait_readable(self.tap.fd)
            length = self.tap.read_into([self.driver.memory.view(slot, MAX_FRAME)])
            if length is None:
                continue
            self.gso_sent += self.driver.memory.read(slot + 1, 1) != b"\0"
            self.driver.submit(1, [(slot, length, False)])
            await self.driver.wait_used(1, timeout=60)


def stream(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` while receiving as much from the peer (both ends do this); blocking."""
    received = bytearray()
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    while len(received) < len(payload):
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        received += chunk
    sender.join()
    return bytes(received)


@pytest.mark.anyio
async def test_tcp_with_offloads_between_two_kernels(netns: str, guest_netns: str) -> None:
    driver, tap_mac = attach(netns)
    guest_tap = in_netns(guest_netns, lambda: Tap("tap1"))
    guest_tap.set_offloads(TUN_F_CSUM | TUN_F_TSO4)
    for args in (
        ("link", "set", "tap1", "address", GUEST_MAC.hex(":")),
        ("link", "set", "tap1", "up"),
        ("addr", "add", f"{GUEST_IP}/24", "dev", "tap1"),
        ("neigh", "add", HOST_IP, "lladdr", tap_mac.hex(":"), "dev", "tap1"),
    ):
        ip(guest_netns, *args)
    listener = in_netns(netns, lambda: socket.create_server((HOST_IP, 8080)))
    client = in_netns(guest_netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    offloads = 1 << F_CSUM | 1 << F_GUEST_CSUM | 1 << F_GUEST_TSO4 | 1 << F_HOST_TSO4 | 1 << F_MRG_RXBUF
    driver.start(RING_FEATURES | 1 << F_MAC | offloads)
    guest = KernelGuest(driver, guest_tap)
    up, down = os.urandom(1 << 20), os.urandom(1 << 20)
    async with running(driver), anyio.create_task_group() as relays:
        relays.start_soon(guest.relay_rx)
        relays.start_soon(guest.relay_tx)
        with anyio.fail_after(60):
            await anyio.to_thread.run_sync(client.connect, (HOST_IP, 8080))
            server, _ = await anyio.to_thread.run_sync(listener.accept)
            async with anyio.create_task_group() as ends:
                results = {}

                async def run(name: str, sock: socket.socket, payload: bytes) -> None:
                    results[name] = await anyio.to_thread.run_sync(stream, sock, payload)

                ends.start_soon(run, "host", server, down)
                ends.start_soon(run, "guest", client, up)
        relays.cancel_scope.cancel()
    assert results["host"] == up and results["guest"] == down
    assert guest.gso_received and guest.gso_sent  # TSO frames crossed the device both ways
    for sock in (server, client, listener):
        sock.close()
    guest_tap.close()
    driver.transport.close()
