"""Cold boot of the real default guest on real KVM (inside tools/nested-kvm on PVM hosts)."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import termios
import time

import pytest
from guests import GUEST_TIMEOUT, own_threads, shell

from smolvmm import ExitReason, Machine, MachineConfig
from smolvmm.arch.x86_64.cpuid import host_brand
from smolvmm.images.guest import default_guest

pytestmark = [pytest.mark.kvm, pytest.mark.anyio]


async def test_two_vcpus_boot_answer_and_power_off() -> None:
    ready_marker = default_guest().ready_marker
    threads = own_threads()
    fds = sorted(os.listdir("/proc/self/fd"))
    async with Machine.boot(MachineConfig(vcpus=2, memory=256 << 20)) as machine:
        await machine.console.wait_for(ready_marker, GUEST_TIMEOUT)
        assert await shell(machine, "nproc") == "2"
        mem_kib = int(re.search(r"MemTotal:\s+(\d+) kB", await shell(machine, "head -1 /proc/meminfo")).group(1))
        assert 200 * 1024 < mem_kib <= 256 * 1024
        # An MMIO read where no device lives reads all ones, and the guest carries on.
        assert await shell(machine, "devmem 0xd0f00000 32") == "0xFFFFFFFF"
        # Each vCPU has its own APIC id, and the guest keeps time with kvmclock.
        assert await shell(machine, "grep '^apicid' /proc/cpuinfo | sed 's/[[:space:]]//g'") == "apicid:0\r\napicid:1"
        # Both vCPUs share the last-level cache (the guest completes block requests and wakes tasks
        # across them without an IPI each) and each has its own first-level ones.
        caches = "/sys/devices/system/cpu/cpu0/cache"
        assert await shell(machine, f"cat $(ls -d {caches}/index* | tail -1)/shared_cpu_list") == "0-1"
        assert await shell(machine, f"cat {caches}/index0/shared_cpu_list") == "0"
        if host_brand():  # the host's processor name, which KVM does not pass through
            assert await shell(machine, "grep -m1 'model name' /proc/cpuinfo") == f"model name\t: {host_brand()}"
        clocksource = "/sys/devices/system/clocksource/clocksource0/current_clocksource"
        assert await shell(machine, f"cat {clocksource}") == "kvm-clock"
        assert await shell(machine, "echo still-here") == "still-here"
        await machine.console.send(b"poweroff -f\n")
        end = await machine.wait()
    assert end.reason == ExitReason.POWEROFF
    assert own_threads() == threads
    assert sorted(os.listdir("/proc/self/fd")) == fds


async def test_guest_reboot_stops_the_machine() -> None:
    async with Machine.boot(MachineConfig()) as machine:
        await machine.console.wait_for(default_guest().ready_marker, GUEST_TIMEOUT)
        await machine.console.send(b"reboot -f\n")
        end = await machine.wait()
    assert end.reason == ExitReason.REBOOT


def test_cli_boot_with_piped_commands() -> None:
    # stdin ends long before the guest has run the last line: EOF must not stop it.
    script = "nproc\nhead -1 /proc/meminfo\nsleep 2; echo after-$((6 * 7)); poweroff -f\n"
    result = subprocess.run(
        [sys.executable, "-m", "smolvmm", "boot", "--cpus", "2", "--mem", "256M"],
        input=script.encode(),
        capture_output=True,
        timeout=GUEST_TIMEOUT,
    )
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert re.search(r"^2\r?$", out, re.M)
    assert re.search(r"MemTotal:\s+2\d{5} kB", out)
    assert re.search(r"^after-42\r?$", out, re.M)


def test_cli_boot_on_a_terminal_is_raw_and_ctrl_bracket_stops_it() -> None:
    controller, terminal = pty.openpty()
    before = termios.tcgetattr(terminal)
    process = subprocess.Popen(
        [sys.executable, "-m", "smolvmm", "boot"], stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True
    )
    try:
        seen = read_until(controller, default_guest().ready_marker.encode())
        assert b"press Ctrl-] to stop" in seen
        os.write(controller, b"echo typed-$((6 * 7))\r")  # raw mode: a bare CR reaches the guest as Enter
        read_until(controller, b"typed-42")
        os.write(controller, b"\x1d")
        assert process.wait(timeout=30) == 0
        assert termios.tcgetattr(terminal) == before  # the terminal is back as it was
    finally:
        process.kill()
        os.close(controller)
        os.close(terminal)


def read_until(fd: int, wanted: bytes, timeout: float = GUEST_TIMEOUT) -> bytes:
    """What ``fd`` gives until ``wanted`` has appeared (fails after ``timeout`` seconds)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no {wanted!r} within {timeout} s; got {seen[-500:]!r}"
        seen += os.read(fd, 4096)
    return seen
