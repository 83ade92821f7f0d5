"""Where the CLI's output goes: results on stdout (text, or JSON with ``--json``), messages on stderr.

Colour only on a terminal, and never with ``NO_COLOR`` set (https://no-color.org) or ``TERM=dumb``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

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


def error(text: str) -> None:
    """One line saying why a command failed: stderr."""
    label = f"{_RED}error{_RESET}" if colour(sys.stderr) else "error"
    print(f"smolvmm: {label}: {text}", file=sys.stderr, flush=True)


def discard_stdout() -> None:
    """After a reader closed stdout (``| head``): send what is left to /dev/null, so that flushing at
    exit does not fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
