"""The guest console as an anyio byte stream, fed by the UART from vCPU threads."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

import anyio
from anyio.abc import ByteStream

from smolvmm.errors import ConfigError, GuestError, GuestTimeout
from smolvmm.host.eventfd import EventFd

MAX_BUFFERED = 16 << 20  # unread output beyond this is dropped, oldest first
INPUT_BUFFER = 4096
LAST_OUTPUT = 300  # bytes of output a GuestTimeout quotes, so a stuck guest says where it stopped
RECENT = 64 << 10  # output ``recent()`` keeps, read or not


class Console(ByteStream):
    """Bytes the guest writes to its console, and a way to type into it.

    ``receive()`` returns output in arrival order; ``wait_for`` consumes output up to a match.
    Output nobody reads is kept up to 16 MiB (oldest dropped first). ``recent()`` shows the last
    64 KiB, read or not, without consuming it.
    """

    def __init__(self, feed: Callable[[bytes], int]) -> None:
        self._feed = feed
        self._lock = threading.Lock()
        self._buffer = bytearray()
        self._recent = bytearray()
        self._ready = EventFd()
        self.input_space = EventFd()
        self._closed = False
        self._first_output: Callable[[], None] | None = None

    def on_first_output(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the producing thread) when the next output arrives."""
        self._first_output = callback

    # Producer side, called from vCPU threads.
    def write_output(self, data: bytes) -> None:
        """Append what the guest printed (past MAX_BUFFERED unread bytes, the oldest are dropped)."""
        if self._first_output is not None:
            callback, self._first_output = self._first_output, None
            callback()
        with self._lock:
            was_empty = not self._buffer
            self._buffer += data
            if len(self._buffer) > MAX_BUFFERED:
                del self._buffer[: len(self._buffer) - MAX_BUFFERED]
            self._recent += data
            if len(self._recent) > 2 * RECENT:  # trimmed now and then, not at every byte
                del self._recent[:-RECENT]
        if was_empty:
            self._ready.signal()

    def recent(self) -> bytes:
        """The last 64 KiB the guest wrote to the console, whether read or not (nothing consumed)."""
        with self._lock:
            return bytes(self._recent[-RECENT:])

    def end_output(self) -> None:
        """No more output will come (the machine stopped)."""
        self._closed = True
        self._ready.signal()

    def _take(self, max_bytes: int) -> bytes:
        with self._lock:
            data = bytes(self._buffer[:max_bytes])
            del self._buffer[:max_bytes]
            return data

    def _unread(self, data: bytes) -> None:
        with self._lock:
            self._buffer[:0] = data

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` of what the guest printed, waiting for some; EndOfStream once the
        machine has ended and all of it was read."""
        while True:
            data = self._take(max_bytes)
            if data:
                return data
            if self._closed:
                raise anyio.EndOfStream
            await self._ready.wait()

    async def send(self, item: bytes) -> None:
        """Type ``item`` into the guest console, waiting while its receive FIFO is full."""
        data = memoryview(item)
        while data:
            if self._closed:
                raise anyio.ClosedResourceError
            accepted = self._feed(bytes(data))
            data = data[accepted:]
            if data:
                await self.input_space.wait()

    async def wait_for(
        self, pattern: bytes | str | re.Pattern[bytes] | re.Pattern[str], timeout: float | None = None
    ) -> bytes:
        """Consume output up to and including the first match of ``pattern``; returns those bytes.

        ``pattern`` is bytes or str (matched as written) or a compiled regex; a str regex matches
        the console's bytes as its UTF-8 encoding. Raises GuestTimeout (a TimeoutError, quoting
        the end of the output seen meanwhile) after ``timeout`` seconds and GuestError if the
        machine stops first; in both cases the output read so far stays unread.
        """
        if isinstance(pattern, str):
            pattern = pattern.encode()
        if isinstance(pattern, re.Pattern):
            regex = _bytes_regex(pattern)
            wanted = f"a match of /{regex.pattern.decode(errors='replace')}/"
        else:
            regex = re.compile(re.escape(pattern))
            wanted = repr(pattern.decode(errors="replace"))
        seen = bytearray()
        try:
            with anyio.fail_after(timeout):
                while True:
                    match = regex.search(seen)
                    if match:
                        self._unread(bytes(seen[match.end() :]))
                        return bytes(seen[: match.end()])
                    try:
                        seen += await self.receive()
                    except anyio.EndOfStream:
                        raise GuestError(f"the machine stopped before its console showed {wanted}") from None
        except TimeoutError:
            self._unread(bytes(seen))
            shown = f"its last output: {seen[-LAST_OUTPUT:].decode(errors='replace')!r}" if seen else "no output"
            raise GuestTimeout(f"the console did not show {wanted} within {timeout:g} s ({shown})") from None
        except BaseException:
            self._unread(bytes(seen))
            raise

    async def send_eof(self) -> None:
        """The console has no end-of-input: the guest keeps running."""

    async def aclose(self) -> None:
        """End the output: readers get what is left, then EndOfStream."""
        self.end_output()

    def close_fds(self) -> None:
        """Close the eventfds behind the stream (once nothing writes or reads it)."""
        self._ready.close()
        self.input_space.close()


def _bytes_regex(pattern: re.Pattern[bytes] | re.Pattern[str]) -> re.Pattern[bytes]:
    """``pattern`` for bytes: a str regex's source compiled as UTF-8 (bytes patterns take no re.UNICODE)."""
    if isinstance(pattern.pattern, bytes):
        return pattern
    try:
        return re.compile(pattern.pattern.encode(), pattern.flags & ~re.UNICODE)
    except re.error as exc:
        raise ConfigError(f"console pattern {pattern.pattern!r} has no bytes equivalent: {exc}") from None


class VirtioConsoleInput:
    """The host side of a virtio console port that is the machine's console (guest ``hvc0``).

    Output from the guest goes to ``console``; input typed with ``console.send`` is queued here
    (up to 4 KiB) until the device delivers it.
    """

    def __init__(self) -> None:
        self.console = Console(self._queue)
        self._lock = threading.Lock()
        self._pending = bytearray()
        self._ready = EventFd()

    def _queue(self, data: bytes) -> int:
        with self._lock:
            accepted = data[: INPUT_BUFFER - len(self._pending)]
            self._pending += accepted
        if accepted:
            self._ready.signal()
        return len(accepted)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            with self._lock:
                data = bytes(self._pending[:max_bytes])
                del self._pending[:max_bytes]
            if data:
                self.console.input_space.signal()
                return data
            await self._ready.wait()

    async def send(self, data: bytes) -> None:
        self.console.write_output(data)

    def close(self) -> None:
        self._ready.close()
