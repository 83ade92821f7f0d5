"""Guest agent protocol 2: frames and payloads, pure and synchronous (the agent is smolvmm/images/agent.c).

A frame is a 12-byte little-endian header (u16 magic ``MAGIC``, u16 type, u32 request id,
u32 payload length at most ``MAX_PAYLOAD``) followed by the payload. Every byte from the guest
is untrusted: ``FrameParser`` holds at most one frame's worth of input, refuses a bad magic or
an oversized length once the first frame has arrived, and payload decoders check lengths
before they unpack.

Payloads (strings are NUL-terminated, numbers little-endian):

* HELLO (host): empty; READY (guest, also sent unasked with id 0 when the agent starts): u32 version.
* SYNC: i64 seconds, u32 nanoseconds, 32 bytes entropy, ``ifname=mac-hex`` strings. Answer OK/ERROR.
* SETUP: u32 env bytes, u32 secret bytes, hostname, machine id, ``K=V`` env strings, ``K=V`` secret
  strings. SCRUB: empty; the agent overwrites the secrets and its buffers. Both answer OK/ERROR.
* EXEC: u32 argc, u32 env bytes, cwd, argv strings, ``K=V`` strings. Answer STARTED (u32 pid)
  or ERROR; then STDOUT/STDERR data, STDIN_ACK (u32 bytes taken), and EXIT (u32 exit code,
  u32 signal or 0). STDIN: data, empty for end of input. SIGNAL: u32 signal number, to the
  process group. OUTPUT_ACK: u32 stream (0 stdout, 1 stderr), u32 bytes the host has consumed.
* WRITE_OPEN: u32 mode, path; then WRITE_DATA chunks, an empty one ends. Answer OK or ERROR
  (at any point). READ_OPEN: path; answers READ_DATA chunks then OK, or ERROR. READ_ACK: u32 bytes.

The agent sends output and file data only while at most ``WINDOW`` bytes of it are
unacknowledged, per stream; more is a protocol violation.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

VERSION = 2
MAGIC = 0x5356
HEADER = struct.Struct("<HHII")
MAX_PAYLOAD = 65536
WINDOW = 256 * 1024
ENTROPY_BYTES = 32
MAX_SKIPPED = 65536


class Type(enum.IntEnum):
    """Frame types: below 64 from the host, from 64 up from the guest."""

    PAD = 0  # ignored by the agent: overwrites the guest's receive buffers after a scrub
    HELLO = 1
    SYNC = 2
    SETUP = 3
    SCRUB = 4
    EXEC = 5
    STDIN = 6
    SIGNAL = 7
    OUTPUT_ACK = 8
    WRITE_OPEN = 9
    WRITE_DATA = 10
    READ_OPEN = 11
    READ_ACK = 12
    READY = 64
    OK = 65
    ERROR = 66
    STARTED = 67
    STDOUT = 68
    STDERR = 69
    EXIT = 70
    STDIN_ACK = 71
    READ_DATA = 72


class ProtocolError(Exception):
    """The guest sent something that is not protocol 2: the channel cannot be trusted further."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its type (an int, unknown types included), request id and payload."""

    type: int
    id: int
    payload: bytes


def encode(type: Type, id: int, payload: bytes = b"") -> bytes:
    """One frame; the payload must fit ``MAX_PAYLOAD``."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a frame holds at most {MAX_PAYLOAD} bytes, not {len(payload)}")
    return HEADER.pack(MAGIC, type, id, len(payload)) + payload


class FrameParser:
    """Splits guest bytes into frames, holding at most one frame (header + ``MAX_PAYLOAD``).

    Bytes before the first frame with a good header are skipped, up to ``MAX_SKIPPED`` of them:
    a restored machine's channel can begin with the tail of a frame the guest sent before the
    snapshot. From the first frame on, ``feed`` returns the frames completed so far, and after
    a ``ProtocolError`` it refuses all further input (a stream that lost its framing cannot be
    resynchronised safely).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._broken: str | None = None
        self._synced = False
        self.skipped = 0

    def feed(self, data: bytes) -> list[Frame]:
        if self._broken is not None:
            raise ProtocolError(self._broken)
        if not self._synced:
            data = self._sync(data)
        frames: list[Frame] = []
        view = memoryview(data)
        while view:
            if len(self._buffer) < HEADER.size:
                take = HEADER.size - len(self._buffer)
                self._buffer += view[:take]
                view = view[take:]
                if len(self._buffer) < HEADER.size:
                    break
                magic, _, _, length = HEADER.unpack(self._buffer)
                if magic != MAGIC:
                    self._broken = f"bad frame magic {magic:#06x}"
                elif length > MAX_PAYLOAD:
                    self._broken = f"frame of {length} bytes (the limit is {MAX_PAYLOAD})"
                if self._broken is not None:
                    self._buffer = bytearray()
                    raise ProtocolError(self._broken)
            _, type, id, length = HEADER.unpack_from(self._buffer)
            take = HEADER.size + length - len(self._buffer)
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) == HEADER.size + length:
                frames.append(Frame(type, id, bytes(self._buffer[HEADER.size :])))
                self._buffer = bytearray()
        return frames

    def _sync(self, data: bytes) -> bytes:
        """Before the first good header: drop what precedes one; returns the bytes to parse."""
        pending = self._buffer + data
        self._buffer = bytearray()
        magic = HEADER.pack(MAGIC, 0, 0, 0)[:2]
        start = 0
        while True:
            start = pending.find(magic, start)
            if start < 0:
                start = max(len(pending) - 1, 0)  # the last byte may begin a magic
                break
            if len(pending) - start < HEADER.size or HEADER.unpack_from(pending, start)[3] <= MAX_PAYLOAD:
                self._synced = len(pending) - start >= HEADER.size
                break
            start += 1
        self.skipped += start
        if self.skipped > MAX_SKIPPED:
            self._broken = f"no frame in the first {MAX_SKIPPED} bytes"
            raise ProtocolError(self._broken)
        if self._synced:
            return bytes(pending[start:])
        self._buffer = bytearray(pending[start:])
        return b""


def _strings(items: list[str] | tuple[str, ...]) -> bytes:
    out = bytearray()
    for item in items:
        data = item.encode()
        if b"\0" in data:
            raise ValueError(f"{item!r} holds a NUL byte")
        out += data + b"\0"
    return bytes(out)


def _assignments(values: dict[str, str]) -> bytes:
    for key in values:
        if not key or "=" in key:
            raise ValueError(f"environment variable name {key!r} is empty or holds '='")
    return _strings([f"{key}={value}" for key, value in values.items()])


def exec_payload(argv: list[str], env: dict[str, str], cwd: str) -> bytes:
    """EXEC's payload; raises ValueError if it does not fit one frame or holds a NUL."""
    if not argv:
        raise ValueError("the command is empty")
    environment = _assignments(env)
    payload = struct.pack("<II", len(argv), len(environment)) + _strings([cwd, *argv]) + environment
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"the command and its environment take {len(payload)} bytes (the limit is {MAX_PAYLOAD})")
    return payload


def setup_payload(hostname: str, machine_id: str, env: dict[str, str], secrets: dict[str, str]) -> bytes:
    """SETUP's payload; raises ValueError if it does not fit one frame or holds a NUL."""
    environment, hidden = _assignments(env), _assignments(secrets)
    names = _strings([hostname, machine_id])
    payload = struct.pack("<II", len(environment), len(hidden)) + names + environment + hidden
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"env and secrets take {len(payload)} bytes (the limit is {MAX_PAYLOAD})")
    return payload


def sync_payload(seconds: int, nanoseconds: int, entropy: bytes, macs: dict[str, bytes]) -> bytes:
    """SYNC's payload: the host's time, fresh entropy, and a new MAC per named interface."""
    assert len(entropy) == ENTROPY_BYTES
    return struct.pack("<qI", seconds, nanoseconds) + entropy + _strings([f"{n}={m.hex()}" for n, m in macs.items()])


def write_open_payload(path: str, mode: int) -> bytes:
    return struct.pack("<I", mode & 0o7777) + _strings([path])


def read_open_payload(path: str) -> bytes:
    return _strings([path])


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def decode_u32(payload: bytes) -> int:
    """A payload that must be exactly one u32."""
    if len(payload) != 4:
        raise ProtocolError(f"expected 4 bytes, got {len(payload)}")
    value: int = struct.unpack("<I", payload)[0]
    return value


def decode_exit(payload: bytes) -> tuple[int, int | None]:
    """EXIT's (exit code, signal or None)."""
    if len(payload) != 8:
        raise ProtocolError(f"an exit report is 8 bytes, got {len(payload)}")
    code, signal = struct.unpack("<II", payload)
    if code > 255 + 128 or signal > 128:
        raise ProtocolError(f"exit code {code} / signal {signal} out of range")
    return code, signal or None


def decode_message(payload: bytes) -> str:
    """ERROR's text, made printable and one line."""
    text = payload[:512].decode(errors="replace")
    return "".join(c if c.isprintable() else "?" for c in text)
