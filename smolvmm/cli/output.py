"""Where the CLI's output goes: results on stdout (text, or JSON with ``--json``), messages on stderr.

Colour only on a terminal, and never with ``NO_COLOR`` set (https://no-color.org) or ``TERM=dumb``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import termios
import tty
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from smolvmm import Machine

ESCAPE_KEY = b"\x1d"  # Ctrl-]: leaves a console (boot and run stop the machine; attach detaches)
_RED = "\x1b[31m"
_RESET = "\x1b[0m"


def version() -> str:
    """The installed smolvmm's version ("unknown" in a source tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("smolvmm")
    except PackageNotFoundError:
        return "unknown"


def size(count: int) -> str:
    """``count`` bytes for people: 512 bytes, 8.0 KiB, 1.5 GiB."""
    if count < 1024:
        return f"{count} bytes"
    exponent = min(3, (count.bit_length() - 1) // 10)
    return f"{count / (1 << 10 * exponent):.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal a person watches (so progress and colour belong there)."""
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except ValueError:  # closed
        return False


def colour(stream: TextIO) -> bool:
    """Whether to colour what goes to ``stream``."""
    return is_terminal(stream) and not os.environ.get("NO_COLOR")


def result(text: str) -> None:
    """A command's result, for people: stdout."""
    print(text, flush=True)


def result_json(value: Any, *, indent: int | None = 2) -> None:
    """A command's result, for programs (``--json``): one JSON document on stdout."""
    print(json.dumps(value, indent=indent), flush=True)


def message(text: str) -> None:
    """What smolvmm tells the person running it (notes, progress words): stderr."""
    print(f"smolvmm: {text}", file=sys.stderr, flush=True)


def report_network(machine: Machine) -> None:
    """One line on stderr per port forward, with the host port actually bound; a note when the
    machine's network cards were left without a wire (a host without user networking)."""
    for forward in machine.forwards:
        message(f"forwarding host port {forward.host}/{forward.protocol} to guest port {forward.guest}")
    if "unplugged" in machine.timings.notes:
        message(f"note: {machine.timings.notes['unplugged']}")


def error(text: str) -> None:
    """One line saying why a command failed: stderr."""
    label = f"{_RED}error{_RESET}" if colour(sys.stderr) else "error"
    print(f"smolvmm: {label}: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def raw_terminal() -> Iterator[bool]:
    """Raw mode on a TTY stdin (restored on exit); yields whether stdin is a TTY."""
    if not os.isatty(0):
        yield False
        return
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield True
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


async def read_stdin(max_bytes: int = 4096) -> bytes:
    """The next bytes of stdin (b"" at its end), waiting without blocking the event loop."""
    import anyio  # here, so that --help and --version import no event loop

    try:
        await anyio.wait_readable(0)
    except PermissionError:
        pass  # a regular file or /dev/null: epoll refuses it, and reading it never blocks
    return os.read(0, max_bytes)


async def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (which may be non-blocking), waiting while it is full."""
    import anyio

    view = memoryview(data)
    while view:
        try:
            await anyio.wait_writable(fd)
        except PermissionError:
            pass  # a regular file (`run ... -- CMD > out.txt`): epoll refuses it, and writing it never blocks
        view = view[os.write(fd, view) :]


def discard_stdout() -> None:
    """After a reader closed stdout (``| head``): send what is left to /dev/null, so that flushing at
    exit does not fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
