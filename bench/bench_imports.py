"""Start-up imports of a CLI restore against a reference import line, measured in one run.

Run: ``python bench/bench_imports.py [--bundle PATH] [--runs 9]``. The commands run under
``python -X importtime`` with ``PYTHONDONTWRITEBYTECODE`` removed from their environment (as users
run: bytecode is cached, not recompiled at every start), alternating, ``--runs`` times each; a total
is the sum of the top-level cumulative import times. The run path runs twice: in place, and handed
to a warm ``smolvmm helper`` (started here with a runtime directory of its own), where the process
the user starts imports only the hand-off: the helper imported the rest once, before. Prints a
Markdown table with medians and the ratio (target: at most 0.8), the modules each loads, and the
heaviest top-level imports of the run path in place.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from common import machine_info, smolvmm_cli, warm_helper

REFERENCE = "import trio, anyio, cffi, construct, zstandard"
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)$")
WATCHED = ("trio", "asyncio", "pdb", "construct", "zstandard", "cffi", "anyio", "smolvmm.hypervisor.kvm")


def profile(
    argv: Sequence[str], extra_env: Mapping[str, str] | None = None, python: str = sys.executable
) -> tuple[float, dict[str, float], set[str]]:
    """Total import ms of one process of ``python``, its top-level imports (ms) and every module it loaded."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | dict(extra_env or {})
    # -P, as smolvmm_cli: a regular install's smolvmm, not the one in the working directory (the tree)
    command = [python, "-P", "-X", "importtime", *argv]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
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
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter of every command (run_all.py passes bench/common.py's regular_install of this tree)",
    )
    args = parser.parse_args()
    bundle = args.bundle
    if bundle is None:
        from smolvmm.cli.demo import demo_bundle

        bundle = Path(demo_bundle())
    if not bundle.exists():
        print(f"bench_imports: no bundle at {bundle}; pass --bundle or run `python -m smolvmm demo`", file=sys.stderr)
        return 1
    run_path = ["-m", "smolvmm", "run", "--prepare-only", str(bundle)]
    with (
        tempfile.TemporaryDirectory(prefix="bench-imports-") as scratch,
        warm_helper(smolvmm_cli(args.python), Path(scratch), timeout=60, settle=1) as env,
    ):
        # name: (argv, environment added); the last command's run is handed to a warm `smolvmm helper`
        commands: dict[str, tuple[list[str], Mapping[str, str]]] = {
            f"`python -c '{REFERENCE}'`": (["-c", REFERENCE], {}),
            "`python -m smolvmm run --prepare-only BUNDLE`": (run_path, {}),
            "the same, handed to a warm `smolvmm helper` (the client process's imports)": (run_path, env),
        }
        totals: dict[str, list[float]] = {name: [] for name in commands}
        last: dict[str, tuple[dict[str, float], set[str]]] = {}
        for argv, added in commands.values():  # bytecode caches written before any timed run
            profile(argv, added, args.python)
        for _ in range(args.runs):
            for name, (argv, added) in commands.items():
                total, top, loaded = profile(argv, added, args.python)
                totals[name].append(total)
                last[name] = (top, loaded)
        handed = (Path(scratch) / "helper.err").read_text().count(" runs: ")
        if handed != args.runs + 1:
            raise SystemExit(f"bench_imports: the helper ran {handed} of {args.runs + 1} commands handed to it")
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
    top, _ = last[list(totals)[1]]
    heaviest = sorted(top.items(), key=lambda item: -item[1])[:8]
    print(
        "\nHeaviest top-level imports of the run path (last run, ms): "
        + ", ".join(f"{name} {ms:.0f}" for name, ms in heaviest)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
