"""The minimal guest kernel against the Debian cloud kernel, natively: its recorded build time, the
sizes of both guests, and boot to the ready line in QEMU microvm under TCG (no KVM needed, so it runs
on a PVM host; compare the ratio, not the seconds; not niced: a starved QEMU measures the host).

    python bench/bench_kernel.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time

from common import machine_info, qemu_path, summary

from smolvmm.images.guest import GuestImage, default_guest, minimal_guest
from smolvmm.kernel.build import minimal_kernel

TIMEOUT = 300  # seconds a boot may take before the run fails (a TCG guest on a busy host is slow)


def boot_to_ready(qemu: str, guest: GuestImage) -> float:
    """Seconds from QEMU's start to the guest's ready line (microvm with ACPI, 2 vCPUs, 256 MiB, TCG on one
    thread: QEMU 7.2's multi-threaded TCG corrupts guests, BENCHMARKS.md "The nested machine")."""
    argv = [
        qemu,
        "-M",
        "microvm,acpi=on,rtc=off",
        "-accel",
        "tcg,thread=single",
        "-smp",
        "2",
        "-m",
        "256",
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        "stdio",
        "-device",
        "virtio-rng-device",
        "-kernel",
        str(guest.kernel),
        "-initrd",
        str(guest.initrd),
        "-append",
        guest.cmdline,
    ]
    began = time.perf_counter()
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as qemu_process:
        assert qemu_process.stdout is not None
        watchdog = threading.Timer(TIMEOUT, qemu_process.kill)
        watchdog.start()
        try:
            for line in qemu_process.stdout:
                if guest.ready_marker.encode() in line:
                    return time.perf_counter() - began
            raise RuntimeError(f"no {guest.ready_marker!r} from {guest.kernel} within {TIMEOUT} s")
        finally:
            watchdog.cancel()
            qemu_process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    qemu = qemu_path()
    if qemu is None:
        raise SystemExit("apt-get install qemu-system-x86")
    built = minimal_kernel()
    guests = {"cloud": default_guest(), "minimal": minimal_guest()}
    result: dict[str, object] = {
        "machine": machine_info(),
        "build": {"source": built.source, "seconds": built.seconds, "jobs": built.jobs},
    }
    boots: dict[str, list[float]] = {name: [] for name in guests}
    for _ in range(args.runs):  # alternated, so both kernels see the same host load
        for name, guest in guests.items():
            boots[name].append(boot_to_ready(qemu, guest))
    for name, guest in guests.items():
        result[name] = {
            "kernel_bytes": guest.kernel.stat().st_size,
            "initrd_bytes": guest.initrd.stat().st_size,
            "tcg_boot_to_ready_s": summary(boots[name]),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
