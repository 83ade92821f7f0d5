"""Progress lines on a terminal, drawn with tqdm; nothing at all when stderr is not a terminal.

tqdm rather than rich: one small pure-Python package with no dependencies (rich pulls in
pygments and markdown-it and costs several times the import), it draws plain ``\\r`` lines
without colour (nothing for NO_COLOR to turn off), and it can hold a bar back until work has
lasted a while, so quick steps show nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import smolvmm
from smolvmm.cli.output import is_terminal

DELAY_ENV = "SMOLVMM_PROGRESS_DELAY"  # seconds before a bar shows (default 0.5; 0 shows every bar at once)
_TICK = 0.25  # seconds between redraws, so elapsed time moves while nothing else does


class Bar:
    """One line on the terminal: a description, bytes done (of a total when known), elapsed time
    and a status text."""

    def __init__(self, description: str, total: int | None) -> None:
        from tqdm import tqdm

        self._sized = total is not None
        self._bar: Any = tqdm(
            total=total,
            desc=description,
            file=sys.stderr,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            delay=_delay(),
            mininterval=_TICK,
            dynamic_ncols=True,
            bar_format=None if self._sized else "{desc} [{elapsed}]{postfix}",
        )
        self._done_text = ""
        self._status_text = ""
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="smolvmm-progress", daemon=True)
        self._ticker.start()

    def update(self, done: int) -> None:
        """``done`` bytes are finished."""
        if self._sized:
            self._bar.update(done - self._bar.n)
        else:
            self._bar.n = done
            self._done_text = self._bar.format_sizeof(done, "B", 1024)
            self._postfix()

    def status(self, text: str) -> None:
        """What the work is doing now (one line: the last line of a guest's console, say)."""
        self._status_text = " ".join(text.split())[:120]
        self._postfix()

    def close(self) -> None:
        self._stop.set()
        self._ticker.join()
        self._bar.close()

    def _postfix(self) -> None:
        self._bar.set_postfix_str(", ".join(t for t in (self._done_text, self._status_text) if t), refresh=False)

    def _tick(self) -> None:
        while not self._stop.wait(_TICK):
            self._bar.update(0)  # redraws once the delay has passed, and keeps the bar's own timing


def _delay() -> float:
    """How long work runs before its bar shows: quick steps print nothing."""
    try:
        return max(0.0, float(os.environ.get(DELAY_ENV, "0.5")))
    except ValueError:
        return 0.5


@contextlib.contextmanager
def bar(description: str, total: int | None = None) -> Iterator[Bar | None]:
    """A bar on stderr for the work in the block, or None when stderr is not a terminal."""
    if not is_terminal(sys.stderr):
        yield None
        return
    shown = Bar(description, total)
    try:
        yield shown
    finally:
        shown.close()


class Steps:
    """Bars for work reported as ``(description, done, total)`` calls: a new bar each time the
    description changes (a pack reads, then writes)."""

    def __init__(self) -> None:
        self._bar: Bar | None = None
        self._description = ""

    def __call__(self, description: str, done: int, total: int | None) -> None:
        if self._bar is None or description != self._description:
            self.close()
            self._bar, self._description = Bar(description, total), description
        self._bar.update(done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextlib.contextmanager
def steps() -> Iterator[Steps | None]:
    """A ``Steps`` on stderr for the work in the block, or None when stderr is not a terminal."""
    if not is_terminal(sys.stderr):
        yield None
        return
    shown = Steps()
    try:
        yield shown
    finally:
        shown.close()


@contextlib.contextmanager
def shown() -> Iterator[None]:
    """Show the library's long work (downloads, image builds, snapshot writes) on a terminal."""
    if not is_terminal(sys.stderr):
        yield
        return
    with smolvmm.report_progress(Bar):
        yield
