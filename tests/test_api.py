"""The embedding API on real KVM: concurrency, cancellation, cleanup, and the sandbox pool example."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from smolvmm import ExitReason, Machine
from test_boot import GUEST_TIMEOUT, own_threads, shell

pytestmark = [pytest.mark.kvm]
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pool.py"


@pytest.mark.anyio
async def test_cancelling_the_enclosing_scope_stops_machines_and_frees_everything(bundle: Path) -> None:
    threads, fds = own_threads(), sorted(os.listdir("/proc/self/fd"))
    machines: list[Machine] = []
    with anyio.move_on_after(GUEST_TIMEOUT) as scope:
        async with Machine.restore(bundle) as first, Machine.restore(bundle) as second:
            machines += [first, second]
            assert await shell(first, "echo one") == "one"
            assert await shell(second, "echo two") == "two"
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert [(await m.wait()).reason for m in machines] == [ExitReason.STOPPED, ExitReason.STOPPED]
    assert own_threads() == threads
    assert sorted(os.listdir("/proc/self/fd")) == fds


@pytest.mark.anyio
async def test_pause_resume_and_wait(bundle: Path) -> None:
    async with Machine.restore(bundle) as machine:
        await machine.pause()
        await machine.console.send(b"echo after-pause\n")
        with anyio.move_on_after(2):
            await machine.console.wait_for(b"after-pause\r\n" + b"after-pause")  # nothing runs while paused
            pytest.fail("the guest answered while paused")
        await machine.resume()
        await machine.console.wait_for(re.compile(rb"\nafter-pause\r?\n"), GUEST_TIMEOUT)
        await machine.console.send(b"poweroff -f\n")
        assert (await machine.wait()).reason == ExitReason.POWEROFF


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_long_pause_is_invisible_to_the_guest(bundle: Path) -> None:
    async with Machine.restore(bundle) as machine:
        # Processes starting and exiting keep RCU grace periods in flight, as on a busy guest.
        await shell(machine, "(while :; do cat /proc/uptime > /dev/null; done) & echo started")
        await machine.pause()
        await anyio.sleep(25)  # past the guest kernel's RCU stall (21 s) and soft-lockup (20 s) limits
        await machine.resume()
        await anyio.sleep(2)
        await shell(machine, "kill %1; echo stopped")
        assert await shell(machine, "dmesg | grep -c -e 'rcu.*stall' -e 'soft lockup'") == "0"
        assert abs(int(await shell(machine, "date +%s")) - time.time()) < 2  # its wall clock caught up


def test_pool_example_runs_eight_clones(bundle: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), str(bundle), "8"], capture_output=True, text=True, timeout=GUEST_TIMEOUT * 2
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [[f"clone-{i}:", str(i * i)] for i in range(8)]
    assert len({line.split()[2] for line in lines}) == 8  # every clone drew its own UUID
