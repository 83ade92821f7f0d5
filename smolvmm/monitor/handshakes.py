"""The TCP handshakes passt has answered, so that a guest's retransmitted SYN never reaches it.

passt (Debian 12's, 2023-03) resets a connection the guest opened when a segment without ACK
arrives after its SYN-ACK (``tcp_tap_handler``: TAP_SYN_RCVD, ``!th->ack``): a retransmitted SYN.
A guest retransmits its SYN when it has not yet processed the SYN-ACK after its initial 1 s RTO,
as happens on a busy host (one connection in a hundred with eight clones in the nested machine:
BENCHMARKS.md, "Soak"). The SYN-ACK has then already been handed to the guest (the device delivers
every frame it takes from passt), so the duplicate is dropped here; the guest answers that SYN-ACK.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

ETH_HEADER = 14
IPV4, IPV6 = b"\x08\x00", b"\x86\xdd"
TCP = 6
SYN, RST, ACK = 0x02, 0x04, 0x10
HEAD_BYTES = ETH_HEADER + 60 + 20  # an IPv4 header with options, or IPv6's, and a TCP header
REMEMBERED = 256


class Segment(NamedTuple):
    """A TCP segment's addresses, ports, sequence and acknowledgement numbers and flags."""

    source: bytes
    source_port: int
    destination: bytes
    destination_port: int
    seq: int
    ack: int
    flags: int


def tcp_segment(frame: bytes) -> Segment | None:
    """The TCP header of an Ethernet frame (its first HEAD_BYTES suffice), or None if it carries
    no unfragmented TCP over IPv4 or IPv6 (extension headers are not followed)."""
    kind = frame[12:14]
    if kind == IPV4 and len(frame) >= ETH_HEADER + 20:
        ip = frame[ETH_HEADER:]
        fragmented = int.from_bytes(ip[6:8], "big") & 0x3FFF
        if ip[9] != TCP or fragmented:
            return None
        source, destination, tcp = ip[12:16], ip[16:20], ip[(ip[0] & 0x0F) * 4 :]
    elif kind == IPV6 and len(frame) >= ETH_HEADER + 40:
        ip = frame[ETH_HEADER:]
        if ip[6] != TCP:
            return None
        source, destination, tcp = ip[8:24], ip[24:40], ip[40:]
    else:
        return None
    if len(tcp) < 20:
        return None
    return Segment(
        source,
        int.from_bytes(tcp[0:2], "big"),
        destination,
        int.from_bytes(tcp[2:4], "big"),
        int.from_bytes(tcp[4:8], "big"),
        int.from_bytes(tcp[8:12], "big"),
        tcp[13],
    )


class Handshakes:
    """SYN-ACKs handed to the guest whose handshake the guest has not yet gone past (at most
    REMEMBERED, the oldest forgotten first)."""

    def __init__(self) -> None:
        # (guest address, guest port, peer address, peer port) -> the guest's initial sequence number
        self._answered: OrderedDict[tuple[bytes, int, bytes, int], int] = OrderedDict()

    def to_guest(self, frame: bytes) -> None:
        """A frame was handed to the guest: remember it if it is a SYN-ACK."""
        segment = tcp_segment(frame)
        if segment is None or segment.flags & (SYN | ACK | RST) != SYN | ACK:
            return
        flow = (segment.destination, segment.destination_port, segment.source, segment.source_port)
        self._answered[flow] = (segment.ack - 1) & 0xFFFFFFFF
        self._answered.move_to_end(flow)
        if len(self._answered) > REMEMBERED:
            self._answered.popitem(last=False)

    def duplicate_syn(self, frame: bytes) -> bool:
        """Whether ``frame``, from the guest, is a SYN whose SYN-ACK the guest already has (drop
        it); any other segment of that connection ends the handshake."""
        segment = tcp_segment(frame)
        if segment is None:
            return False
        flow = (segment.source, segment.source_port, segment.destination, segment.destination_port)
        if flow not in self._answered:
            return False
        if segment.flags & (SYN | ACK) == SYN and segment.seq == self._answered[flow]:
            return True
        del self._answered[flow]
        return False
