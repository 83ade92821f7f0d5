"""Helpers for tests that use network namespaces: run code inside one, what passt needs in one,
and the packets the tests build by hand."""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
HOST_ADDRESS, GATEWAY = "10.0.2.15", "10.0.2.2"
WIRE = (
    "link set lo up",
    "tuntap add dev wire0 mode tap",
    f"addr add {HOST_ADDRESS}/24 dev wire0",
    "link set wire0 up",
    f"route add default via {GATEWAY} dev wire0 onlink",
)
"""``ip`` commands that give a network namespace what passt needs: an address and a default route
(through a TAP device nobody reads: nothing leaves the machine)."""


@contextmanager
def named_netns(name: str, commands: Sequence[str] = WIRE) -> Iterator[str]:
    """A network namespace ``ip netns`` knows as ``name``, given ``commands`` (``ip`` arguments;
    by default what passt needs), deleted when the block ends."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for command in commands:
            subprocess.run(["ip", "-n", name, *command.split()], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def private_network() -> None:
    """Move this process (and the children it starts) into a new network namespace with ``WIRE``."""
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
        raise SystemExit(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")
    for command in WIRE:
        subprocess.run(["ip", *command.split()], check=True)


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that joined network namespace ``name``; fds it opens stay there."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/run/netns/{name}") as ns:
            if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                errors.append(OSError(ctypes.get_errno(), "setns"))
                return
        try:
            result.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo(type_: int, ident: int, payload: bytes) -> bytes:
    body = struct.pack("!BBHHH", type_, 0, 0, ident, 1) + payload
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def tcp_frame(
    mac: bytes, source: str, destination: str, ports: tuple[int, int], seq: int, ack: int, flags: int, data: bytes = b""
) -> bytes:
    """An Ethernet frame (to the broadcast address, from ``mac``) with one IPv4 TCP segment, checksums right."""
    src, dst = socket.inet_aton(source), socket.inet_aton(destination)
    tcp = struct.pack("!HHIIBBHHH", *ports, seq, ack, 5 << 4, flags, 65535, 0, 0) + data
    tcp = tcp[:16] + struct.pack("!H", checksum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return b"\xff" * 6 + mac + b"\x08\x00" + ip + tcp
