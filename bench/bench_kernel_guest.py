"""The minimal guest kernel against the Debian cloud kernel on KVM, in one run: cold boot to the
ready line (smolvmm's CLI, smolvmm's library, QEMU microvm booting the same kernel), the bundle a
booted guest saves to, and the RAM a resumed guest touches until it answers.

    python bench/bench_kernel_guest.py --out DIR [--runs 3]

Needs a /dev/kvm that runs standard guests; on a PVM host it runs itself inside
``tools/nested-kvm`` (both guests are built natively first). Writes ``kernel-guest.json`` into
``--out``. The two kernels are alternated in every measure so that both see the same host load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import anyio
from common import Console, guest_ram_rss_kib, machine_info, measured, qemu_argv, qemu_path, summary

import smolvmm
from smolvmm.images.guest import PREBUILT_MINIMAL_ENV, GuestImage, default_guest, minimal_guest
from smolvmm.kernel.build import minimal_kernel

SMOLVMM = [sys.executable, "-m", "smolvmm"]
KERNELS: dict[str, str | None] = {"cloud": None, "minimal": "minimal"}  # name -> MachineConfig.kernel
TIMEOUT = 600.0
SETTLE_S = 3.0  # a freshly booted guest goes idle before it is saved
ASK, ANSWER = b"echo R$((40+2))R\n", b"R42R"
RAM = 256 << 20


def config(kernel: str | None) -> smolvmm.MachineConfig:
    return smolvmm.MachineConfig(kernel=kernel, vcpus=2, memory=RAM)  # type: ignore[arg-type]


def cli_boot(kernel: str | None, marker: bytes) -> float:
    """Process start to the ready line, as ``smolvmm boot`` (interpreter start-up included)."""
    flags = ["--kernel", kernel] if kernel else []
    with Console([*SMOLVMM, "boot", "--cpus", "2", "--mem", "256M", *flags]) as vm:
        return vm.wait_for(marker, TIMEOUT)


async def api_boot(kernel: str | None, marker: str) -> float:
    """``Machine.boot`` to the ready line in a process that has imported smolvmm."""
    began = time.perf_counter()
    async with smolvmm.Machine.boot(config(kernel)) as machine:
        await machine.console.wait_for(marker, TIMEOUT)
        seconds = time.perf_counter() - began
        await machine.stop()
    return seconds


def qemu_boot(qemu: str, guest: GuestImage, monitor: Path) -> float:
    with Console(qemu_argv(qemu, guest.kernel, guest.initrd, guest.cmdline, monitor)) as vm:
        return vm.wait_for(guest.ready_marker.encode(), TIMEOUT)


async def save(kernel: str | None, marker: str, path: Path) -> dict[str, int]:
    async with smolvmm.Machine.boot(config(kernel)) as machine:
        await machine.console.wait_for(marker, TIMEOUT)
        await anyio.sleep(SETTLE_S)
        await machine.snapshot(path)
        await machine.stop()
    st = path.stat()
    return {"bytes": st.st_size, "allocated": st.st_blocks * 512}


async def resume(bundle: Path) -> tuple[float, int]:
    """Seconds from ``Machine.restore`` to the answer of an ``echo`` typed on the console, and the
    KiB of guest RAM resident then (pages the resumed guest read or wrote)."""
    began = time.perf_counter()
    async with smolvmm.Machine.restore(bundle) as machine:
        await machine.console.send(ASK)
        await machine.console.wait_for(ANSWER, TIMEOUT)
        seconds = time.perf_counter() - began
        regions = [(r.host_address, r.size) for r in machine._vm.memory.regions]  # noqa: SLF001 - a benchmark's view
        touched = guest_ram_rss_kib(regions)
        await machine.stop()
    return seconds, touched


def measure(runs: int, work: Path) -> dict[str, object]:
    guests = {"cloud": default_guest(), "minimal": minimal_guest()}
    qemu = qemu_path()
    result: dict[str, object] = {"machine": machine_info(), "runs": runs}
    series: dict[str, dict[str, list[float]]] = {name: {} for name in KERNELS}

    def add(name: str, key: str, value: float) -> None:
        series[name].setdefault(key, []).append(value)
        print(f"bench: {name} {key} {value:.3f}", file=sys.stderr, flush=True)

    for run in range(runs):
        for name, kernel in KERNELS.items():
            marker = guests[name].ready_marker
            add(name, "cli_boot_s", cli_boot(kernel, marker.encode()))
            add(name, "api_boot_s", anyio.run(api_boot, kernel, marker, backend="asyncio"))
            if qemu:
                add(name, "qemu_boot_s", qemu_boot(qemu, guests[name], work / f"{name}{run}.mon"))
    per_kernel: dict[str, dict[str, object]] = {}
    for name, kernel in KERNELS.items():
        bundle = work / f"{name}.smolmachine"
        per_kernel[name] = {
            "kernel_bytes": guests[name].kernel.stat().st_size,
            "initrd_bytes": guests[name].initrd.stat().st_size,
            "bundle": anyio.run(save, kernel, guests[name].ready_marker, bundle, backend="asyncio"),
        }
    for _ in range(runs):
        for name in KERNELS:
            seconds, kib = anyio.run(resume, work / f"{name}.smolmachine", backend="asyncio")
            add(name, "restore_answer_s", seconds)
            add(name, "resumed_ram_kib", kib)
    for name in KERNELS:
        per_kernel[name].update({key: summary(values) for key, values in series[name].items()})
    return result | per_kernel


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for kernel-guest.json")
    parser.add_argument("--runs", type=int, default=3, help="runs per measure and kernel (default 3)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    built, env = None, {}
    if os.environ.get("SMOLVMM_NESTED") != "1":  # the nested machine has no apt: looked up natively
        built = minimal_kernel()
        env[PREBUILT_MINIMAL_ENV] = str(minimal_guest().kernel.parent)
    result = measured(Path(__file__), args.out, "kernel-guest.json", env, lambda work: measure(args.runs, work))
    if built:
        result["build"] = {"source": built.source, "seconds": built.seconds, "jobs": built.jobs}
        (args.out / "kernel-guest.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
