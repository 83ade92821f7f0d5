"""Host ends of a virtio console: a pair of file descriptors, or a listening Unix socket.

A port is anything with ``async receive(max_bytes) -> bytes`` (raising ``anyio.EndOfStream``
when the host side is finished), ``async send(data)`` and ``close()``.
"""

from __future__ import annotations

import os
import select
import socket
import stat
from typing import Protocol

import anyio

from smolvmm.errors import ConfigError


class ConsolePort(Protocol):
    """The host side of one console port."""

    async def receive(self, max_bytes: int = 65536) -> bytes: ...

    async def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class FdPort:
    """Reads from ``read_fd`` and writes to ``write_fd`` (e.g. stdin/stdout).

    The descriptors keep their blocking mode (a terminal's stdin and stdout often share one open
    file, so making one non-blocking would change the other for the whole process): the port
    waits until a descriptor is ready, then reads what is there or writes at most PIPE_BUF
    bytes, which a ready pipe or terminal takes without blocking. A read error counts as the end
    of input; after a write error (the reader went away) output is dropped. The descriptors
    belong to the caller and stay open.
    """

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._read_fd, self._write_fd = read_fd, write_fd
        self._broken = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.wait_readable(self._read_fd)
        try:
            data = os.read(self._read_fd, max_bytes)
        except OSError as exc:
            raise anyio.EndOfStream from exc
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._broken:
            await anyio.wait_writable(self._write_fd)
            try:
                view = view[os.write(self._write_fd, view[: select.PIPE_BUF]) :]
            except OSError:
                self._broken = True

    def close(self) -> None:
        """Nothing to release: the descriptors are the caller's."""


class UnixSocketPort:
    """Listens on a Unix socket at ``path`` and talks to one client at a time.

    Output while no client is connected is dropped (like a serial line with nothing plugged in);
    a connected client that stops reading holds the guest's output back. When the client
    hangs up the port accepts the next one.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            if stat.S_ISSOCK(os.stat(self.path).st_mode):
                os.unlink(self.path)  # a stale socket from an earlier run
        except FileNotFoundError:
            pass
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.path)
            self._listener.listen(1)
        except OSError as exc:
            self._listener.close()
            raise ConfigError(f"cannot listen on console socket {self.path}: {exc.strerror}") from exc
        self._listener.setblocking(False)
        self._client: socket.socket | None = None

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            client = self._client or await self._accept()
            try:
                await anyio.wait_readable(client)
                data = client.recv(max_bytes)
            except BlockingIOError:
                continue
            except (OSError, anyio.ClosedResourceError):
                data = b""
            if data:
                return data
            self._drop(client)

    async def _accept(self) -> socket.socket:
        while True:
            await anyio.wait_readable(self._listener)
            try:
                client, _ = self._listener.accept()
            except BlockingIOError:
                continue
            client.setblocking(False)
            self._client = client
            return client

    async def send(self, data: bytes) -> None:
        client = self._client
        view = memoryview(data)
        try:
            while client is not None and view:
                try:
                    view = view[client.send(view) :]
                except BlockingIOError:
                    await anyio.wait_writable(client)
        except (OSError, anyio.ClosedResourceError):
            self._drop(client)

    def _drop(self, client: socket.socket | None) -> None:
        if client is not None and client is self._client:
            self._client = None
            anyio.notify_closing(client)
            client.close()

    def close(self) -> None:
        self._drop(self._client)
        self._listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
