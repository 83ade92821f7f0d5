"""A bundle's restore working set (spec §9.1): recorded by a trial resume, then stored in the bundle.

``build`` saves a machine, then resumes the bundle it wrote once, as a clone would be: the clone
runs until its guest agent has answered one command (what ``run`` and ``exec`` do first), and
every page of the bundle's stored RAM that the host had mapped for it by then is the working
set. The bundle is written again with that set (same contents, one more section), so that each
later restore populates those pages while its vCPUs start instead of faulting them in one by one.

The kernel maps more than a fault asks for: read-ahead brings a touched page's neighbours into
the page cache, and fault-around maps every neighbour already cached (16 pages by default). So
the trial first drops the bundle's pages from the page cache and turns read-ahead off: each
fault then maps little more than its own page. (Where the bundle lives in memory, tmpfs, its pages
cannot be dropped and the set is that superset.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable

import anyio

import smolformat
from smolvmm.config import NetConfig, open_bundle
from smolvmm.errors import AgentError, SmolvmmError
from smolvmm.monitor.machine import Machine

TRIAL_TIMEOUT = 120.0
"""Seconds the trial clone's agent has to answer (a nested machine is slow)."""


async def record(path: str | os.PathLike[str], networks: tuple[NetConfig, ...] = ()) -> list[tuple[int, int]]:
    """The (gpa, pages) runs of stored guest RAM that a clone of raw bundle ``path`` (its network
    cards on ``networks``, their forwards left out) touches until its agent answers one command.
    SmolvmmError if the bundle's RAM is not mapped (zstd) or the clone has no agent to answer."""
    with open_bundle(path) as bundle:
        if bundle.memory_encoding != "raw":
            raise SmolvmmError("its RAM is zstd-compressed: a restore decodes all of it, and reads nothing ahead")
        stored = [(extent.guest_phys_addr, extent.length) for extent in bundle.memory_extents()]
    with open(path, "rb") as file, contextlib.suppress(OSError):  # best effort: tmpfs keeps its pages
        os.fsync(file.fileno())
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    wires = tuple(dataclasses.replace(network, forwards=()) for network in networks)
    async with Machine.restore(path, paused=True, networks=wires) as machine:
        machine._read_at_random()
        await machine.resume()
        try:
            with anyio.fail_after(TRIAL_TIMEOUT):
                await machine.exec(["true"])
        except TimeoutError:
            raise AgentError(f"the trial clone's agent did not answer within {TRIAL_TIMEOUT:g} s") from None
        return machine._touched(stored)


async def record_working_set(
    path: str | os.PathLike[str],
    progress: Callable[[str], None] | None = None,
    *,
    networks: tuple[NetConfig, ...] = (),
) -> bytes | None:
    """Record raw bundle ``path``'s restore working set with a trial resume and write the bundle
    again with it (atomically); returns the new bundle digest, or None, having said why through
    ``progress``, when none could be recorded (the bundle is then as it was: a working set only
    speeds restores up). ``networks``: the wires the machine was built with (a TAP card needs its
    device again; forwards are left out)."""
    say = progress or (lambda text: None)
    say("recording the working set of a restore (a trial resume)")
    try:
        runs = await record(path, networks)
    except SmolvmmError as exc:
        say(f"note: no working set recorded: {exc}")
        return None
    ranges = [{"address": gpa, "pages": pages} for gpa, pages in runs]
    return await anyio.to_thread.run_sync(smolformat.set_working_set, path, ranges)
