"""Exec, files, env and secrets through the guest agent, in real guests (KVM, nested here).

One clone of the session bundle serves each backend's tests in order; the tests that need
their own machines (clones at once, secrets, a hostile agent) restore them themselves.
"""

import hashlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import smolvmm

pytestmark = [pytest.mark.kvm, pytest.mark.anyio]


async def test_exec_basics(bundle: Path, anyio_backend: str) -> None:
    async with smolvmm.Machine.restore(bundle, env={"GREETING": "hello"}, hostname="clone-a") as machine:
        for code in (0, 1, 42):
            result = await machine.exec(["sh", "-c", f"exit {code}"])
            assert result.exit_code == code and result.signal is None
        result = await machine.exec("echo out; echo err >&2; exit 3")
        assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
        killed = await machine.exec("kill -USR1 $$")
        assert (killed.exit_code, killed.signal) == (128 + signal.SIGUSR1, signal.SIGUSR1)
        assert (await machine.exec(["cat"], stdin=b"abc\0def")).stdout == b"abc\0def"
        assert (await machine.exec("echo $GREETING $EXTRA", env={"EXTRA": "x"})).stdout == b"hello x\n"
        assert (await machine.exec(["hostname"])).stdout == b"clone-a\n"
        assert (await machine.exec(["pwd"], cwd="/proc")).stdout == b"/proc\n"
        missing = await machine.exec(["no-such-command"])
        assert missing.exit_code == 127 and b"no-such-command" in missing.stderr
