"""Helpers for tests that drive a running guest: its shell, its clock, the threads a machine leaves."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import pytest

from smolvmm import GuestTimeout, Machine

GUEST_TIMEOUT = 180


def own_threads() -> list[threading.Thread]:
    """Threads other than the event loop's own pooled workers (trio and anyio keep idle ones)."""
    return [t for t in threading.enumerate() if not t.name.startswith(("Trio thread", "AnyIO worker"))]


async def shell(machine: Machine, command: str, timeout: float = GUEST_TIMEOUT) -> str:
    """Run ``command`` in the guest shell; returns its output (between unique markers)."""
    token = os.urandom(4).hex()
    # The quotes keep the markers out of the terminal's echo of the command line itself.
    await machine.console.send(
        f"echo BEGIN-{token[:4]}''{token[4:]}; {command}; echo END-{token[:4]}''{token[4:]}\n".encode()
    )
    text = (await machine.console.wait_for(re.compile(rf"END-{token}\r?\n".encode()), timeout)).decode()
    return text.split(f"BEGIN-{token}", 2)[-1].rsplit(f"END-{token}", 1)[0].strip()


async def shell_answers(machine: Machine, tries: int = 6, each: float = 30.0) -> None:
    """Wait until the guest's shell answers a command: what reaches a virtio console (hvc) before the
    shell has opened it is dropped, and the ready line comes just before the shell does."""
    for _ in range(tries - 1):
        try:
            await shell(machine, "true", timeout=each)
            return
        except GuestTimeout:
            continue
    await shell(machine, "true", timeout=each)


async def assert_clock_is_the_hosts(machine: Machine) -> None:
    """The guest's wall clock reads the host's time (to the second), however long the call takes."""
    before = int(time.time())
    guest = int(await shell(machine, "date +%s"))
    assert before - 1 <= guest <= int(time.time()) + 1


@dataclass
class Step:
    """What a bounded test is doing now (``bounded`` names it when the bound runs out)."""

    now: str = "starting"


@asynccontextmanager
async def bounded(*machines: Machine, seconds: float = GUEST_TIMEOUT * 2) -> AsyncIterator[Step]:
    """A test's own bound on the host's clock, inside its machines' blocks: a lost frame would
    otherwise wait for pytest-timeout's 900 s. Past it the test fails naming its step and what
    each guest's kernel said of its virtio devices (a broken ring says so there, not to the host)."""
    step = Step()
    try:
        with anyio.fail_after(seconds):
            yield step
    except TimeoutError as exc:
        if isinstance(exc, GuestTimeout):
            raise
        said = []
        for machine in machines:
            try:
                said.append(await shell(machine, "dmesg | grep virtio | tail -3", timeout=60))
            except GuestTimeout:
                said.append("(its shell did not answer)")
        pytest.fail(f"no end after {seconds} s, at: {step.now}; the guest kernels said: {said}")
