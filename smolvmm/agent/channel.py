"""The host side of the guest agent (smolvmm/images/agent.c) over its own virtio console port.

Protocol 2 (smolvmm.agent.protocol) carries framed requests, each with its own id, so many
calls run at once: exec, stdin and output streams, file transfers, and the resume duties. On
every resume the monitor sends the host's wall-clock time, 32 bytes of fresh entropy and new
MACs (SYNC), then the clone's environment, secrets, hostname and machine id (SETUP); before a
snapshot of a machine that holds secrets it asks the agent to overwrite them (SCRUB).

Every guest byte is untrusted. Frames are parsed by ``FrameParser`` (at most one frame held);
frames for ids that are not waiting are dropped; a call holds at most ``CALL_BUDGET`` bytes of
frames (the agent may only send ``WINDOW`` unacknowledged bytes per stream) and at most
``MAX_CALLS`` calls run at once, so the monitor's memory for a machine's agent is bounded.
Malformed input or a broken budget fails every call of this machine's agent with
``AgentError``, and nothing else.

A bundle saved with a protocol-1 agent (label ``smolvmm.agent=yes``) still gets its clock and
entropy through the old line protocol (``sync ...`` answered by ``ok``); exec and files on it
raise ``AgentTooOld``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from smolvmm.agent import protocol
from smolvmm.agent.protocol import Frame, ProtocolError, Type
from smolvmm.errors import AgentError, AgentTooOld

AGENT_LABEL = "smolvmm.agent"
LABEL_V2 = "2"  # the label's value for a bundle whose agent speaks protocol 2 (protocol 1 wrote "yes")
SYNC_TIMEOUT = 30.0  # an agent's answer to the monitor's calls at restore and snapshot: an emulated guest under load
# took over 10 s to take its environment (a broken or hostile agent costs this long once, then its machine runs without)
READY_TIMEOUT = 300.0  # a booting guest starts its agent after its drivers load (slow when emulated)
MAX_CALLS = 64
CALL_BUDGET = 2 * protocol.WINDOW + 64 * (protocol.HEADER.size + 64) + protocol.MAX_PAYLOAD
PAD_BYTES = 1280 * 1024  # more than the guest's receive buffers (256 pages of virtio input, the tty's 4 KiB)
# The guest reads the padding before it answers: seconds in an emulated guest under load, where a
# 10 s bound failed snapshots now and then (nested machine, load 7-10).
PAD_TIMEOUT = 60.0
TOO_OLD = (
    "this machine's guest agent predates protocol 2 and cannot exec or move files: "
    "rebuild its bundle with this smolvmm (python -m smolvmm build ...)"
)


@dataclass
class Identity:
    """What SETUP gives a guest: every exec's environment, secrets, hostname and machine id."""

    env: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    hostname: str = ""
    machine_id: str = ""


class Call:
    """The frames the guest sends for one request id, in order, within ``CALL_BUDGET`` bytes."""

    def __init__(self, port: AgentPort, id: int) -> None:
        self.port = port
        self.id = id
        self._frames, self._reader = anyio.create_memory_object_stream[Frame](math.inf)
        self._held = 0
        self._error: str | None = None

    def deliver(self, frame: Frame) -> None:
        """From the port, synchronously: queue ``frame`` or raise ProtocolError past the budget."""
        if self._error is not None:
            return  # the call has given up: dropped, whatever it still holds
        self._held += protocol.HEADER.size + len(frame.payload)
        if self._held > CALL_BUDGET:
            raise ProtocolError(f"request {self.id} was sent more than {CALL_BUDGET} unread bytes")
        self._frames.send_nowait(frame)

    def fail(self, reason: str) -> None:
        self._error = reason
        self._frames.close()

    async def receive(self) -> Frame:
        """The next frame; AgentError once the agent's channel has failed."""
        try:
            frame = await self._reader.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise AgentError(self._error or "the guest agent's channel is closed") from None
        self._held -= protocol.HEADER.size + len(frame.payload)
        return frame

    async def send(self, type: Type, payload: bytes = b"") -> None:
        await self.port.send_frame(type, self.id, payload)

    def close(self) -> None:
        self._frames.close()
        self._reader.close()


class AgentPort:
    """A ConsolePort whose guest side is the agent."""

    def __init__(self) -> None:
        self._outgoing, self._pending = anyio.create_memory_object_stream[bytes](16)
        self.protocol = protocol.VERSION  # 1 for a restored bundle whose agent predates protocol 2
        self.identity = Identity()
        self.answered = False  # the guest runs the agent: it has confirmed a sync
        self.dropped = 0  # frames for no waiting request
        self._parser = protocol.FrameParser()
        self._calls: dict[int, Call] = {}
        self._next_id = 1
        self._slots = anyio.Semaphore(MAX_CALLS)
        self._ready = anyio.Event()
        self._broken: str | None = None
        self._scrub_needed = False
        self._delivered = False  # the agent holds self.identity
        self._delivering = anyio.Lock()
        self._thawed = anyio.Event()  # unset from a scrub until the next sync: secrets stay out
        self._thawed.set()
        # protocol 1: answer lines
        self._line = bytearray()
        self._answers, self._answer_reader = anyio.create_memory_object_stream[str](4)

    # -- the console port side (called by the virtio console device) --

    async def receive(self, max_bytes: int = 65536) -> bytes:
        try:
            return await self._pending.receive()
        except anyio.EndOfStream:
            raise
        except anyio.ClosedResourceError:
            raise anyio.EndOfStream from None

    async def send(self, data: bytes) -> None:
        """Bytes from the guest: dispatched at once, never waiting on a reader."""
        if self.protocol == 1:
            self._receive_lines(data)
            return
        if self._broken is not None:
            return
        try:
            for frame in self._parser.feed(data):
                self._dispatch(frame)
        except ProtocolError as exc:
            self.fail(f"the guest agent broke protocol 2 ({exc}): its calls fail until the machine restarts")

    def _dispatch(self, frame: Frame) -> None:
        if frame.type == Type.READY:
            if protocol.decode_u32(frame.payload) != protocol.VERSION:
                raise ProtocolError(f"the agent speaks protocol {protocol.decode_u32(frame.payload)}")
            self._ready.set()
        call = self._calls.get(frame.id)
        if call is None:
            self.dropped += frame.type != Type.READY  # READY comes unasked when the agent starts
            return
        call.deliver(frame)

    def fail(self, reason: str) -> None:
        """Fail every call, waiting or to come, with AgentError ``reason``."""
        self._broken = reason
        for call in self._calls.values():
            call.fail(reason)
        self._ready.set()  # wakes wait_ready, which then reports the failure

    def close(self) -> None:
        self.fail("the machine has stopped")
        for stream in (self._outgoing, self._pending, self._answers, self._answer_reader):
            stream.close()

    # -- calls --

    async def send_frame(self, type: Type, id: int, payload: bytes = b"") -> None:
        if self._broken is not None:
            raise AgentError(self._broken)
        try:
            await self._outgoing.send(protocol.encode(type, id, payload))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise AgentError(self._broken or "the machine has stopped") from None

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until the agent has said it speaks protocol 2; AgentTooOld / AgentError otherwise."""
        if self.protocol == 1:
            raise AgentTooOld(TOO_OLD)
        if self._broken is not None:
            raise AgentError(self._broken)
        if self._ready.is_set():
            return
        with anyio.move_on_after(timeout):
            async with self._open_call() as call:
                await call.send(Type.HELLO)
                await self._ready.wait()
                if self._broken is not None:
                    raise AgentError(self._broken)
                return
        raise AgentError(f"the guest agent did not answer within {timeout:g} s (does the guest run smolvmm-agent?)")

    @asynccontextmanager
    async def call(self) -> AsyncIterator[Call]:
        """A new request id once the agent is ready and holds the identity, released on exit."""
        await self.wait_ready()
        if not self._delivered:
            await self._thawed.wait()
            async with self._delivering:
                if not self._delivered and not await self._simple(Type.SETUP, self._setup_payload(), SYNC_TIMEOUT):
                    raise AgentError(self._broken or "the guest agent did not take its environment and hostname")
                self._delivered = True
                self._scrub_needed = bool(self.identity.secrets)
        async with self._open_call() as call:
            yield call

    @asynccontextmanager
    async def _open_call(self) -> AsyncIterator[Call]:
        async with self._slots:
            id = self._next_id
            self._next_id = self._next_id % 0xFFFFFFFF + 1
            call = self._calls[id] = Call(self, id)
            if self._broken is not None:
                call.fail(self._broken)
            try:
                yield call
            finally:
                del self._calls[id]
                call.close()

    async def _simple(self, type: Type, payload: bytes, timeout: float) -> bool:
        """Send one request; True once it is answered OK."""
        with anyio.move_on_after(timeout):
            async with self._open_call() as call:
                await call.send(type, payload)
                while True:
                    frame = await call.receive()
                    if frame.type in (Type.OK, Type.READY, Type.ERROR):
                        return frame.type != Type.ERROR
        return False

    # -- resume duties --

    async def sync(self, macs: dict[str, bytes] | None = None, timeout: float = SYNC_TIMEOUT) -> bool:
        """Send the clock, fresh entropy and new MACs (interface name -> address), then the
        identity; True once the agent confirms, False on timeout or if it reports a failure."""
        now = time.time_ns()
        seconds, nanoseconds = divmod(now, 1_000_000_000)
        if self.protocol == 1:
            return await self._sync_lines(seconds, nanoseconds, macs or {}, timeout)
        try:
            self._thawed.set()  # after a snapshot, the secrets go back in (here, or on the next call)
            payload = protocol.sync_payload(seconds, nanoseconds, os.urandom(protocol.ENTROPY_BYTES), macs or {})
            ok = await self._simple(Type.SYNC, payload, timeout)
            if ok:
                self._ready.set()  # a restored agent is up without announcing itself
                ok = self._delivered = await self._simple(Type.SETUP, self._setup_payload(), timeout)
                self._scrub_needed = bool(self.identity.secrets)
        except AgentError:
            return False
        self.answered = self.answered or ok
        return ok

    def _setup_payload(self) -> bytes:
        i = self.identity
        return protocol.setup_payload(i.hostname, i.machine_id, i.env, i.secrets)

    @property
    def holds_secrets(self) -> bool:
        """The agent may hold secrets that a snapshot must not contain."""
        return self._scrub_needed

    async def scrub(self, timeout: float = SYNC_TIMEOUT) -> bool:
        """Before a snapshot: have the agent overwrite the secrets it holds, then overwrite the
        guest kernel's receive buffers that carried them with padding. True if nothing is left.
        Until the next ``sync`` no call hands the secrets back."""
        if not self._scrub_needed:
            return True
        self._thawed = anyio.Event()
        try:
            if not await self._simple(Type.SCRUB, b"", timeout):
                return False
            chunk = protocol.encode(Type.PAD, 0, bytes(protocol.MAX_PAYLOAD - protocol.HEADER.size))
            for _ in range(PAD_BYTES // len(chunk) + 1):
                await self._outgoing.send(chunk)
            ok = await self._simple(Type.HELLO, b"", max(timeout, PAD_TIMEOUT))  # the padding has been read
        except AgentError:
            return False
        self._scrub_needed = not ok
        self._delivered = False  # secrets go back in on the next call or resume
        return ok

    # -- protocol 1 --

    def _receive_lines(self, data: bytes) -> None:
        self._line += data[: 4096 - len(self._line)]
        while b"\n" in self._line:
            line, _, rest = self._line.partition(b"\n")
            self._line = bytearray(rest)
            try:
                self._answers.send_nowait(line.decode(errors="replace").strip())
            except anyio.WouldBlock:
                pass  # nobody is waiting for this many answers: drop the extra
        if len(self._line) >= 4096:
            self._line = bytearray()

    async def _sync_lines(self, seconds: int, nanoseconds: int, macs: dict[str, bytes], timeout: float) -> bool:
        while True:  # drop stale answers
            try:
                self._answer_reader.receive_nowait()
            except anyio.WouldBlock:
                break
        changes = "".join(f" {name}={mac.hex()}" for name, mac in macs.items())
        line = f"sync {seconds} {nanoseconds} {os.urandom(32).hex()}{changes}\n"
        with anyio.move_on_after(timeout):
            await self._outgoing.send(line.encode())
            if await self._answer_reader.receive() == "ok":
                self.answered = True
                return True
        return False
