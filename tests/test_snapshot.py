"""Snapshot and restore of the real default guest on real KVM (inside tools/nested-kvm on PVM hosts)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from guests import GUEST_TIMEOUT, assert_clock_is_the_hosts, shell

import smolformat
from smolvmm import Machine

pytestmark = [pytest.mark.kvm]


def test_cli_restore_answers_and_reports_timings(bundle: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "smolvmm", "run", "--timings", "--json", str(bundle)],
        input=b"echo restored-$((6*7))\npoweroff -f\n",
        capture_output=True,
        timeout=GUEST_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"restored-42" in result.stdout
    timings = re.search(rb'\{"phases_ms": \{.*\}\n\Z', result.stdout)  # the last line on stdout
    assert timings, result.stdout
    report = json.loads(timings.group(0))
    assert {"parse", "memory_map", "vm_vcpu_state", "devices", "first_kvm_run", "agent_sync"} <= set(
        report["phases_ms"]
    )
    # the bundle's working set, which build recorded, read in ahead of the guest: every page of it
    populated, of = map(int, re.fullmatch(r"(\d+) of (\d+) pages", report["prefetch"]).groups())
    assert populated == of > 0


@pytest.mark.anyio
async def test_clones_are_independent(bundle: Path) -> None:
    base_digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    async with Machine.restore(bundle) as first, Machine.restore(bundle) as second:
        uuids = [await shell(m, "cat /proc/sys/kernel/random/uuid") for m in (first, second)]
        assert uuids[0] != uuids[1]
        noise = [await shell(m, "head -c 16 /dev/urandom | od -An -tx1") for m in (first, second)]
        assert noise[0] != noise[1]
        for machine in (first, second):
            await assert_clock_is_the_hosts(machine)
            assert await shell(machine, "nproc") == "2"
            assert await shell(machine, "cat /mnt/hello.txt") == "hello from the base image"
        await shell(first, "echo written-by-first > /mnt/first.txt && sync")
        assert await shell(first, "cat /mnt/first.txt") == "written-by-first"
        assert "No such file" in await shell(second, "cat /mnt/first.txt 2>&1")
    async with Machine.restore(bundle) as later:
        assert "No such file" in await shell(later, "cat /mnt/first.txt 2>&1")
    assert hashlib.sha256(bundle.read_bytes()).hexdigest() == base_digest


@pytest.mark.anyio
async def test_snapshot_of_a_restored_machine(bundle: Path, tmp_path: Path) -> None:
    child = tmp_path / "child.smolmachine"
    grandchild = tmp_path / "grandchild.smolmachine"
    async with Machine.restore(bundle) as machine:
        await shell(machine, "echo generation-1 > /tmp/gen && echo on-disk > /mnt/gen.txt && sync")
        await machine.snapshot(child)
        assert await shell(machine, "cat /tmp/gen") == "generation-1"  # it carries on after saving
        phases = machine.snapshot_timings.phases
        assert list(phases) == [
            "agent_sync",
            "agent_scrubbed",
            "vcpus_parked",
            "devices_stopped",
            "state_and_disks_captured",
            "bundle_written",
            "resumed",
        ]
        assert list(phases.values()) == sorted(phases.values())
    async with Machine.restore(child) as machine:
        assert await shell(machine, "cat /tmp/gen /mnt/gen.txt") == "generation-1\r\non-disk"
        await shell(machine, "echo generation-2 >> /tmp/gen")
        await machine.snapshot(grandchild)
    async with Machine.restore(grandchild) as machine:
        assert await shell(machine, "cat /tmp/gen") == "generation-1\r\ngeneration-2"
        await assert_clock_is_the_hosts(machine)
    with smolformat.open_bundle(bundle) as parent, smolformat.open_bundle(child) as restored:
        assert restored.metadata.parent_digest == parent.digest
        for vcpu in (*parent.vcpus, *restored.vcpus):  # only the leaves KVM holds, each once
            leaves = [(entry.function, entry.index) for entry in vcpu.cpuid]
            assert len(leaves) == len(set(leaves)) and len(leaves) < 256


def test_run_save_on_sigusr1_keeps_a_changed_instance(bundle: Path, tmp_path: Path) -> None:
    saved = tmp_path / "changed.smolmachine"
    process = subprocess.Popen(
        [sys.executable, "-m", "smolvmm", "run", "--save", str(saved), str(bundle)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        process.stdin.write(b"echo changed-instance > /tmp/state; echo wrote-$((2+3))\n")
        process.stdin.flush()
        answer = b""
        deadline = time.monotonic() + GUEST_TIMEOUT
        while b"wrote-5" not in answer and time.monotonic() < deadline:
            answer += os.read(process.stdout.fileno(), 4096)
        assert b"wrote-5" in answer
        process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + GUEST_TIMEOUT
        while not saved.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)  # the message follows the rename
        process.stdin.write(b"poweroff -f\n")
        process.stdin.close()
        assert process.wait(GUEST_TIMEOUT) == 0
        assert b"saved " + str(saved).encode() in process.stderr.read()
    finally:
        process.kill()
    result = subprocess.run(
        [sys.executable, "-m", "smolvmm", str(saved)],
        input=b"cat /tmp/state\npoweroff -f\n",
        capture_output=True,
        timeout=GUEST_TIMEOUT,
    )
    assert result.returncode == 0 and b"changed-instance" in result.stdout
    with smolformat.open_bundle(bundle) as parent, smolformat.open_bundle(saved) as child:
        assert child.metadata.parent_digest == parent.digest


def test_a_bootable_bundle_cold_boots_with_its_own_kernel_and_disk(bundle: Path, tmp_path: Path) -> None:
    from smolvmm.images.disk import ext4_image

    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "hello.txt").write_text("hello from the saved disk\n")
    disk = ext4_image(tmp_path / "base.img", tmp_path / "files", size_mib=16)
    bootable = tmp_path / "bootable.smolmachine"
    build = subprocess.run(
        [sys.executable, "-m", "smolvmm", "build", "--bootable", "--json", "-o", str(bootable), "--disk", str(disk)],
        capture_output=True,
        text=True,
        timeout=GUEST_TIMEOUT,
    )
    assert build.returncode == 0, build.stderr
    built = json.loads(build.stdout)  # build --json: the bundle's path, digest, sizes and timings
    with smolformat.open_bundle(bootable) as saved:
        assert built["digest"] == saved.digest.hex() and built["path"] == str(bootable)
    assert built["sizes"]["file"] == bootable.stat().st_size and built["sizes"]["ram"]["logical"] == 256 << 20
    assert len(built["sizes"]["disks"]) == 1 and built["sizes"]["disks"][0]["logical"] == 16 << 20
    assert built["timings"]["ready"] > built["timings"]["boot"]["first_kvm_run"] > 0
    assert built["timings"]["save"]["bundle_written"] > 0
    script = "cat /mnt/hello.txt; echo booted-$((6 * 7)); poweroff -f\n"
    boot = subprocess.run(
        [sys.executable, "-m", "smolvmm", "boot", "--bundle", str(bootable)],
        input=script,
        capture_output=True,
        text=True,
        timeout=GUEST_TIMEOUT,
    )
    assert boot.returncode == 0, boot.stderr
    assert "smolvmm: guest ready" in boot.stdout  # printed by the guest's init: it booted afresh
    assert re.search(r"^hello from the saved disk\r?$", boot.stdout, re.M)
    assert re.search(r"^booted-42\r?$", boot.stdout, re.M)

    plain = subprocess.run(
        [sys.executable, "-m", "smolvmm", "boot", "--bundle", str(bundle)], capture_output=True, text=True
    )
    assert plain.returncode == 3  # a bundle that lacks what the command needs
    assert plain.stderr.splitlines()[-1].endswith("has no kernel to cold-boot (save it with `build --bootable`)")
