"""The guest agent's control channel: exec round trip, restore to the first exec answer, file transfer rates.

Beside each exec figure, the console-based equivalent measured in the same run: a command typed on
the serial console and its answer awaited (``echo R$((40+2))R`` answered by ``R42R``).

Needs a /dev/kvm that runs standard guests (here: ``tools/nested-kvm python bench/bench_exec.py``).
Builds a bundle of the default guest (256 MiB, 1 vCPU) unless ``--bundle`` is given; prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from common import machine_info, summary

import smolvmm


async def restore_to_first_exec(bundle: Path, runs: int) -> dict[str, object]:
    exec_s, console_s = [], []
    for _ in range(runs):
        began = time.perf_counter()
        async with smolvmm.Machine.restore(bundle) as machine:
            assert (await machine.exec(["echo", "R42R"])).stdout == b"R42R\n"
            exec_s.append(time.perf_counter() - began)
        began = time.perf_counter()
        async with smolvmm.Machine.restore(bundle) as machine:
            await machine.console.send(b"echo R$((40+2))R\n")
            await machine.console.wait_for(b"R42R", timeout=60)
            console_s.append(time.perf_counter() - began)
    return {"exec_s": summary(exec_s), "console_echo_s": summary(console_s)}


async def round_trips(bundle: Path, count: int, mib: int) -> dict[str, object]:
    async with smolvmm.Machine.restore(bundle) as machine:
        await machine.exec(["true"])
        exec_ms, console_ms = [], []
        for _ in range(count):
            began = time.perf_counter()
            await machine.exec(["true"])
            exec_ms.append((time.perf_counter() - began) * 1000)
        for i in range(count):
            began = time.perf_counter()
            await machine.console.send(f"echo R$(({i}+100000))R\n".encode())
            await machine.console.wait_for(f"R{i + 100000}R".encode(), timeout=60)
            console_ms.append((time.perf_counter() - began) * 1000)
        with tempfile.TemporaryDirectory() as work:
            source = Path(work) / "upload"
            source.write_bytes(os.urandom(mib * 1024 * 1024))
            began = time.perf_counter()
            await machine.files.upload(source, "/tmp/upload")
            upload_s = time.perf_counter() - began
            began = time.perf_counter()
            await machine.files.download("/tmp/upload", Path(work) / "download")
            download_s = time.perf_counter() - began
            assert (Path(work) / "download").read_bytes() == source.read_bytes()
    return {
        "exec_true_ms": summary(exec_ms),
        "console_echo_ms": summary(console_ms),
        "upload_mib_s": mib / upload_s,
        "download_mib_s": mib / download_s,
        "transfer_mib": mib,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle of the default guest (default: build one)")
    parser.add_argument("--runs", type=int, default=5, help="restores to time (default 5)")
    parser.add_argument("--count", type=int, default=100, help="round trips (default 100)")
    parser.add_argument("--mib", type=int, default=32, help="MiB to upload and download (default 32)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        bundle = args.bundle
        if bundle is None:
            bundle = Path(work) / "bench.smolmachine"
            subprocess.run([sys.executable, "-m", "smolvmm", "build", "-o", str(bundle)], check=True)
        results: dict[str, object] = {"machine": machine_info()}
        results["restore_to_first_answer"] = anyio.run(restore_to_first_exec, bundle, args.runs, backend="trio")
        results.update(anyio.run(round_trips, bundle, args.count, args.mib, backend="trio"))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
