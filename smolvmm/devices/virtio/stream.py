"""A network backend over a stream socket speaking QEMU's ``-netdev stream`` framing (passt's):
every Ethernet frame is preceded by its length as 4 bytes, big endian; no virtio-net header.

Both directions are bounded and never block: received bytes collect in a fixed buffer that
holds at least one largest frame, and frames the full socket did not take wait, whole and up to
a bound, for ``serve`` to send when the socket is writable; beyond that bound frames are dropped.
Each frame goes out in a send call of its own: on a Unix socket a frame below half the send
buffer is then taken whole or not at all, so the peer never sees half a frame (passt before
2024 lost its place in the stream on one). A length above the largest frame is the peer's fault: that frame is
skipped without being buffered, and the stream stays in step.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections import deque
from collections.abc import Sequence

import anyio

from smolvmm.devices.virtio.backend import VNET_HDR_SIZE, NetBackend
from smolvmm.devices.virtio.buffers import scatter, slice_views, total_length

LENGTH = struct.Struct(">I")
RECEIVE_BUFFER = 256 * 1024
SEND_BACKLOG = 1 << 20  # bytes of frames held while the socket is full, beyond which frames drop
_HEADER = bytes(VNET_HDR_SIZE)
_log = logging.getLogger(__name__)


class StreamBackend(NetBackend):
    """Frames over connected stream socket ``sock`` (owned from here on), each at most ``max_frame``
    bytes of Ethernet frame."""

    mode = "stream"

    def __init__(self, sock: socket.socket, max_frame: int) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.max_frame = max_frame
        self._in = bytearray(max(RECEIVE_BUFFER, LENGTH.size + max_frame))
        self._start = self._end = 0  # unparsed received bytes are _in[_start:_end]
        self._skip = 0  # bytes of a refused frame still to throw away
        self._out: deque[memoryview] = deque()  # framed frames the socket has not taken yet
        self._out_bytes = 0
        self._out_waiting = anyio.Event()
        self._closed_by_peer = False
        self.dropped = 0  # frames to the peer dropped because the backlog was full

    async def wait_readable(self) -> None:
        if self._frame_length() is not None:
            return
        if self._closed_by_peer:
            await anyio.sleep_forever()  # the wire is gone: the link stays silent
        await anyio.wait_readable(self._sock)

    def _frame_length(self) -> int | None:
        """The length of the complete frame at ``_start``, if one is buffered."""
        if self._end - self._start < LENGTH.size:
            return None
        length: int = LENGTH.unpack_from(self._in, self._start)[0]
        if length > self.max_frame or self._end - self._start - LENGTH.size < length:
            return None
        return length

    def read_into(self, views: Sequence[memoryview]) -> int | None:
        while True:
            length = self._frame_length()
            if length is not None:
                start = self._start + LENGTH.size
                self._start = start + length
                done = scatter(views, 0, _HEADER)
                return done + scatter(views, VNET_HDR_SIZE, memoryview(self._in)[start : start + length])
            if not self._receive():
                return None

    def _receive(self) -> bool:
        """Take what the socket holds (after dropping a refused frame's bytes); False if nothing came."""
        if self._skip:
            self._discard()
            if self._skip:
                return False
        if self._end - self._start >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self._in, self._start)
            if length > self.max_frame:
                _log.warning("stream peer sent a %d-byte frame (at most %d): skipped", length, self.max_frame)
                self._skip = length
                self._start += LENGTH.size
                self._discard()
                return True
        if self._start:  # keep the partial frame at the front, so a whole frame always fits
            tail = self._end - self._start
            self._in[:tail] = self._in[self._start : self._end]
            self._start, self._end = 0, tail
        try:
            count = self._sock.recv_into(memoryview(self._in)[self._end :])
        except BlockingIOError:
            return False
        if not count:
            self._closed_by_peer = True
            raise ConnectionResetError("the network stream's peer closed it")
        self._end += count
        return True

    def _discard(self) -> None:
        """Throw away up to ``_skip`` bytes of a refused frame: buffered ones, then from the socket."""
        buffered = min(self._skip, self._end - self._start)
        self._start += buffered
        self._skip -= buffered
        if self._start == self._end:
            self._start = self._end = 0
        while self._skip:
            try:
                count = self._sock.recv_into(self._in, min(self._skip, len(self._in)))
            except BlockingIOError:
                return
            if not count:
                self._closed_by_peer = True
                return
            self._skip -= count

    def write_from(self, views: Sequence[memoryview]) -> None:
        length = total_length(views) - VNET_HDR_SIZE
        if length <= 0:
            return
        frame = slice_views(views, VNET_HDR_SIZE, length)
        prefix = LENGTH.pack(length)
        sent = 0
        if not self._out:
            try:
                sent = self._sock.sendmsg([prefix, *frame])
            except BlockingIOError:
                pass
            if sent == LENGTH.size + length:
                return
        elif self._out_bytes + LENGTH.size + length > SEND_BACKLOG:
            self.dropped += 1
            return
        # Keep the rest, in order: what is started is finished, so the peer sees whole frames.
        rest = memoryview(b"".join([prefix, *frame]))[sent:]
        self._out.append(rest)
        self._out_bytes += len(rest)
        self._out_waiting.set()

    def _flush(self) -> None:
        """Send waiting frames, one per call, until the socket is full."""
        while self._out:
            try:
                sent = self._sock.send(self._out[0])
            except BlockingIOError:
                return
            self._out_bytes -= sent
            if sent < len(self._out[0]):
                self._out[0] = self._out[0][sent:]
                return
            self._out.popleft()

    async def serve(self) -> None:
        while True:
            await self._out_waiting.wait()
            try:
                while self._out:
                    await anyio.wait_writable(self._sock)
                    self._flush()
            except OSError as exc:  # the peer went away: the link goes silent, the machine runs on
                _log.warning("network stream closed: %s", exc)
                self._out.clear()
                self._out_bytes = 0
                await anyio.sleep_forever()
            self._out_waiting = anyio.Event()

    def close(self) -> None:
        self._sock.close()
