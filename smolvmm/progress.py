"""Progress of long work (downloads, guest image builds, snapshot writes), for whoever shows it.

Library code reports through ``task(...)``; nothing is shown, and it costs next to nothing, unless
the application installed a sink with ``report_progress(sink)`` (the CLI does, on a terminal).
The sink is a context variable: it follows the caller into anyio tasks and worker threads
started with ``anyio.to_thread``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Protocol


class ProgressBar(Protocol):
    """What a sink shows for one piece of work."""

    def update(self, done: int) -> None:
        """``done`` units (bytes, unless the task has no total) are finished."""

    def status(self, text: str) -> None:
        """What the work is doing now, in a few words."""

    def close(self) -> None:
        """The work ended."""


# (description, total bytes or None when unknown) -> the bar that shows it
ProgressSink = Callable[[str, "int | None"], ProgressBar]

_sink: ContextVar[ProgressSink | None] = ContextVar("smolvmm_progress_sink", default=None)


@contextlib.contextmanager
def report_progress(sink: ProgressSink) -> Iterator[None]:
    """Show smolvmm's long work through ``sink`` inside the ``with`` block."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


class Task:
    """One piece of long work; every method does nothing when no sink listens."""

    def __init__(self, bar: ProgressBar | None) -> None:
        self._bar = bar

    def update(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(done)

    def status(self, text: str) -> None:
        if self._bar is not None:
            self._bar.status(text)


@contextlib.contextmanager
def task(description: str, total: int | None = None) -> Iterator[Task]:
    """Report the work inside the ``with`` block as ``description`` (``total`` bytes, if known)."""
    sink = _sink.get()
    bar = sink(description, total) if sink is not None else None
    try:
        yield Task(bar)
    finally:
        if bar is not None:
            bar.close()
