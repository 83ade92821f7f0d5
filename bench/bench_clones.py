"""How restoring clones grows with their number: 1, 10, 25 and 50 clones of the demo bundle restored
at once by one monitor process (the library, as a sandbox service runs them), each until its
agent answers an exec; then the process's memory with all of them running.

    python bench/bench_clones.py --out DIR [--counts 1,10,25,50] [--plots bench/plots]

Needs a /dev/kvm that runs standard guests; on a PVM host it runs itself inside
``tools/nested-kvm``. For each count: the wall time from the first restore call until every clone
answered, each clone's time from its restore call to its answer (median and slowest), and the PSS
of the process once all answer (the clones' RAM is the bundle mapped ``MAP_PRIVATE``: pages they
only read are the page cache's, shared), also per clone. Writes ``clones.json`` into ``--out`` and
``clones_latency.png`` and ``clones_memory.png`` into ``--plots`` (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anyio
from common import machine_info, measured, pss_kib

import smolvmm

EXEC_TIMEOUT = 900.0


async def restore_all(bundle: Path, count: int) -> dict[str, object]:
    """``count`` clones restored at once until each answers; the process's PSS with all running."""
    latencies: list[float] = []
    answered, release = anyio.Event(), anyio.Event()

    async def clone() -> None:
        began = time.perf_counter()
        async with smolvmm.Machine.restore(bundle) as machine:
            result = await machine.exec(["true"], timeout=EXEC_TIMEOUT)
            if result.exit_code != 0:
                raise RuntimeError(f"a clone's exec failed: {result}")
            latencies.append(time.perf_counter() - began)
            if len(latencies) == count:
                answered.set()
            await release.wait()
            await machine.stop()

    idle = pss_kib(os.getpid())
    began = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(clone)
        await answered.wait()
        wall = time.perf_counter() - began
        pss = pss_kib(os.getpid())
        release.set()
    return {
        "count": count,
        "all_answered_s": round(wall, 3),
        "latency_median_s": round(statistics.median(latencies), 3),
        "latency_max_s": round(max(latencies), 3),
        "pss_mib": round(pss / 1024, 1),
        "pss_per_clone_mib": round((pss - idle) / 1024 / count, 2),
        "pss_idle_mib": round(idle / 1024, 1),
    }


def measure(counts: list[int], work: Path) -> dict[str, object]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # about 35 descriptors a clone
    bundle = work / "demo.smolmachine"
    subprocess.run([sys.executable, "-m", "smolvmm", "build", "-o", str(bundle)], check=True, timeout=1800)
    rows = []
    for count in counts:
        rows.append(anyio.run(restore_all, bundle, count))
        print(f"bench: {rows[-1]}", file=sys.stderr, flush=True)
    return {"machine": machine_info(), "bundle_bytes": bundle.stat().st_size, "rows": rows}


def plot(rows: list[dict[str, float]], plots: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [row["count"] for row in rows]
    for name, series, label in (
        (
            "clones_latency.png",
            (("latency_median_s", "median clone"), ("latency_max_s", "slowest clone"), ("all_answered_s", "all")),
            "seconds to the first exec answer",
        ),
        ("clones_memory.png", (("pss_mib", "process PSS"),), "MiB"),
    ):
        figure, axes = plt.subplots(figsize=(6, 4))
        for key, legend in series:
            axes.plot(counts, [row[key] for row in rows], marker="o", label=legend)
        axes.set_xlabel("clones restored at once (one monitor process, nested machine)")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        axes.legend()
        figure.tight_layout()
        partial = plots / f".{name}.partial"
        figure.savefig(partial, format="png")
        partial.replace(plots / name)
        plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for clones.json")
    parser.add_argument("--counts", default="1,10,25,50", help="clone counts (default 1,10,25,50)")
    parser.add_argument("--plots", type=Path, default=Path(__file__).resolve().parent / "plots")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    counts = [int(count) for count in args.counts.split(",")]
    result = measured(Path(__file__), args.out, "clones.json", {}, lambda work: measure(counts, work))
    if os.environ.get("SMOLVMM_NESTED") != "1":
        args.plots.mkdir(parents=True, exist_ok=True)
        plot(result["rows"], args.plots)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
