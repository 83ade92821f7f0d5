"""The restore working set (issue 20, item 6): time to a clone's first exec answer, and the page
faults on the way, with the bundle's WORKING_SET section and without it, the bundle's pages in
the page cache (warm) or not (cold).

    python bench/bench_working_set.py --out DIR [--runs 5]

Two nested runs (on a PVM host, inside ``tools/nested-kvm``; elsewhere both run here): the first
builds the default guest's bundle (2 vCPUs, 256 MiB; ``build`` records its working set) into
``DIR`` and writes a copy without the section; the second restores each in turn, in one process
(``Machine.restore``, then ``exec(["true"])``), alternating. In the second nested run ``DIR`` is
read through the host root's 9p mount with its page cache, so ``drop_caches`` makes a restore
read the bundle's pages over 9p again: the cold case. Faults are the process's minor and major
page faults from the restore to the answer (``getrusage``: vCPU threads included). Writes
``working-set.json`` into ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anyio
from common import machine_info, summary

SMOLVMM = [sys.executable, "-m", "smolvmm"]
NESTED = Path(__file__).resolve().parent.parent / "tools" / "nested-kvm"
VARIANTS = ("with", "without")


def build(work: Path) -> None:
    """The bundle with its working set, and a copy without it."""
    import smolformat

    with_set, without = work / "with.smolmachine", work / "without.smolmachine"
    subprocess.run([*SMOLVMM, "build", "-o", str(with_set), "--cpus", "2", "--mem", "256M"], check=True)
    shutil.copyfile(with_set, without)
    smolformat.set_working_set(without, [])


async def first_answer(path: Path) -> dict[str, float]:
    """One restore of ``path`` to its agent's first answer: seconds, faults, pages prefetched."""
    import smolvmm

    before = resource.getrusage(resource.RUSAGE_SELF)
    began = time.perf_counter()
    async with smolvmm.Machine.restore(path) as machine:
        result = await machine.exec(["true"], timeout=300)
        seconds = time.perf_counter() - began
        after = resource.getrusage(resource.RUSAGE_SELF)
        assert result.exit_code == 0, result
        prefetch = str(machine.timings.notes.get("prefetch", "0 of 0 pages"))
    return {
        "seconds": seconds,
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "major_faults": after.ru_majflt - before.ru_majflt,
        "prefetched_pages": int(prefetch.split()[0]),
    }


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


async def measure(work: Path, runs: int) -> dict[str, object]:
    samples: dict[str, list[dict[str, float]]] = {f"{v}_{c}": [] for v in VARIANTS for c in ("warm", "cold")}
    for run in range(runs):
        order = VARIANTS if run % 2 == 0 else VARIANTS[::-1]
        for cache in ("warm", "cold"):
            for variant in order:
                path = work / f"{variant}.smolmachine"
                if cache == "cold":
                    drop_caches()
                else:
                    path.read_bytes()  # every page of the bundle in the page cache
                samples[f"{variant}_{cache}"].append(await first_answer(path))
    import smolformat

    with smolformat.open_bundle(work / "with.smolmachine") as bundle:
        working_set = sum(r.pages for r in bundle.working_set)
        stored = sum(e.length for e in bundle.memory_extents()) // 4096
    return {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "runs": runs,
        "working_set_pages": working_set,
        "stored_pages": stored,
        "results": {
            name: {key: summary([s[key] for s in values]) for key in values[0]} for name, values in samples.items()
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--phase", choices=("build", "measure"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = args.out.resolve()
    if args.phase == "build":
        build(out)
        return 0
    results = out / "results"
    if args.phase == "measure":
        result = anyio.run(measure, out, args.runs)
        (results / "working-set.json").write_text(json.dumps(result, indent=1))
        return 0
    from smolvmm.host.kvmprobe import probe
    from smolvmm.images.guest import PREBUILT_ENV, default_guest

    results.mkdir(parents=True, exist_ok=True)
    if probe().kind != "pvm":
        build(out)
        result = anyio.run(measure, out, args.runs)
        (results / "working-set.json").write_text(json.dumps(result, indent=1))
    else:
        env = {**os.environ, PREBUILT_ENV: str(default_guest().kernel.parent)}
        me = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--runs", str(args.runs)]
        subprocess.run(
            [str(NESTED), "--out", str(out), "--timeout", "3000", *me, "--phase", "build"], env=env, check=True
        )
        # --out only for the results: the bundles are read through the host root's cached 9p mount
        job = [*me, "--phase", "measure"]
        subprocess.run([str(NESTED), "--out", str(results), "--timeout", "3000", *job], env=env, check=True)
    print((results / "working-set.json").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
