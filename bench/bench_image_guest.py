"""A container image's machine, in one run: ``build`` time, restore to the first answer of a Python
command against a cold boot of the same image (smolvmm, and QEMU microvm booting the same kernel,
initramfs and disk), and a pre-warmed Python with heavy imports against importing them cold.

    python bench/bench_image_guest.py --out DIR [--runs 3]

The image is the test suite's Debian bookworm minbase + python3 OCI layout (``tests/oci_images.py``,
made natively on first use). Needs a /dev/kvm that runs standard guests; on a PVM host it runs
itself inside ``tools/nested-kvm``. Writes ``image-guest.json`` into ``--out``. Every answer is
``R42R``, printed by ``python3`` in the guest; smolvmm's cold boot and restore are CLI processes
(interpreter start-up included in both), the warm and cold imports are ``Machine.exec`` calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
from common import Console, machine_info, measured, qemu_argv, qemu_path, summary

import smolvmm
from smolvmm.config import bundle_disk, open_bundle
from smolvmm.images.imageroot import PREBUILT_IMAGE_ENV, image_guest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import oci_images  # noqa: E402

SMOLVMM = [sys.executable, "-m", "smolvmm"]
SHAPE = ["--cpus", "2", "--mem", "256M"]  # as QEMU's (bench/common.py qemu_argv)
TIMEOUT = 600.0
ANSWER = b"R42R"
PRINT = ["python3", "-c", "print('R%sR' % (6*7))"]
HEAVY = (
    "asyncio, concurrent.futures, decimal, email.mime.multipart, http.server, json, logging, "
    "multiprocessing, pydoc, tarfile, unittest, urllib.request, xml.dom.minidom, zipfile"
)
# A Python process left running by the build's warm-up: the heavy modules imported, it answers
# every line written to /tmp/ask with R42R on /tmp/answer (both FIFOs).
WARM = (
    f"python3 -c \"import os, {HEAVY}; os.mkfifo('/tmp/answer'); os.mkfifo('/tmp/ask'); "
    "[(open('/tmp/ask').read(), open('/tmp/answer', 'w').write('R%sR' % (6*7))) for _ in iter(int, 1)]\" &"
)
ASK_WARM = ["sh", "-c", "echo > /tmp/ask; cat /tmp/answer"]
IMPORT_COLD = ["python3", "-c", f"import {HEAVY}; print('R%sR' % (6*7))"]


def build(layout: Path, output: Path, *extra: str) -> float:
    began = time.perf_counter()
    argv = [*SMOLVMM, "build", "--image", f"oci:{layout}:{oci_images.TAG}", "-o", str(output), *extra]
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT)
    return time.perf_counter() - began


def cli_restore(bundle: Path) -> float:
    """Process start to the answer, as ``smolvmm run BUNDLE -- python3 -c ...``."""
    with Console([*SMOLVMM, "run", str(bundle), "--", *PRINT]) as vm:
        return vm.wait_for(ANSWER, TIMEOUT)


def console_boot(argv: list[str], ready: bytes) -> float:
    """Process start to the answer of the command typed once the image's ready line is out."""
    with Console(argv) as vm:
        vm.wait_for(ready, TIMEOUT)
        vm.send(f'{" ".join(PRINT[:2])} "{PRINT[2]}"\n')
        return vm.wait_for(ANSWER, TIMEOUT)


async def library_restore(bundle: Path) -> float:
    """``Machine.restore`` to the answer of ``python3 -c ...`` run through ``Machine.exec``."""
    began = time.perf_counter()
    async with smolvmm.Machine.restore(bundle) as machine:
        result = await machine.exec(PRINT, timeout=TIMEOUT)
        answered = time.perf_counter()
        if ANSWER not in result.stdout:
            raise RuntimeError(f"{PRINT}: {result}")
        await machine.stop()
    return answered - began


async def exec_after_restore(bundle: Path, argv: list[str]) -> tuple[float, float]:
    """Seconds from ``Machine.restore`` to ``argv``'s answer, and of that the exec alone."""
    began = time.perf_counter()
    async with smolvmm.Machine.restore(bundle) as machine:
        await machine.exec(["true"])
        asked = time.perf_counter()
        result = await machine.exec(argv, timeout=TIMEOUT)
        answered = time.perf_counter()
        if ANSWER not in result.stdout:
            raise RuntimeError(f"{argv}: {result}")
        await machine.stop()
    return answered - began, answered - asked


def measure(runs: int, work: Path) -> dict[str, object]:
    layout = oci_images.oci_layout()
    guest = image_guest()
    qemu = qemu_path()
    plain, warm = work / "plain.smolmachine", work / "warm.smolmachine"
    cache = work / "cache"  # an empty cache: the build converts the image's layers to a disk
    os.environ["XDG_CACHE_HOME"] = str(cache)
    result: dict[str, object] = {"machine": machine_info(), "runs": runs, "heavy_imports": HEAVY}
    result["build_s"] = build(layout, plain, *SHAPE)
    result["build_warm_s"] = build(layout, warm, *SHAPE, "--warm", WARM, "--ready-exec", "test -p /tmp/ask")
    result["bundle_bytes"] = plain.stat().st_size
    with open_bundle(plain) as opened:
        disk = bundle_disk(opened, 0)  # the image's base disk, as the bundle holds it
    ready = guest.ready_marker.encode()
    cold = [*SMOLVMM, "boot", *SHAPE, "--kernel", str(guest.kernel), "--initrd", str(guest.initrd)]
    cold += ["--cmdline", guest.cmdline, "--disk", str(disk), "--ready-marker", guest.ready_marker]
    series: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        series.setdefault(key, []).append(value)
        print(f"bench: {key} {value:.3f}", file=sys.stderr, flush=True)

    for run in range(runs):
        add("smolvmm_restore_s", cli_restore(plain))
        add("smolvmm_library_restore_s", anyio.run(library_restore, plain, backend="asyncio"))
        add("smolvmm_cold_boot_s", console_boot(cold, ready))
        if qemu:
            drive = ["-drive", f"file={disk},format=raw,if=none,id=root,snapshot=on"]
            argv = qemu_argv(
                qemu,
                guest.kernel,
                guest.initrd,
                guest.cmdline,
                work / f"qemu{run}.mon",
                [*drive, "-device", "virtio-blk-device,drive=root"],
            )
            add("qemu_cold_boot_s", console_boot(argv, ready))
        total, alone = anyio.run(exec_after_restore, warm, ASK_WARM, backend="asyncio")
        add("warm_import_restore_s", total)
        add("warm_import_exec_s", alone)
        total, alone = anyio.run(exec_after_restore, plain, IMPORT_COLD, backend="asyncio")
        add("cold_import_restore_s", total)
        add("cold_import_exec_s", alone)
    return result | {key: summary(values) for key, values in series.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for image-guest.json")
    parser.add_argument("--runs", type=int, default=3, help="runs per measure (default 3)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {}
    if os.environ.get("SMOLVMM_NESTED") != "1":
        oci_images.oci_layout()  # made natively (mmdebstrap, umoci): the nested machine reads the cache
        env[PREBUILT_IMAGE_ENV] = str(image_guest().kernel.parent)
    result = measured(Path(__file__), args.out, "image-guest.json", env, lambda work: measure(args.runs, work))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
