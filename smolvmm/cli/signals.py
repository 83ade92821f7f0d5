"""How a CLI command ends on SIGTERM (``smolvmm stop``, a service manager) or SIGHUP: its exit
status is then 128 + the signal's number (docs/ERRORS.md)."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio


async def until_signal(received: list[int] | None = None) -> None:
    """Return once SIGTERM (``smolvmm stop``, a service manager) or SIGHUP arrives (appended to ``received``)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            if received is not None:
                received.append(signum)
            return


@asynccontextmanager
async def cancelled_by_signal() -> AsyncIterator[list[int]]:
    """Run the block until it ends or SIGTERM or SIGHUP cancels it (its ``with`` blocks clean up,
    a build's scratch directory goes); yields the list the signal is appended to: 128 + it is the
    command's exit status. Work in a worker thread ends its step first (it cannot be interrupted)."""
    received: list[int] = []
    async with anyio.create_task_group() as tg:

        async def cancel_on_signal() -> None:
            await until_signal(received)
            tg.cancel_scope.cancel()

        tg.start_soon(cancel_on_signal)
        yield received
        tg.cancel_scope.cancel()
