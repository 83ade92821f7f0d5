"""Start-up imports of a CLI restore against a reference import line, measured in one run.

Run: ``python bench/bench_imports.py [--bundle PATH] [--runs 9]``. Both commands run under
``python -X importtime`` with ``PYTHONDONTWRITEBYTECODE`` removed from their environment (as users
run: bytecode is cached, not recompiled at every start), alternating, ``--runs`` times each; a total
is the sum of the top-level cumulative import times. Prints a Markdown table with medians and the
ratio (target: at most 0.8), the modules the run path loads, and the heaviest top-level imports.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from common import machine_info

REFERENCE = "import trio, anyio, cffi, construct, zstandard"
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)$")
WATCHED = ("trio", "asyncio", "pdb", "construct", "zstandard", "cffi", "anyio", "smolvmm.hypervisor.kvm")


def profile(argv: Sequence[str]) -> tuple[float, dict[str, float], set[str]]:
    """Total import ms of one process, its top-level imports (ms) and every module it loaded."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode:
        raise SystemExit(f"bench_imports: {' '.join(argv)} failed: {done.stderr.strip().splitlines()[-1:]}")
    top: dict[str, float] = {}
    loaded: set[str] = set()
    for line in done.stderr.splitlines():
        if match := IMPORT_LINE.match(line):
            loaded.add(match.group(4))
            if not match.group(3):
                top[match.group(4)] = int(match.group(2)) / 1000
    return sum(top.values()), top, loaded


def _cells(values: list[float]) -> str:
    return f"{min(values):.0f} / {statistics.median(values):.0f} / {max(values):.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle to restore (default: the demo bundle)")
    parser.add_argument("--runs", type=int, default=9, help="processes per command (default 9)")
    args = parser.parse_args()
    bundle = args.bundle
    if bundle is None:
        from smolvmm.cli.demo import demo_bundle

        bundle = Path(demo_bundle())
    if not bundle.exists():
        print(f"bench_imports: no bundle at {bundle}; pass --bundle or run `python -m smolvmm demo`", file=sys.stderr)
        return 1
    commands = {
        f"`python -c '{REFERENCE}'`": ["-c", REFERENCE],
        "`python -m smolvmm run --prepare-only BUNDLE`": ["-m", "smolvmm", "run", "--prepare-only", str(bundle)],
    }
    totals: dict[str, list[float]] = {name: [] for name in commands}
    last: dict[str, tuple[dict[str, float], set[str]]] = {}
    profile(commands[next(iter(commands))])  # bytecode caches written before any timed run
    profile(list(commands.values())[1])
    for _ in range(args.runs):
        for name, argv in commands.items():
            total, top, loaded = profile(argv)
            totals[name].append(total)
            last[name] = (top, loaded)
    reference = statistics.median(next(iter(totals.values())))
    machine = machine_info()
    print(
        f"{machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}, Python {sys.version.split()[0]};"
        f" load {machine['load']} after the run; {args.runs} alternating runs each; PYTHONDONTWRITEBYTECODE unset.\n"
    )
    print("| command | import ms (min / median / max) | ratio to the reference | modules | loads |")
    print("|---|---|---|---|---|")
    for name, values in totals.items():
        top, loaded = last[name]
        loads = ", ".join(w for w in WATCHED if w in loaded) or "none of them"
        ratio = statistics.median(values) / reference
        print(f"| {name} | {_cells(values)} | {ratio:.2f} | {len(loaded)} | {loads} |")
    top, _ = last[list(commands)[1]]
    heaviest = sorted(top.items(), key=lambda item: -item[1])[:8]
    print(
        "\nHeaviest top-level imports of the run path (last run, ms): "
        + ", ".join(f"{name} {ms:.0f}" for name, ms in heaviest)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
