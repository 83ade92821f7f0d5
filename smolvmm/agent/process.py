"""Running commands in the guest through its agent: ``Machine.exec`` and ``Machine.process``.

A process runs in its own session and process group inside the guest, with the environment
the machine was given at restore (``env`` then ``secrets``) and the call's ``env`` on top.
A command killed by signal N reports ``exit_code == 128 + N`` (as a shell does) and
``signal == N``; otherwise ``signal`` is None.
"""

from __future__ import annotations

import math
import signal as signals
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from smolvmm.agent import protocol
from smolvmm.agent.channel import AgentPort, Call
from smolvmm.agent.protocol import ProtocolError, Type
from smolvmm.errors import AgentError, ConfigError, GuestTimeout, OutputLimitError, unwrapped_errors

DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
KILL_GRACE = 30.0  # how long a killed process may take to report its end
# The agent sends output while at most WINDOW bytes of a stream are unacknowledged: one frame may go past.
UNREAD_LIMIT = protocol.WINDOW + protocol.MAX_PAYLOAD


@dataclass(frozen=True)
class ExecResult:
    """How a command ended: its exit status (128+N when killed by signal N), its output, and the signal."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None


def argv_of(cmd: str | Sequence[str]) -> list[str]:
    """A list is the argv itself; a string runs under ``/bin/sh -c``."""
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    argv = list(cmd)
    if not argv or not all(isinstance(arg, str) for arg in argv):
        raise ConfigError("a command is a non-empty list of strings, or a string for /bin/sh -c")
    return argv


class ProcessInput:
    """A process's stdin: ``send`` bytes (waits while the guest pipe is full), ``aclose`` for EOF.

    ``send`` raises ``anyio.BrokenResourceError`` once the process has ended.
    """

    def __init__(self, call: Call) -> None:
        self._call = call
        self._in_flight = 0
        self._taken = anyio.Event()
        self._closed = False
        self._gone = False

    def _end(self) -> None:
        self._gone = True
        self._taken.set()

    def _acknowledged(self, count: int) -> None:
        self._in_flight -= count
        self._taken.set()

    async def send(self, data: bytes) -> None:
        """Write ``data`` to the process's stdin, waiting while the agent holds a window's worth
        unread; BrokenResourceError once the process is gone."""
        if self._closed:
            raise anyio.ClosedResourceError
        view = memoryview(data)
        while view:
            while self._in_flight >= protocol.WINDOW and not self._gone:
                self._taken = anyio.Event()
                await self._taken.wait()
            if self._gone:
                raise anyio.BrokenResourceError
            chunk = bytes(view[: protocol.MAX_PAYLOAD])
            view = view[len(chunk) :]
            self._in_flight += len(chunk)
            await self._call.send(Type.STDIN, chunk)

    async def aclose(self) -> None:
        """Close the process's stdin (it reads end of file)."""
        if not self._closed and not self._gone:
            self._closed = True
            await self._call.send(Type.STDIN)


class ProcessOutput:
    """A process's stdout or stderr: iterate to get its chunks of bytes until it ends.

    It holds at most ``UNREAD_LIMIT`` unread bytes: an agent that sends more ignored its window.
    """

    def __init__(self, call: Call, stream: int) -> None:
        self._call = call
        self._stream = stream
        self._chunks, self._reader = anyio.create_memory_object_stream[bytes](math.inf)
        self._unread = 0
        self._failure: Exception | None = None

    def _deliver(self, chunk: bytes) -> None:
        """From ``_route``: queue ``chunk``; AgentError if it takes the unread bytes past the limit."""
        self._unread += len(chunk)
        if self._unread > UNREAD_LIMIT:
            name = ("stdout", "stderr")[self._stream]
            raise AgentError(f"the guest agent ignored its output window: {name} held over {UNREAD_LIMIT} unread bytes")
        if chunk:  # the window does not bound how many empty ones come: dropped, not held
            self._chunks.send_nowait(chunk)

    def _end(self, failure: Exception | None = None) -> None:
        self._failure = self._failure or failure
        self._chunks.close()

    def __aiter__(self) -> ProcessOutput:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._reader.receive()
        except anyio.EndOfStream:
            if self._failure is not None:
                raise self._failure from None
            raise StopAsyncIteration from None
        self._unread -= len(chunk)
        try:
            await self._call.send(Type.OUTPUT_ACK, protocol.u32(self._stream) + protocol.u32(len(chunk)))
        except AgentError:
            pass  # the end or failure comes with the next chunk
        return chunk


class Process:
    """A command running in the guest (see ``Machine.process``)."""

    def __init__(self, call: Call, pid: int) -> None:
        self.pid = pid  # in the guest
        self.stdin = ProcessInput(call)
        self.stdout = ProcessOutput(call, 0)
        self.stderr = ProcessOutput(call, 1)
        self.exit_code: int | None = None
        self.signal: int | None = None
        self._call = call
        self._ended = anyio.Event()
        self._failure: Exception | None = None

    async def _route(self) -> None:
        """Sort the call's frames into stdout, stderr, stdin credit and the exit."""
        try:
            while True:
                frame = await self._call.receive()
                if frame.type in (Type.STDOUT, Type.STDERR):
                    (self.stdout if frame.type == Type.STDOUT else self.stderr)._deliver(frame.payload)
                elif frame.type == Type.STDIN_ACK:
                    self.stdin._acknowledged(protocol.decode_u32(frame.payload))
                elif frame.type == Type.EXIT:
                    self.exit_code, self.signal = protocol.decode_exit(frame.payload)
                    break
        except (AgentError, ProtocolError) as exc:
            self._failure = exc if isinstance(exc, AgentError) else AgentError(f"the guest agent: {exc}")
            self._call.fail(str(self._failure))  # nothing reads the call now: the guest's further frames are dropped
        finally:
            self.stdout._end(self._failure)
            self.stderr._end(self._failure)
            self.stdin._end()
            self._ended.set()

    async def wait(self) -> int:
        """Wait for the end; returns the exit code (128+N for signal N, with ``signal`` set).

        Read ``stdout`` and ``stderr`` meanwhile: a process whose unread output fills the
        window (256 KiB per stream) waits for the reader.
        """
        await self._ended.wait()
        if self._failure is not None:
            raise self._failure
        assert self.exit_code is not None
        return self.exit_code

    async def kill(self, signal: int = signals.SIGKILL) -> None:
        """Send ``signal`` (SIGKILL by default) to the process's whole process group."""
        if not self._ended.is_set():
            await self._call.send(Type.SIGNAL, protocol.u32(signal))


@asynccontextmanager
async def open_process(
    port: AgentPort, cmd: str | Sequence[str], env: dict[str, str] | None, cwd: str | None
) -> AsyncIterator[Process]:
    """Start ``cmd``; on exit a process still running is killed and waited for."""
    try:
        payload = protocol.exec_payload(argv_of(cmd), dict(env or {}), cwd or "")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    async with port.call() as call:
        await call.send(Type.EXEC, payload)
        frame = await call.receive()
        if frame.type == Type.ERROR:
            raise AgentError(f"the guest could not start {argv_of(cmd)[0]!r}: {protocol.decode_message(frame.payload)}")
        if frame.type != Type.STARTED:
            raise AgentError(f"the guest agent answered exec with frame type {frame.type}")
        process = Process(call, protocol.decode_u32(frame.payload))
        with unwrapped_errors():
            async with anyio.create_task_group() as tg:
                tg.start_soon(process._route)
                try:
                    yield process
                finally:
                    with anyio.CancelScope(shield=True):
                        await _finish(process)


async def _finish(process: Process) -> None:
    """Kill a process still running and drain it, so the guest frees its slot."""
    if process._ended.is_set():
        return
    with anyio.move_on_after(KILL_GRACE):
        try:
            await process.kill()
        except AgentError:
            return
        async with anyio.create_task_group() as tg:
            for output in (process.stdout, process.stderr):
                tg.start_soon(_discard, output)
        await process._ended.wait()
    process._call.fail("the process was abandoned")


async def _discard(output: ProcessOutput) -> None:
    try:
        async for _ in output:
            pass
    except AgentError:
        pass


async def _collect(output: ProcessOutput, limit: int, name: str) -> bytes:
    data = bytearray()
    async for chunk in output:
        data += chunk
        if len(data) > limit:
            raise OutputLimitError(
                f"the command wrote more than {limit} bytes to {name}: raise max_output or use Machine.process"
            )
    return bytes(data)


async def run(
    port: AgentPort,
    cmd: str | Sequence[str],
    env: dict[str, str] | None,
    cwd: str | None,
    stdin: bytes | None,
    timeout: float | None,
    max_output: int,
) -> ExecResult:
    """``Machine.exec``: run ``cmd`` to its end and return its exit code and output."""
    outputs: dict[str, bytes] = {}
    async with open_process(port, cmd, env, cwd) as process:

        async def collect(name: str, output: ProcessOutput) -> None:
            outputs[name] = await _collect(output, max_output, name)

        async def feed() -> None:
            try:
                if stdin:
                    await process.stdin.send(stdin)
                await process.stdin.aclose()
            except anyio.BrokenResourceError:
                pass  # it ended without reading all of its input

        with anyio.move_on_after(math.inf if timeout is None else timeout) as scope, unwrapped_errors():
            async with anyio.create_task_group() as tg:
                tg.start_soon(collect, "stdout", process.stdout)
                tg.start_soon(collect, "stderr", process.stderr)
                tg.start_soon(feed)
                await process.wait()
        if scope.cancelled_caught:
            raise GuestTimeout(f"{argv_of(cmd)[0]!r} did not finish within {timeout:g} s: it was killed")
    assert process.exit_code is not None
    return ExecResult(process.exit_code, outputs["stdout"], outputs["stderr"], process.signal)
