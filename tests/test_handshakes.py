"""Which guest SYNs the user-networking path drops: only one retransmitted after its SYN-ACK went to the guest."""

from __future__ import annotations

import socket
import struct

from network import tcp_frame

from smolvmm.monitor.handshakes import ACK, REMEMBERED, RST, SYN, Handshakes, tcp_segment

MAC = bytes.fromhex("020000c0ffee")
GUEST, PEER = "10.0.2.15", "10.0.2.2"


def from_guest(port: int, seq: int, flags: int, ack: int = 0) -> bytes:
    return tcp_frame(MAC, GUEST, PEER, (port, 80), seq, ack, flags)


def to_guest(port: int, seq: int, ack: int, flags: int = SYN | ACK) -> bytes:
    return tcp_frame(MAC, PEER, GUEST, (80, port), seq, ack, flags)


def test_a_syn_sent_again_after_its_syn_ack_is_dropped_until_the_guest_acknowledges() -> None:
    handshakes = Handshakes()
    assert not handshakes.duplicate_syn(from_guest(40000, 1000, SYN))  # the first SYN goes out
    handshakes.to_guest(to_guest(40000, 5000, 1001))
    assert handshakes.duplicate_syn(from_guest(40000, 1000, SYN))
    assert handshakes.duplicate_syn(from_guest(40000, 1000, SYN))  # however often
    assert not handshakes.duplicate_syn(from_guest(40000, 1001, ACK, 5001))  # the handshake's ACK
    assert not handshakes.duplicate_syn(from_guest(40000, 1000, SYN))  # forgotten after it


def test_other_connections_and_a_new_syn_on_the_same_ports_go_through() -> None:
    handshakes = Handshakes()
    handshakes.to_guest(to_guest(40000, 5000, 1001))
    assert not handshakes.duplicate_syn(from_guest(40001, 1000, SYN))  # another port
    assert not handshakes.duplicate_syn(tcp_frame(MAC, GUEST, "10.0.2.3", (40000, 80), 1000, 0, SYN))
    assert not handshakes.duplicate_syn(from_guest(40000, 7000, SYN))  # a new connection: another ISN
    assert not handshakes.duplicate_syn(from_guest(40000, 1000, SYN))  # which ended the old handshake


def test_only_a_syn_ack_counts_as_an_answer() -> None:
    handshakes = Handshakes()
    for flags in (ACK, SYN, SYN | ACK | RST, RST | ACK):
        handshakes.to_guest(to_guest(40000, 5000, 1001, flags))
    assert not handshakes.duplicate_syn(from_guest(40000, 1000, SYN))


def test_at_most_remembered_handshakes_are_kept_the_oldest_forgotten_first() -> None:
    handshakes = Handshakes()
    for port in range(10000, 10000 + REMEMBERED + 1):
        handshakes.to_guest(to_guest(port, 5000, 1001))
    assert not handshakes.duplicate_syn(from_guest(10000, 1000, SYN))
    assert handshakes.duplicate_syn(from_guest(10001, 1000, SYN))
    assert handshakes.duplicate_syn(from_guest(10000 + REMEMBERED, 1000, SYN))


def test_ipv6_segments_are_read_and_anything_else_is_left_alone() -> None:
    guest, peer = socket.inet_pton(socket.AF_INET6, "fd00::15"), socket.inet_pton(socket.AF_INET6, "fd00::2")

    def ipv6(source: bytes, destination: bytes, ports: tuple[int, int], seq: int, ack: int, flags: int) -> bytes:
        tcp = struct.pack("!HHIIBBHHH", *ports, seq, ack, 5 << 4, flags, 65535, 0, 0)
        header = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, source, destination)
        return b"\xff" * 6 + MAC + b"\x86\xdd" + header + tcp

    handshakes = Handshakes()
    handshakes.to_guest(ipv6(peer, guest, (80, 40000), 5000, 1001, SYN | ACK))
    assert handshakes.duplicate_syn(ipv6(guest, peer, (40000, 80), 1000, 0, SYN))
    ipv4 = from_guest(40000, 1000, SYN)
    udp = ipv4[:23] + b"\x11" + ipv4[24:]
    fragment = ipv4[:20] + b"\x20\x00" + ipv4[22:]  # more fragments follow
    for frame in (udp, fragment, ipv4[:40], ipv4[:12] + b"\x08\x06" + ipv4[14:], b""):
        assert tcp_segment(frame) is None
