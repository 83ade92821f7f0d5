"""Cold boot of the real default guest on real KVM (inside tools/nested-kvm on PVM hosts)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import pytest

import smolvmm
from smolvmm import ExitReason, Machine, MachineConfig

pytestmark = [pytest.mark.kvm, pytest.mark.anyio]

GUEST_TIMEOUT = 180


def own_threads() -> list[threading.Thread]:
    """Threads other than the event loop's own pooled workers (trio and anyio keep idle ones)."""
    return [t for t in threading.enumerate() if not t.name.startswith(("Trio thread", "AnyIO worker"))]


async def shell(machine: Machine, command: str, timeout: float = GUEST_TIMEOUT) -> str:
    """Run ``command`` in the guest shell; returns its output (between unique markers)."""
    token = os.urandom(4).hex()
    # The quotes keep the markers out of the terminal's echo of the command line itself.
    await machine.console.send(f"echo BEGIN-{token[:4]}''{token[4:]}; {command}; echo END-{token[:4]}''{token[4:]}\n".encode())
    text = (await machine.console.wait_for(re.compile(rf"END-{token}\r?\n".encode()), timeout)).decode()
    return text.split(f"BEGIN-{token}", 2)[-1].rsplit(f"END-{token}", 1)[0].strip()


async def test_two_vcpus_boot_answer_and_power_off() -> None:
    ready_marker = smolvmm.default_guest().ready_marker
    threads = own_threads()
    fds = sorted(os.listdir("/proc/self/fd"))
    async with Machine.boot(MachineConfig(vcpus=2, memory=256 << 20)) as machine:
        await machine.console.wait_for(ready_marker, GUEST_TIMEOUT)
        assert await shell(machine, "nproc") == "2"
        mem_kib = int(re.search(r"MemTotal:\s+(\d+) kB", await shell(machine, "head -1 /proc/meminfo")).group(1))
        assert 200 * 1024 < mem_kib <= 256 * 1024
        # An MMIO read where no device lives reads all ones, and the guest carries on.
        assert await shell(machine, "devmem 0xd0f00000 32") == "0xFFFFFFFF"
        assert await shell(machine, "echo still-here") == "still-here"
        await machine.console.send(b"poweroff -f\n")
        end = await machine.wait()
    assert end.reason == ExitReason.POWEROFF
    assert own_threads() == threads
    assert sorted(os.listdir("/proc/self/fd")) == fds


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_guest_reboot_stops_the_machine() -> None:
    async with Machine.boot(MachineConfig()) as machine:
        await machine.console.wait_for(smolvmm.default_guest().ready_marker, GUEST_TIMEOUT)
        await machine.console.send(b"reboot -f\n")
        end = await machine.wait()
    assert end.reason == ExitReason.REBOOT


def test_cli_boot_with_piped_commands() -> None:
    script = "nproc\nhead -1 /proc/meminfo\npoweroff -f\n"
    result = subprocess.run(
        [sys.executable, "-m", "smolvmm", "boot", "--cpus", "2", "--mem", "256M"],
        input=script.encode(), capture_output=True, timeout=GUEST_TIMEOUT,
    )
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert re.search(r"^2\r?$", out, re.M)
    assert re.search(r"MemTotal:\s+2\d{5} kB", out)
