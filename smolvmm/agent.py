"""The host side of the guest agent (smolvmm/images/agent.c), over its own virtio console.

On every resume the monitor sends the agent the host's wall-clock time and 32 bytes of fresh
entropy; the agent sets the guest clock and reseeds the guest kernel's CRNG, so clones of one
bundle never share random numbers and their clocks read the host's time.
"""

from __future__ import annotations

import os
import time

import anyio

AGENT_LABEL = "smolvmm.agent"
SYNC_TIMEOUT = 10.0


class AgentPort:
    """A ConsolePort whose guest side is the agent: one request line out, one answer line back."""

    def __init__(self) -> None:
        self._outgoing, self._pending = anyio.create_memory_object_stream[bytes](4)
        self._answers, self._answer_reader = anyio.create_memory_object_stream[str](4)
        self._received = bytearray()
        self.answered = False  # the guest runs the agent: it has confirmed a sync

    async def receive(self, max_bytes: int = 65536) -> bytes:
        try:
            return await self._pending.receive()
        except anyio.EndOfStream:
            raise
        except anyio.ClosedResourceError:
            raise anyio.EndOfStream from None

    async def send(self, data: bytes) -> None:
        self._received += data
        while b"\n" in self._received:
            line, _, rest = self._received.partition(b"\n")
            self._received = bytearray(rest)
            try:
                self._answers.send_nowait(line.decode(errors="replace").strip())
            except anyio.WouldBlock:
                pass  # nobody is waiting for this many answers: drop the extra

    async def sync(self, macs: dict[str, bytes] | None = None, timeout: float = SYNC_TIMEOUT) -> bool:
        """Send the clock, fresh entropy and new MACs (interface name -> address); True once the
        agent confirms, False on timeout or if it reports a failure."""
        while True:  # drop stale answers
            try:
                self._answer_reader.receive_nowait()
            except anyio.WouldBlock:
                break
        now = time.time_ns()
        changes = "".join(f" {name}={mac.hex()}" for name, mac in (macs or {}).items())
        line = f"sync {now // 1_000_000_000} {now % 1_000_000_000} {os.urandom(32).hex()}{changes}\n"
        with anyio.move_on_after(timeout):
            await self._outgoing.send(line.encode())
            if await self._answer_reader.receive() == "ok":
                self.answered = True
                return True
        return False

    def close(self) -> None:
        for stream in (self._outgoing, self._pending, self._answers, self._answer_reader):
            stream.close()
