"""Running commands in an image guest over its console (until the agent's exec channel serves them).

The image guest's second stage (images/imageroot.py) reads one line at a time from the
console with echo off and evaluates it. A command travels as one base64 line (so quoting,
newlines and terminal control characters cannot break it) that runs it with an exact
environment and working directory, stdin from /dev/null, then prints a marker with a
random token and the exit status; everything printed before the marker is the output.
"""

from __future__ import annotations

import base64
import re
import secrets
import shlex
from collections.abc import Callable

import anyio

from smolvmm.errors import ConfigError, GuestError
from smolvmm.images.guestpaths import BUSYBOX, RUNAS
from smolvmm.monitor.machine import Machine

MAX_LINE = 3500  # a tty's canonical line holds 4095 bytes
_SHELL = f'S=/bin/sh; [ -x "$S" ] || S="{BUSYBOX} sh"'


def _line(script: str) -> bytes:
    encoded = base64.b64encode(script.encode()).decode()
    line = f'eval "$({BUSYBOX} echo {encoded} | {BUSYBOX} base64 -d)"\n'
    if len(line) > MAX_LINE:
        raise ConfigError(f"the command is too long for the console channel ({len(script)} bytes)")
    return line.encode()


def command_script(argv: list[str], env: dict[str, str], cwd: str, user: str = "", shell: bool = False) -> str:
    """The shell text that runs ``argv`` (or, with ``shell``, the script ``argv[0]`` in the image's
    /bin/sh, busybox's when it has none) with exactly ``env`` in ``cwd``, as ``user`` (the image's
    User syntax) when given."""
    assignments = " ".join(shlex.quote(f"{name}={value}") for name, value in env.items())
    cd = f"cd {shlex.quote(cwd)} && " if cwd else ""
    runas = f"{RUNAS} {shlex.quote(user)} " if user else ""
    if shell:
        return f"{_SHELL}; ({cd}exec {BUSYBOX} env -i {assignments} {runas}$S -c {shlex.quote(argv[0])}) </dev/null"
    return f"({cd}exec {BUSYBOX} env -i {assignments} {runas}{shlex.join(argv)}) </dev/null"


async def console_run(
    machine: Machine, script: str, output: Callable[[bytes], None] | None = None, timeout: float | None = None
) -> int:
    """Run ``script`` (shell text) on the image guest's console; stream what it prints to
    ``output`` (``\\r\\n`` turned into ``\\n``) and return its exit status."""
    token = secrets.token_hex(8)
    marker = re.compile(rb"\r?\n?__smolvmm_" + token.encode() + rb"__ (\d+)\r?\n")
    await machine.console.send(_line(f'{script}; s=$?; echo; echo "__smolvmm_{token}__ $s"'))
    pending = b""
    with anyio.fail_after(timeout):
        while True:
            try:
                pending += await machine.console.receive()
            except anyio.EndOfStream:
                raise GuestError("the machine stopped while a command was running") from None
            pending = pending.replace(b"\r\n", b"\n")
            found = marker.search(pending)
            if found:
                if output is not None and found.start():
                    output(pending[: found.start()])
                return int(found.group(1))
            keep = len(token) + 32  # the marker may be split across reads
            if output is not None and len(pending) > keep:
                output(pending[:-keep])
                pending = pending[-keep:]
