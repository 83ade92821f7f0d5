"""User networking natively: a real passt in a network namespace the test makes (an interface with
a default route, which passt takes its addresses from), spoken to as the guest would."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from network import GATEWAY, HOST_ADDRESS, checksum, in_netns, named_netns, tcp_frame

from smolvmm import Machine, MachineConfig
from smolvmm.config import NetConfig, PortForward
from smolvmm.errors import ConfigError
from smolvmm.monitor.handshakes import ACK, RST, SYN, Segment, tcp_segment
from smolvmm.monitor.usernet import PasstBackend, open_vhost, user_networking_unavailable
from smolvmm.monitor.vcpu import install_kick_handler
from smolvmm.oci.build import ImageRecipe, recipe_networks

GUEST_MAC = bytes.fromhex("020000c0ffee")
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creating network namespaces needs root"),
    pytest.mark.skipif(not any(os.access(f"{d}/passt", os.X_OK) for d in os.get_exec_path()), reason="passt missing"),
]


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """A namespace whose only interface has an address and a default route (a tap nobody reads:
    nothing leaves the machine)."""
    with named_netns(f"smolvmm-passt-{os.getpid()}") as name:
        yield name


def passt_children() -> list[int]:
    """The passt processes this test process started that are still alive."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/comm") as comm:
                name = comm.read().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if name.startswith("passt") and int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.append(int(entry))
    return found


def dhcp_discover() -> bytes:
    bootp = struct.pack(
        "!BBBBIHH4s4s4s4s16s192sI",
        1,
        1,
        6,
        0,
        0x5A5A,
        0,
        0x8000,
        bytes(4),
        bytes(4),
        bytes(4),
        bytes(4),
        GUEST_MAC,
        bytes(192),
        0x63825363,
    )
    bootp += bytes([53, 1, 1, 55, 3, 1, 3, 6, 255])
    udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes(4), b"\xff" * 4)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return b"\xff" * 6 + GUEST_MAC + b"\x08\x00" + ip + udp


def dhcp_options(frame: bytes) -> dict[int, bytes]:
    options, at = {}, 14 + 20 + 8 + 240
    while at < len(frame) and frame[at] != 255:
        if frame[at] == 0:
            at += 1
            continue
        options[frame[at]] = frame[at + 2 : at + 2 + frame[at + 1]]
        at += 2 + frame[at + 1]
    return options


@pytest.mark.anyio
async def test_passt_binds_the_forwards_and_offers_the_guest_the_host_address(netns: str) -> None:
    backend = in_netns(netns, lambda: PasstBackend((PortForward(0, 80), PortForward(0, 5353, "udp"))))
    try:
        tcp, udp = backend.forwards
        assert tcp.host and udp.host and (tcp.guest, tcp.protocol, udp.protocol) == (80, "tcp", "udp")
        await backend.wait_started()
        assert len(passt_children()) == 1
        with pytest.raises(ConfigError, match=f"host port {tcp.host}/tcp is in use"):
            in_netns(netns, lambda: PasstBackend((PortForward(tcp.host, 80),)))  # passt holds it
        frame = dhcp_discover()
        backend.write_from([memoryview(bytes(12) + frame)])
        reply = bytearray(2048)
        with anyio.fail_after(10):
            while True:
                await backend.wait_readable()
                length = backend.read_into([memoryview(reply)])
                if length and reply[12 + 23] == 17 and reply[12 + 36 : 12 + 38] == b"\x00\x44":
                    break
        offer = bytes(reply[12:length])
        assert offer[:6] in (GUEST_MAC, b"\xff" * 6)
        assert socket.inet_ntoa(offer[14 + 20 + 8 + 16 : 14 + 20 + 8 + 20]) == HOST_ADDRESS  # yiaddr
        options = dhcp_options(offer)
        assert options[53] == b"\x02"  # DHCPOFFER
        assert socket.inet_ntoa(options[3][:4]) == GATEWAY  # the router: the host's gateway
    finally:
        backend.close()
    assert passt_children() == []  # closed with its backend, and reaped


def test_a_port_in_use_is_one_error_and_leaves_nothing_running(netns: str) -> None:
    def busy_port() -> socket.socket:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        return listener

    listener = in_netns(netns, busy_port)
    port = listener.getsockname()[1]
    with pytest.raises(ConfigError, match=rf"^host port {port}/tcp is in use: .*forward=0:80 picks a free one"):
        in_netns(netns, lambda: PasstBackend((PortForward(8080, 81), PortForward(port, 80))))
    listener.close()
    assert passt_children() == []


def test_passt_missing_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="apt-get install passt"):
        PasstBackend(())


def test_no_passt_outlives_a_killed_monitor(netns: str) -> None:
    monitor = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            netns,
            sys.executable,
            "-c",
            "import sys, time; from smolvmm.monitor.usernet import PasstBackend, open_vhost; b = PasstBackend(()); "
            "print(b._process.pid, flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
    )
    assert monitor.stdout is not None
    passt = int(monitor.stdout.readline())
    assert os.path.exists(f"/proc/{passt}")
    monitor.send_signal(signal.SIGKILL)  # no close(), no finally: only the kernel cleans up
    monitor.wait()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{passt}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{passt}")


def test_user_networking_is_available_where_an_interface_has_a_default_route(netns: str) -> None:
    """And so an image's machine gets it by default there; elsewhere none, with a note."""
    notes: list[str] = []
    assert in_netns(netns, user_networking_unavailable) is None
    assert in_netns(netns, lambda: recipe_networks(ImageRecipe("oci:x"), notes)) == (NetConfig(),)
    with named_netns(f"smolvmm-bare-{os.getpid()}", ("link set lo up",)) as bare:
        assert in_netns(bare, user_networking_unavailable) == "this host has no default route, which passt needs"
        assert in_netns(bare, lambda: recipe_networks(ImageRecipe("oci:x"), notes)) == ()
        asked = (NetConfig(forwards=(PortForward(8080, 80),)),)
        assert in_netns(bare, lambda: recipe_networks(ImageRecipe("oci:x", networks=asked), notes)) == asked
    assert notes == [
        "built without a network card: this host has no default route, which passt needs"
        " (--net none says so; --net user requires one)"
    ]


def test_net_flags_parse_to_user_and_tap_networks() -> None:
    assert NetConfig.parse_flags([]) == NetConfig.parse_flags(["none"]) == ()
    assert NetConfig.parse_flags(["user", "user,forward=8080:80"]) == (
        NetConfig(),
        NetConfig.parse("user,forward=8080:80"),
    )
    user = NetConfig.parse("user,forward=18080:80,forward=0:53/udp,mac=52:54:00:12:34:56")
    assert user.mode == "user" and user.mac == bytes.fromhex("525400123456")
    assert user.forwards == (PortForward(18080, 80), PortForward(0, 53, "udp"))
    assert [str(f) for f in user.forwards] == ["18080:80/tcp", "0:53/udp"]
    assert NetConfig.parse("tap=tap0").mode == "tap"
    assert [NetConfig.parse(f"tap=tap0{v}").vhost for v in ("", ",vhost=on", ",vhost=off")] == [None, True, False]
    for bad, message in (
        ("user,forward=80", "invalid port forward '80'"),
        ("user,forward=70000:80", "PortForward.host must be a port from 0"),
        ("user,forward=80:0", "PortForward.guest must be a port from 1"),
        ("user,forward=8080:80/sctp", "invalid port forward"),
        ("user,forward=8080:80,forward=8080:81", "host port 8080/tcp twice"),
        ("user,speed=10", "invalid network"),
        ("bridge", "invalid network"),
        ("tap=tap0,vhost=yes", r"tap=NAME\[,mac=MAC\]\[,vhost=on\|off\]"),
        ("user,vhost=on", "invalid network"),
    ):
        with pytest.raises(ConfigError, match=message):
            NetConfig.parse(bad)
    with pytest.raises(ConfigError, match="cannot be combined"):
        NetConfig.parse_flags(["none", "user"])
    with pytest.raises(ConfigError, match="need user networking"):
        NetConfig("tap0", forwards=(PortForward(1, 2),))
    with pytest.raises(ConfigError, match="NetConfig.vhost needs a TAP device"):
        NetConfig(vhost=True)


@pytest.mark.skipif(os.path.exists("/dev/vhost-net"), reason="this host has vhost-net (the guest tests use it)")
def test_without_vhost_net_a_tap_card_goes_through_the_monitor_unless_vhost_is_required() -> None:
    assert open_vhost(NetConfig("tap0")) is None
    assert open_vhost(NetConfig("tap0", vhost=False)) is None
    assert open_vhost(NetConfig()) is None
    with pytest.raises(ConfigError, match="^vhost-net is unavailable: /dev/vhost-net: No such file or directory$"):
        open_vhost(NetConfig("tap0", vhost=True))


async def segments_from(backend: PasstBackend, port: int) -> AsyncIterator[tuple[Segment, bytes]]:
    """The TCP segments passt sends the guest from ``port`` on the gateway, with their data, as
    they come (10 s at most each)."""
    frame = bytearray(70000)
    while True:
        with anyio.fail_after(10):
            await backend.wait_readable()
            length = backend.read_into([memoryview(frame)])
        segment = tcp_segment(bytes(frame[12:length])) if length else None
        if segment is not None and segment.source_port == port:
            ip = 12 + 14
            tcp = ip + (frame[ip] & 0x0F) * 4
            yield segment, bytes(frame[tcp + (frame[tcp + 12] >> 4) * 4 : ip + int.from_bytes(frame[ip + 2 : ip + 4])])


@pytest.mark.anyio
async def test_a_retransmitted_syn_reaches_the_host_as_one_connection_without_a_reset(netns: str) -> None:
    """A guest that sends its SYN again before it has seen passt's SYN-ACK (a busy host) gets its
    connection: passt itself would reset it (Debian 12's passt; see smolvmm.monitor.handshakes)."""
    listener = in_netns(netns, lambda: socket.create_server(("127.0.0.1", 0)))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    backend = in_netns(netns, lambda: PasstBackend(()))
    try:
        await backend.wait_started()
        ports, isn = (40000, port), 1000
        syn = tcp_frame(GUEST_MAC, HOST_ADDRESS, GATEWAY, ports, isn, 0, SYN)
        backend.write_from([memoryview(bytes(12) + syn)])
        answers = segments_from(backend, port)
        syn_ack, _ = await anext(answers)
        assert (syn_ack.flags & (SYN | ACK), syn_ack.ack) == (SYN | ACK, isn + 1)
        backend.write_from([memoryview(bytes(12) + syn)])  # again: the guest had not seen the SYN-ACK yet
        for flags, data in ((ACK, b""), (ACK | 0x08, b"hello")):  # the handshake's ACK, then data, as Linux sends them
            segment = tcp_frame(GUEST_MAC, HOST_ADDRESS, GATEWAY, ports, isn + 1, syn_ack.seq + 1, flags, data)
            backend.write_from([memoryview(bytes(12) + segment)])
        server, _ = listener.accept()
        with server:
            server.settimeout(10)
            assert server.recv(16) == b"hello"
            server.sendall(b"world")
            async for segment, data in answers:
                assert not segment.flags & RST, "passt reset the connection"
                if data:
                    assert (segment.seq, segment.ack, data) == (syn_ack.seq + 1, isn + 6, b"world")
                    break
        await answers.aclose()
    finally:
        backend.close()
        listener.close()


@pytest.mark.kvm(linux_guest=False)
def test_a_bundles_user_network_stays_unplugged_where_the_host_has_none(netns: str, tmp_path: Path) -> None:
    """Restored without --net on a host that cannot give user networking, the card is there
    without a wire (as a container runs on a host without a network); asked for, it is an error."""
    bundle = tmp_path / "net.smolmachine"

    async def save() -> None:
        async with Machine.boot(MachineConfig(vcpus=1, memory=128 << 20, networks=(NetConfig(),))) as machine:
            await machine.snapshot(bundle)
            await machine.stop()

    async def restore(networks: tuple[NetConfig, ...]) -> dict[str, int | str]:
        async with Machine.restore(bundle, networks=networks) as machine:
            assert machine.forwards == () and passt_children() == []
            await machine.stop()
        return machine.timings.notes

    install_kick_handler()  # here, on the main thread: the machines start on others
    in_netns(netns, lambda: anyio.run(save))
    with named_netns(f"smolvmm-offline-{os.getpid()}", ("link set lo up",)) as offline:
        notes = in_netns(offline, lambda: anyio.run(restore, ()))
        assert notes["unplugged"] == "the network cards have no wire: this host has no default route, which passt needs"
        with pytest.raises(ConfigError, match="^passt failed: "):
            in_netns(offline, lambda: anyio.run(restore, (NetConfig(),)))
    assert passt_children() == []


@pytest.mark.anyio
async def test_a_host_without_a_default_route_is_one_error_in_passts_words() -> None:
    with named_netns(f"smolvmm-noroute-{os.getpid()}", ()) as name:
        backend = in_netns(name, lambda: PasstBackend(()))
        with pytest.raises(ConfigError, match=r"^passt failed: .*needs a host interface with a default route"):
            await backend.wait_started()
        backend.close()
    assert passt_children() == []
