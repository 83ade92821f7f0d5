"""What the jail (the default for root) costs a starting machine: ``boot --timings`` to the first
KVM_RUN, jailed and ``--no-jail``, alternated, on this host's /dev/kvm (as root). With ``--bundle``,
also the jail's import and preload in a process that has imported what a restore of that bundle
imports (``run --prepare-only``, which a PVM host can do with a hardware bundle). With ``--python``
given more than once, each interpreter's smolvmm in turn (installs of different code).

Host-side work only: the demo guest need not get far (on a PVM host it dies in early boot), the
monitor's phases up to its first KVM_RUN are the same either way. Prints one JSON document.

    python bench/bench_jail.py [--runs 7] [--bundle B] [--python PY]... [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import machine_info, smolvmm_cli, summary


def _catches_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(status.split("SigCgt:")[1].split()[0], 16)
    return bool(caught & 1 << (signal.SIGTERM - 1))


# Prints the ms that importing the jail and its preload took, and the modules they added.
PRELOAD = """
import contextlib, io, runpy, sys, time
sys.argv = ["smolvmm", "run", "--prepare-only", sys.argv[1]]
with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit):
    runpy.run_module("smolvmm", run_name="__main__", alter_sys=True)
before, began = len(sys.modules), time.perf_counter()
from smolvmm.host.jail import Jail
Jail.preload()
print((time.perf_counter() - began) * 1e3, len(sys.modules) - before)
"""


def first_kvm_run_ms(python: str, flag: str) -> tuple[float, dict[str, float]]:
    """One ``boot FLAG --timings --json`` by ``python``, stopped once its vCPUs run: ms to the first
    KVM_RUN, all phases."""
    monitor = subprocess.Popen(
        [*smolvmm_cli(python), "boot", flag, "--timings", "--json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not _catches_sigterm(monitor.pid) and time.monotonic() < deadline:  # serving its machine
        time.sleep(0.05)
    monitor.send_signal(signal.SIGTERM)
    out, _ = monitor.communicate(timeout=60)
    phases: dict[str, float] = json.loads(out.strip().splitlines()[-1])["phases_ms"]
    return phases["first_kvm_run"], phases


def preload_ms(python: str, bundle: Path) -> tuple[float, int]:
    """The jail's import and preload after a restore's imports, in a process of ``python``: ms, modules added."""
    done = subprocess.run([python, "-P", "-c", PRELOAD, str(bundle)], capture_output=True, text=True, check=True)
    ms, modules = done.stdout.split()
    return float(ms), int(modules)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--bundle", type=Path, help="also measure the preload after this bundle's restore imports")
    parser.add_argument(
        "--python", action="append", help="interpreter whose smolvmm runs (repeatable; default: this one)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_jail: the jail needs root", file=sys.stderr)
        return 1
    pythons = args.python or [sys.executable]
    times: dict[str, dict[str, list[float]]] = {python: {"--jail": [], "--no-jail": []} for python in pythons}
    preloads: dict[str, list[tuple[float, int]]] = {python: [] for python in pythons}
    for _ in range(args.runs):
        for python, flags in times.items():
            for flag, values in flags.items():
                values.append(first_kvm_run_ms(python, flag)[0])
            if args.bundle:
                preloads[python].append(preload_ms(python, args.bundle))
    results: dict[str, object] = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    for python, flags in times.items():
        jailed, unjailed = summary(flags["--jail"]), summary(flags["--no-jail"])
        measured: dict[str, object] = {
            "first_kvm_run_ms": {"jail": jailed, "no_jail": unjailed},
            "jail_costs_ms": jailed["median"] - unjailed["median"],
        }
        if args.bundle:
            measured["preload_after_restore_imports"] = {
                "ms": summary([ms for ms, _ in preloads[python]]),
                "modules": preloads[python][-1][1],
            }
        results |= {python: measured} if len(pythons) > 1 else measured
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
