"""``smolvmm exec ID -- CMD``: a command in a machine started with ``run --detach``, reached by id.

The detached ``run`` serves a control socket beside its console socket (``ID.control`` in the
user's private runtime directory). Each connection runs one command with the public
``Machine.process``: the client sends a request, then its stdin; the machine's process streams
stdout and stderr back and ends with its exit status, which the client exits with (128+N for a
signal, as ``run BUNDLE -- CMD``).

Frames both ways: a type byte, a 4-byte big-endian length, the payload (at most ``MAX_PAYLOAD``).
Client: ``R`` the request (JSON: argv, env, cwd), ``I`` stdin data, ``E`` end of stdin. Server:
``1`` stdout, ``2`` stderr, ``X`` the exit status (JSON), ``!`` an error (JSON: message, status).
The server checks every frame a client sends: a bad one ends that connection, never the machine.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
from anyio.abc import SocketListener, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

import smolvmm
from smolvmm.cli import args as cli_args
from smolvmm.cli import output as cli_output
from smolvmm.cli import ps as cli_ps
from smolvmm.cli import runtime as cli_runtime
from smolvmm.cli import status as cli_status

HEADER = struct.Struct(">cI")
MAX_PAYLOAD = 256 << 10  # a request or one chunk of a stream
REQUEST, STDIN, STDIN_END = b"R", b"I", b"E"
STDOUT, STDERR, EXIT, ERROR = b"1", b"2", b"X", b"!"


class ControlError(smolvmm.SmolvmmError):
    """A malformed frame or request on a control socket."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    """One frame: ``kind``, the payload's length, the payload."""
    if len(payload) > MAX_PAYLOAD:
        raise ControlError(f"a {len(payload)}-byte frame is over the {MAX_PAYLOAD}-byte limit")
    return HEADER.pack(kind, len(payload)) + payload


async def read_frame(stream: BufferedByteReceiveStream) -> tuple[bytes, bytes] | None:
    """The next frame as (kind, payload), or None at a clean end of stream."""
    try:
        header = await stream.receive(HEADER.size)
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return None
    try:
        header += await stream.receive_exactly(HEADER.size - len(header)) if len(header) < HEADER.size else b""
        kind, length = HEADER.unpack(header)
        if length > MAX_PAYLOAD:
            raise ControlError(f"a {length}-byte frame is over the {MAX_PAYLOAD}-byte limit")
        return kind, await stream.receive_exactly(length) if length else b""
    except anyio.IncompleteRead:
        raise ControlError("the connection ended inside a frame") from None


def parse_request(payload: bytes) -> tuple[list[str], dict[str, str], str | None]:
    """(argv, env, cwd) from a request's JSON, each field checked."""
    try:
        request = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(f"the request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ControlError("the request is not a JSON object")
    argv, env, cwd = request.get("argv"), request.get("env", {}), request.get("cwd")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ControlError("the request's argv is not a non-empty list of strings")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ControlError("the request's env is not an object of strings")
    if cwd is not None and not isinstance(cwd, str):
        raise ControlError("the request's cwd is not a string")
    return argv, env, cwd


def path(machine_id: str) -> Path:
    """Where a detached machine serves exec."""
    return cli_runtime.runtime_dir() / f"{machine_id}.control"


async def serve(machine: smolvmm.Machine, listener: SocketListener) -> None:
    """Run each connecting client's command in ``machine`` until cancelled."""
    async with listener:
        await listener.serve(lambda client: _client(machine, client))


async def _client(machine: smolvmm.Machine, client: SocketStream) -> None:
    lock = anyio.Lock()

    async def send(kind: bytes, payload: bytes) -> None:
        async with lock:  # stdout and stderr pumps share the socket
            await client.send(frame(kind, payload))

    async with client:
        try:
            incoming = BufferedByteReceiveStream(client)
            first = await read_frame(incoming)
            if first is None or first[0] != REQUEST:
                raise ControlError("the connection did not start with a request")
            argv, env, cwd = parse_request(first[1])
            async with machine.process(argv, env=env, cwd=cwd) as process:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_stdin_from, incoming, process)
                    async with anyio.create_task_group() as outputs:
                        outputs.start_soon(_stream_to, process.stdout, send, STDOUT)
                        outputs.start_soon(_stream_to, process.stderr, send, STDERR)
                    status = await process.wait()
                    tg.cancel_scope.cancel()
            await send(EXIT, json.dumps({"status": status}).encode())
        except Exception as exc:  # a client's failure ends its connection, never the machine
            await _answer_failure(send, cli_status.leaf(exc))


Send = Callable[[bytes, bytes], Awaitable[None]]


async def _answer_failure(send: Send, exc: BaseException) -> None:
    """Tell the client why its command failed; a client that went away needs no answer."""
    if isinstance(exc, (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)):
        return  # the client went away: leaving machine.process killed its command
    if not isinstance(exc, smolvmm.SmolvmmError):
        cli_output.error(f"exec: {type(exc).__name__}: {exc}")  # into the detached machine's log
    status = cli_status.for_error(exc) if isinstance(exc, smolvmm.SmolvmmError) else cli_status.ERROR
    message = json.dumps({"message": str(exc)[:4096], "status": status}).encode()
    try:
        await send(ERROR, message)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass


async def _stdin_from(incoming: BufferedByteReceiveStream, process: smolvmm.Process) -> None:
    try:
        while (received := await read_frame(incoming)) is not None:
            kind, payload = received
            if kind == STDIN:
                await process.stdin.send(payload)
            elif kind == STDIN_END:
                await process.stdin.aclose()
            else:
                raise ControlError(f"unexpected frame {kind!r} after the request")
        await process.stdin.aclose()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # the command ended (or closed its stdin) first: the rest of the input has no reader


async def _stream_to(output: AsyncIterator[bytes], send: Send, kind: bytes) -> None:
    async for chunk in output:
        for start in range(0, len(chunk), MAX_PAYLOAD):
            await send(kind, chunk[start : start + MAX_PAYLOAD])


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        type=cli_args.assignment,
        metavar="K=V",
        help="an environment variable for CMD (repeatable)",
    )
    parser.add_argument("--workdir", metavar="DIR", help="the guest directory CMD starts in")
    parser.add_argument("id", metavar="ID", help="a machine started with `run --detach` (a unique prefix will do)")
    parser.add_argument("command", nargs="*", metavar="-- CMD [ARGS...]", help="the command to run in the machine")


def run(name: str, args: argparse.Namespace) -> int:
    """``exec ID -- CMD``: CMD's stdout and stderr on ours, our stdin to it; exits with its status."""
    if not args.command:
        raise smolvmm.ConfigError("exec needs a command after --: smolvmm exec ID -- CMD [ARGS...]")
    entry = cli_ps.lookup(args.id)
    if not entry.get("console"):
        raise smolvmm.ConfigError(
            f"machine {entry['id']} was not started with `run --detach`: exec reaches only detached machines"
        )
    request = json.dumps({"argv": args.command, "env": dict(args.env), "cwd": args.workdir}).encode()
    return anyio.run(_exec, entry["id"], request, backend="trio")


async def _exec(machine_id: str, request: bytes) -> int:
    try:
        client = await anyio.connect_unix(path(machine_id))
    except OSError as exc:
        raise smolvmm.SmolvmmError(f"cannot reach machine {machine_id}: {exc.strerror}") from exc
    async with client, anyio.create_task_group() as tg:
        await client.send(frame(REQUEST, request))
        tg.start_soon(_send_stdin, client)
        status = await _receive(BufferedByteReceiveStream(client))
        tg.cancel_scope.cancel()
    return status


async def _send_stdin(client: SocketStream) -> None:
    try:
        while data := await cli_output.read_stdin(MAX_PAYLOAD):
            await client.send(frame(STDIN, data))
        await client.send(frame(STDIN_END))
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass  # the command ended first


async def _receive(incoming: BufferedByteReceiveStream) -> int:
    while (received := await read_frame(incoming)) is not None:
        kind, payload = received
        if kind in (STDOUT, STDERR):
            await cli_output.write_all((sys.stdout if kind == STDOUT else sys.stderr).fileno(), payload)
        elif kind in (EXIT, ERROR):
            answer = json.loads(payload)
            if kind == ERROR:
                cli_output.error(str(answer["message"]))
            return int(answer["status"])
    raise smolvmm.SmolvmmError("the machine ended the connection before the command's exit status")
