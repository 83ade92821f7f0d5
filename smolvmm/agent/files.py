"""Files in and out of the guest through its agent: ``Machine.files``.

Writes go to a temporary file beside the guest path, renamed over it once complete; downloads
likewise on the host. Transfers stream in frames of at most 64 KiB, so their size is bounded
by neither side's memory.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import anyio

from smolformat.files import check_replaceable, new_file_mode
from smolvmm.agent import protocol
from smolvmm.agent.channel import AgentPort
from smolvmm.agent.protocol import Type
from smolvmm.errors import AgentError, ConfigError, GuestFileError, OutputLimitError, SmolvmmError

DEFAULT_MAX_READ = 16 * 1024 * 1024
HOST_BLOCK = 1024 * 1024  # host file I/O per worker-thread call


def _guest_error(frame_payload: bytes) -> GuestFileError:
    return GuestFileError(f"in the guest: {protocol.decode_message(frame_payload)}")


@contextmanager
def _host_file(doing: str, path: object) -> Iterator[None]:
    """An OSError of host file ``path`` as a SmolvmmError naming it (the host's failure, not the guest's)."""
    try:
        yield
    except OSError as exc:
        raise SmolvmmError(f"cannot {doing} {path}: {exc.strerror or exc}") from exc


def _checked(encode: Callable[..., bytes], *args: object) -> bytes:
    try:
        return encode(*args)
    except ValueError as exc:
        raise ConfigError(f"invalid guest path: {exc}") from None


class GuestFiles:
    """Reading and writing files inside a running guest."""

    def __init__(self, port: Callable[[], AgentPort]) -> None:
        self._port = port

    async def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Create or replace guest file ``path`` with ``data`` (atomically), with permission ``mode``."""

        async def chunks() -> AsyncIterator[bytes]:
            view = memoryview(data)
            for start in range(0, len(view), protocol.MAX_PAYLOAD):
                yield bytes(view[start : start + protocol.MAX_PAYLOAD])

        await self._write(path, mode, chunks())

    async def upload(
        self, host_path: str | os.PathLike[str] | BinaryIO, guest_path: str, mode: int | None = None
    ) -> None:
        """Copy host file ``host_path`` (or a file open for reading, e.g. one opened before a jail hid
        the host's files; it is closed) to ``guest_path``, streaming (any size).

        ``mode`` defaults to the host file's permission bits."""
        with _host_file("read", host_path):
            opened = open(host_path, "rb") if isinstance(host_path, str | os.PathLike) else host_path
        source = anyio.wrap_file(opened)
        async with source:
            if mode is None:
                mode = os.fstat(opened.fileno()).st_mode & 0o7777

            async def chunks() -> AsyncIterator[bytes]:
                while block := await source.read(HOST_BLOCK):
                    for start in range(0, len(block), protocol.MAX_PAYLOAD):
                        yield block[start : start + protocol.MAX_PAYLOAD]

            await self._write(guest_path, mode, chunks())

    async def _write(self, path: str, mode: int, chunks: AsyncIterator[bytes]) -> None:
        async with self._port().call() as call:
            await call.send(Type.WRITE_OPEN, _checked(protocol.write_open_payload, path, mode))
            answer = None
            async with anyio.create_task_group() as tg:

                async def wait_answer() -> None:
                    nonlocal answer
                    answer = await call.receive()
                    tg.cancel_scope.cancel()  # an early error stops the sending

                tg.start_soon(wait_answer)
                async for chunk in chunks:
                    await call.send(Type.WRITE_DATA, chunk)
                await call.send(Type.WRITE_DATA)
            assert answer is not None
            if answer.type == Type.ERROR:
                raise _guest_error(answer.payload)
            if answer.type != Type.OK:
                raise AgentError(f"the guest agent answered a write with frame type {answer.type}")

    async def read(self, path: str, max_size: int = DEFAULT_MAX_READ) -> bytes:
        """The contents of guest file ``path``; OutputLimitError past ``max_size`` bytes (use ``download``)."""
        data = bytearray()

        async def keep(chunk: bytes) -> None:
            data.extend(chunk)
            if len(data) > max_size:
                raise OutputLimitError(f"{path} holds more than {max_size} bytes: raise max_size or use files.download")

        await self._read(path, keep)
        return bytes(data)

    async def download(self, guest_path: str, host_path: str | os.PathLike[str]) -> None:
        """Copy guest file ``guest_path`` to ``host_path`` (written atomically), streaming (any size)."""
        import tempfile  # here: a restore's start-up does not wait for it

        target = Path(host_path)
        with _host_file("write", target):
            check_replaceable(target)
            fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                os.fchmod(fd, new_file_mode())
                with os.fdopen(fd, "wb") as out:
                    pending = bytearray()

                    async def keep(chunk: bytes) -> None:
                        pending.extend(chunk)
                        if len(pending) >= HOST_BLOCK:
                            await anyio.to_thread.run_sync(out.write, bytes(pending))
                            pending.clear()

                    await self._read(guest_path, keep)
                    await anyio.to_thread.run_sync(out.write, bytes(pending))
                os.replace(temp, target)
            except BaseException:
                os.unlink(temp)
                raise
        from smolvmm.host.jail import publish

        await anyio.to_thread.run_sync(publish, target)  # out of a jail's staging directory, if jailed

    async def _read(self, path: str, keep: Callable[[bytes], Awaitable[None]]) -> None:
        async with self._port().call() as call:
            await call.send(Type.READ_OPEN, _checked(protocol.read_open_payload, path))
            while True:
                frame = await call.receive()
                if frame.type == Type.READ_DATA:
                    await keep(frame.payload)
                    await call.send(Type.READ_ACK, protocol.u32(len(frame.payload)))
                elif frame.type == Type.OK:
                    return
                elif frame.type == Type.ERROR:
                    raise _guest_error(frame.payload)
