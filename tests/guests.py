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

from smolvmm import GuestError, GuestTimeout, Machine
from smolvmm.errors import unwrapped_errors

GUEST_TIMEOUT = 180
BROKEN_RING = re.compile(r"virtio\w* virtio\d+: [\w.-]+:id \d+ (?:is not a head!|out of range)")
"""What a guest kernel says when it reads a used ring entry the device never wrote, and stops using
that queue: seen only nested, where the guest read a used index other than the one in its memory
(the monitor's writes checked, BENCHMARKS.md, "The exec streams hang"). It prints it on its serial
console (``bounded`` watches there), in ``dmesg`` (``virtio_said`` asks there) and in its log buffer
in guest RAM (``broken_ring_in_ram``), where it stays when no console can carry it."""


def own_threads() -> list[threading.Thread]:
    """Threads other than the event loop's own pooled workers (trio and anyio keep idle ones)."""
    return [t for t in threading.enumerate() if not t.name.startswith(("Trio thread", "AnyIO worker"))]


async def shell(machine: Machine, command: str, timeout: float = GUEST_TIMEOUT, *, explain: bool = True) -> str:
    """Run ``command`` in the guest shell; returns its output (between unique markers). Past
    ``timeout`` the GuestTimeout carries what the guest's kernel said of its virtio devices, asked
    through its agent (the shell's console may be the broken one); not with ``explain=False``."""
    token = os.urandom(4).hex()
    # The quotes keep the markers out of the terminal's echo of the command line itself.
    await machine.console.send(
        f"echo BEGIN-{token[:4]}''{token[4:]}; {command}; echo END-{token[:4]}''{token[4:]}\n".encode()
    )
    try:
        text = (await machine.console.wait_for(re.compile(rf"END-{token}\r?\n".encode()), timeout)).decode()
    except GuestTimeout as exc:
        if not explain:
            raise
        said = await virtio_said(machine, shell_first=False)
        raise GuestTimeout(f"{exc}; the guest's kernel said: {said}") from None
    return text.split(f"BEGIN-{token}", 2)[-1].rsplit(f"END-{token}", 1)[0].strip()


async def shell_answers(machine: Machine, tries: int = 6, each: float = 30.0) -> None:
    """Wait until the guest's shell answers a command: what reaches a virtio console (hvc) before the
    shell has opened it is dropped, and the ready line comes just before the shell does. If it never
    does, the failure carries what the guest's kernel said of its virtio devices (through its agent)."""
    for _ in range(tries):
        try:
            await shell(machine, "true", timeout=each, explain=False)
            return
        except GuestTimeout:
            continue
    said = await virtio_said(machine, shell_first=False)
    raise GuestTimeout(f"the guest's shell did not answer within {tries * each:g} s; its kernel said: {said}")


async def virtio_said(machine: Machine, shell_first: bool = True) -> str:
    """The guest kernel's last lines on its virtio devices (where a broken ring says so, not to the
    host): through its shell, else through its agent, as either console may be the broken one."""
    command = "dmesg | grep virtio | tail -3"
    if shell_first:
        try:
            return await shell(machine, command, timeout=60, explain=False)
        except GuestTimeout:
            pass
    silent = "(its shell did not answer, nor its agent)"
    with anyio.move_on_after(60):
        try:
            said = (await machine.exec(command, timeout=50)).stdout.decode(errors="replace").strip()
            return said or "(nothing on virtio)"
        except GuestError as exc:
            silent = f"(its shell did not answer, nor its agent: {exc})"
    found = broken_ring_in_ram(machine)
    return f"{silent}; its kernel's log in its RAM holds: {found}" if found else silent


def broken_ring_in_ram(machine: Machine) -> str | None:
    """The kernel's broken-ring line (``BROKEN_RING``) if its log buffer in guest RAM holds one.

    A guest whose broken ring is its console's own (``console=hvc0``) never shows it: the driver
    reports the ring while it holds the port's output lock with interrupts off, and printing that
    report to the console waits for the same lock, so the guest deadlocks, shell and agent with
    it (BENCHMARKS.md, "The silent hvc0 shell"). The log record is written before any console
    prints it, so guest RAM still holds the line; a search of a few hundred MiB takes ~0.1 s
    natively."""
    memory = machine._vm.memory  # the test's own look at the guest: no API exposes guest RAM
    line = re.compile(BROKEN_RING.pattern.encode())
    for index in range(len(memory.regions)):
        if found := line.search(memory.region_view(index)):
            return found.group().decode(errors="replace")
    return None


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
    each guest's kernel said of its virtio devices (a broken ring says so there, not to the host);
    a guest that says on its console that it found a ring broken ends the test at once, the same way."""
    step = Step()
    broken: list[str] = []
    try:
        with anyio.fail_after(seconds) as scope, unwrapped_errors():
            async with anyio.create_task_group() as watch:
                watch.start_soon(_watch_rings, machines, broken, watch.cancel_scope)
                yield step
                watch.cancel_scope.cancel()
    except BaseException as exc:
        # The watcher's cancel may end the step in any error (a call torn down half-way): the
        # broken ring is the cause, and its line is what the nested plugin retries on.
        if broken:
            pytest.fail(f"a guest found a virtio ring broken, at: {step.now}; the guest kernels said: {broken}")
        if not isinstance(exc, TimeoutError) or isinstance(exc, GuestTimeout):
            raise
        said = [await virtio_said(machine) for machine in machines]
        ended = f"no end after {seconds} s" if scope.cancel_called else "a wait of its own ran out"
        pytest.fail(f"{ended}, at: {step.now}; the guest kernels said: {said}")
    if broken:
        pytest.fail(f"a guest found a virtio ring broken, at: {step.now}; the guest kernels said: {broken}")


async def _watch_rings(machines: tuple[Machine, ...], broken: list[str], scope: anyio.CancelScope) -> None:
    """Every second, look for a broken ring in what each guest printed; if one is, cancel ``scope``."""
    while True:
        for machine in machines:
            found = BROKEN_RING.search(machine.console.recent().decode(errors="replace"))
            if found:
                broken.append(found.group())
                scope.cancel()
                return
        await anyio.sleep(1)
