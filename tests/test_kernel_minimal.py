"""The minimal guest kernel (``smolvmm kernel build``) running the demo guest's userland, no modules,
on real KVM (inside tools/nested-kvm on PVM hosts): boot, devices, poweroff, snapshot, restore, reboot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import oci_images
import pytest
from guests import GUEST_TIMEOUT, assert_clock_is_the_hosts, shell
from nested_plugin import prepare_on_host

from smolvmm import MINIMAL_KERNEL, DiskConfig, ExitReason, Machine, MachineConfig
from smolvmm.images.disk import ext4_image
from smolvmm.images.guest import PREBUILT_MINIMAL_ENV, READY_MARKER, minimal_guest
from smolvmm.images.imageroot import PREBUILT_MINIMAL_IMAGE_ENV, image_guest

pytestmark = [pytest.mark.kvm]


def _build_on_the_host() -> dict[str, str]:
    """The kernel and its initramfs (the demo guest's, the image guest's) and the test image,
    built on the host for the nested machine (a cold cache: minutes)."""
    oci_images.base_disk()
    return {
        PREBUILT_MINIMAL_ENV: str(minimal_guest().kernel.parent),
        PREBUILT_MINIMAL_IMAGE_ENV: str(image_guest(minimal=True).kernel.parent),
    }


prepare_on_host(_build_on_the_host)


def test_cli_boot_minimal_answers_and_powers_off() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "smolvmm", "boot", "--kernel", "minimal", "--cpus", "2", "--mem", "256M"],
        input=b"echo up-$((6*7))\npoweroff -f\n",
        capture_output=True,
        timeout=GUEST_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"up-42" in result.stdout


@pytest.mark.anyio
async def test_minimal_guest_devices_snapshot_restore_and_reboot(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "hello.txt").write_text("hello from the base image\n")
    disk = ext4_image(tmp_path / "base.img", tmp_path / "files", size_mib=32)
    config = MachineConfig(kernel=MINIMAL_KERNEL, vcpus=2, memory=256 << 20, disks=(DiskConfig(disk),))
    bundle = tmp_path / "minimal.smolmachine"
    async with Machine.boot(config) as machine:
        await machine.console.wait_for(READY_MARKER, GUEST_TIMEOUT)
        assert await shell(machine, "nproc") == "2"
        assert (
            await shell(machine, "cat /sys/devices/system/clocksource/clocksource0/current_clocksource") == "kvm-clock"
        )
        assert await shell(machine, "cat /mnt/hello.txt") == "hello from the base image"  # virtio-blk, ext4
        assert await shell(machine, "cat /sys/class/misc/hw_random/rng_current") == "virtio_rng.0"
        assert await shell(machine, "test -e /proc/modules || echo built-in") == "built-in"  # no module support
        await machine.snapshot(bundle)
        await machine.console.send(b"poweroff -f\n")
        assert (await machine.wait()).reason == ExitReason.POWEROFF
    async with Machine.restore(bundle) as restored:
        assert await shell(restored, "echo restored-$((6*7))") == "restored-42"
        assert await shell(restored, "nproc") == "2"
        await assert_clock_is_the_hosts(restored)  # the agent, on its virtio console, set it on resume
        await restored.console.send(b"reboot -f\n")  # reboot=k: the i8042 reset line, with no i8042 driver
        assert (await restored.wait()).reason == ExitReason.REBOOT


def test_a_container_image_boots_on_the_minimal_kernel(tmp_path: Path) -> None:
    bundle = tmp_path / "app.smolmachine"
    source = f"oci:{oci_images.oci_layout()}:{oci_images.TAG}"
    smolvmm = [sys.executable, "-m", "smolvmm"]
    built = subprocess.run(
        [*smolvmm, "build", "--image", source, "--kernel", "minimal", "-o", str(bundle)],
        capture_output=True,
        text=True,
        timeout=900,  # as the image tests': a build boots and saves the image guest
        stdin=subprocess.DEVNULL,
    )
    assert built.returncode == 0, built.stderr
    script = "import os; print(6*7, os.getcwd(), os.path.exists('/proc/modules'))"
    ran = subprocess.run(
        [*smolvmm, "run", str(bundle), "--", "python3", "-c", script],
        capture_output=True,
        text=True,
        timeout=GUEST_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    bundle.unlink()  # ~300 MB: the nested machine's files live in its RAM
    # No /proc/modules: the kernel has no module support, so this is the minimal one.
    assert (ran.returncode, ran.stdout) == (0, f"42 {oci_images.WORKDIR} False\n"), ran.stderr
