"""The embedding API on real KVM: concurrency, cancellation, cleanup, and the sandbox pool example."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from guests import GUEST_TIMEOUT, assert_clock_is_the_hosts, own_threads, shell

import smolvmm
from smolvmm import ExitReason, Machine
from smolvmm.devices.virtio.mmio import MmioTransport
from smolvmm.devices.virtio.rng import VirtioRng

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


async def answered_while_a_twin_ran(machine: Machine, answer: bytes, twin: Machine, command: str) -> bool:
    """Whether ``machine`` printed ``answer`` while its running ``twin`` ran ``command`` three times
    in a row: the twin's answers, not a clock, say how long a running guest had to answer."""
    answered = False

    async def watch() -> None:
        nonlocal answered
        await machine.console.wait_for(answer)
        answered = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        for _ in range(3):
            assert await shell(twin, command) == answer.decode()
        tg.cancel_scope.cancel()
    return answered


@pytest.mark.anyio
async def test_pause_resume_and_wait(bundle: Path) -> None:
    async with Machine.restore(bundle) as machine, Machine.restore(bundle) as twin:
        await machine.pause()
        await machine.console.send(b"echo after-pause-$((6 * 7))\n")
        assert not await answered_while_a_twin_ran(machine, b"after-pause-42", twin, "echo after-pause-$((6 * 7))")
        await machine.resume()
        await machine.console.wait_for(b"after-pause-42", GUEST_TIMEOUT)
        await machine.console.send(b"poweroff -f\n")
        assert (await machine.wait()).reason == ExitReason.POWEROFF


@pytest.mark.anyio
async def test_a_machine_restored_paused_runs_only_after_resume(bundle: Path) -> None:
    async with Machine.restore(bundle, paused=True) as machine, Machine.restore(bundle) as twin:
        await machine.console.send(b"echo after-$((40 + 2))\n")
        assert not await answered_while_a_twin_ran(machine, b"after-42", twin, "echo after-$((40 + 2))")
        await machine.resume()
        await machine.console.wait_for(b"after-42", GUEST_TIMEOUT)


@pytest.mark.anyio
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
        await assert_clock_is_the_hosts(machine)  # its wall clock caught up


@pytest.mark.anyio
async def test_errors_reach_the_caller_typed_and_unwrapped(bundle: Path) -> None:
    with pytest.raises(smolvmm.GuestTimeout, match="did not show"):
        async with Machine.restore(bundle) as machine:
            await machine.console.wait_for("never printed", timeout=0.5)
    with pytest.raises(smolvmm.BundleError):
        async with Machine.restore(bundle.with_suffix(".absent")):
            pass


@pytest.mark.anyio
async def test_a_failing_device_task_ends_only_its_machine_with_one_message(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve = MmioTransport.run

    async def failing(transport: MmioTransport) -> None:
        if isinstance(transport.device, VirtioRng):
            raise RuntimeError("injected fault")
        await serve(transport)

    threads, fds = own_threads(), sorted(os.listdir("/proc/self/fd"))
    async with Machine.restore(bundle) as healthy:
        monkeypatch.setattr(MmioTransport, "run", failing)
        async with Machine.restore(bundle) as broken:
            with anyio.fail_after(GUEST_TIMEOUT):
                ended = await broken.wait()
        monkeypatch.undo()
        assert ended.reason is ExitReason.CRASH
        assert "injected fault" in ended.detail and "VirtioRng" in ended.detail and "\n" not in ended.detail
        assert await shell(healthy, "echo still-running") == "still-running"
    assert own_threads() == threads
    assert sorted(os.listdir("/proc/self/fd")) == fds


def test_demo_builds_its_bundle_and_resumes_it(demo_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    bundle, result = demo_run
    assert result.returncode == 0, result.stderr
    assert re.search(r"hello from a resumed smolvmm guest: 2 vCPUs, kernel \S+-cloud-amd64", result.stdout)
    assert bundle.is_file()


def test_pool_example_runs_eight_clones_of_the_demo_bundle(
    demo_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    bundle, _ = demo_run
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), str(bundle), "8"], capture_output=True, text=True, timeout=GUEST_TIMEOUT * 2
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [[f"clone-{i}:", str(i * i)] for i in range(8)]
    assert len({line.split()[2] for line in lines}) == 8  # every clone drew its own UUID


def test_pool_example_fails_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "/nonexistent.smolmachine", "2"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.startswith("pool: cannot open /nonexistent.smolmachine") and result.stderr.count("\n") == 1
