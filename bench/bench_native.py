"""Host-side benchmarks that boot no guest: restore up to the first KVM_RUN, import time, packing a real bundle.

Runs natively on any host with /dev/kvm (PVM included); writes ``native.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench_imports import profile
from common import machine_info, summary

SMOLVMM = [sys.executable, "-m", "smolvmm"]


def wall(argv: Sequence[str], runs: int) -> tuple[dict[str, float | int], subprocess.CompletedProcess[str]]:
    """Wall time of ``argv`` as a process over ``runs`` runs, and its last result."""
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - began)
    return summary(times), done


def prepare_only(bundle: Path, runs: int) -> dict[str, object]:
    """``run --prepare-only``: each phase's ms over ``runs`` processes, and the processes' wall time."""
    phases: dict[str, list[float]] = {}
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        done = subprocess.run(
            [*SMOLVMM, "run", "--prepare-only", "--json", str(bundle)], capture_output=True, text=True, check=True
        )
        times.append(time.perf_counter() - began)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        for phase, ms in report["phases_ms"].items():
            phases.setdefault(phase, []).append(ms)
    return {
        "phases_ms": {phase: summary(values) for phase, values in phases.items()},
        "process_s": summary(times),
        "notes": {k: v for k, v in report.items() if k != "phases_ms"},
    }


def import_profile(argv: Sequence[str], runs: int) -> dict[str, object]:
    """``python -X importtime``: total import ms (sum of top-level cumulative times) and the heaviest packages."""
    totals = []
    for _ in range(runs):
        total, top, loaded = profile(argv)
        totals.append(total)
    heaviest = sorted(top.items(), key=lambda item: -item[1])[:8]
    watched = ["anyio", "trio", "cffi", "construct", "zstandard", "smolvmm.monitor.vm", "smolvmm.hypervisor.kvm"]
    return {
        "total_ms": summary(totals),
        "heaviest_ms": dict(heaviest),
        "modules": len(loaded),
        "loads": {name: name in loaded for name in watched},
    }


def pack(bundle: Path) -> dict[str, object]:
    """Pack a real bundle with zstd (its RAM is a real guest's): time and sizes."""
    with tempfile.TemporaryDirectory(prefix="smolbench-") as work:
        packed = Path(work) / "packed.smolmachine"
        began = time.perf_counter()
        subprocess.run([*SMOLVMM, "pack", "--zstd", str(bundle), str(packed)], capture_output=True, check=True)
        seconds = time.perf_counter() - began
        return {"raw_bytes": bundle.stat().st_size, "zstd_bytes": packed.stat().st_size, "pack_s": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle", type=Path, required=True, help="a raw bundle of the default guest (from bench_guest)"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for native.json")
    parser.add_argument("--runs", type=int, default=20, help="prepare-only runs (default 20)")
    args = parser.parse_args()
    results: dict[str, object] = {"machine": machine_info()}
    results["prepare_only"] = prepare_only(args.bundle, args.runs)
    results["python_c_pass_s"] = wall([sys.executable, "-c", "pass"], 5)[0]
    results["help_s"] = wall([*SMOLVMM, "--help"], 5)[0]
    results["import_help"] = import_profile(["-m", "smolvmm", "--help"], 5)
    results["import_run"] = import_profile(["-m", "smolvmm", "run", "--prepare-only", str(args.bundle)], 5)
    results["pack"] = pack(args.bundle)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "native.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
