"""Running a bundle built from an image: its command, with the image's Env, WorkingDir and User."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from smolvmm.agent.process import Process
from smolvmm.images.guestpaths import RUNAS
from smolvmm.monitor.machine import Machine
from smolvmm.oci.imageconfig import ImageConfig


@asynccontextmanager
async def image_process(
    machine: Machine, config: ImageConfig, command: list[str] | None, env: dict[str, str] | None = None
) -> AsyncIterator[Process]:
    """Start ``command`` (default: the image's Entrypoint + Cmd) in a restored image machine through
    its agent, with the image's Env (``env``, e.g. the clone's, wins), WorkingDir and User; yields
    the running ``Process``."""
    argv = config.command(command)
    if config.user:
        argv = [RUNAS, config.user, *argv]
    async with machine.process(argv, env=config.environment(env), cwd=config.workdir or None) as process:
        yield process
