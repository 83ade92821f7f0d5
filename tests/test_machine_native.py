"""Machine lifecycle on this host's own /dev/kvm, with no guest progress needed.

On PVM hosts the demo guest never gets far (it triple-faults in early boot), so these tests
check only what the monitor does: cancellation, cleanup, several machines in one event loop.
"""

from __future__ import annotations

import os

import anyio
import pytest
from guests import own_threads

from smolvmm import ExitReason, Machine, MachineConfig

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.kvm(linux_guest=False),
]


async def test_cancelling_the_enclosing_scope_stops_every_machine_promptly() -> None:
    threads, fds = own_threads(), sorted(os.listdir("/proc/self/fd"))
    machines: list[Machine] = []
    with anyio.move_on_after(1) as scope:
        async with Machine.boot(MachineConfig(vcpus=2, memory=128 << 20)) as first:
            machines.append(first)
            async with Machine.boot(MachineConfig(memory=128 << 20)) as second:
                machines.append(second)
                await anyio.sleep_forever()
    assert scope.cancelled_caught
    # Leaving the blocks stopped both machines: their threads are joined and their fds closed
    # before anything waits for them.
    assert own_threads() == threads
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert [(await machine.wait()).reason for machine in machines] == [ExitReason.STOPPED, ExitReason.STOPPED]


async def test_an_error_in_the_block_reaches_the_caller_as_itself() -> None:
    with pytest.raises(KeyError, match="from the caller"):
        async with Machine.boot(MachineConfig(memory=128 << 20)):
            raise KeyError("from the caller")
