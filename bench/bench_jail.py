"""What the jail (the default for root) costs a starting machine: ``boot --timings`` to the first
KVM_RUN, jailed and ``--no-jail``, alternated, on this host's /dev/kvm (as root).

Host-side work only: the demo guest need not get far (on a PVM host it dies in early boot), the
monitor's phases up to its first KVM_RUN are the same either way. Prints one JSON document.

    python bench/bench_jail.py [--runs 7] [--json results.json]
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

from common import machine_info, summary


def _catches_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(status.split("SigCgt:")[1].split()[0], 16)
    return bool(caught & 1 << (signal.SIGTERM - 1))


def first_kvm_run_ms(flag: str) -> tuple[float, dict[str, float]]:
    """One ``boot FLAG --timings --json``, stopped once its vCPUs run: ms to the first KVM_RUN, all phases."""
    monitor = subprocess.Popen(
        [sys.executable, "-m", "smolvmm", "boot", flag, "--timings", "--json"],
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_jail: the jail needs root", file=sys.stderr)
        return 1
    times: dict[str, list[float]] = {"--jail": [], "--no-jail": []}
    for _ in range(args.runs):
        for flag in times:
            times[flag].append(first_kvm_run_ms(flag)[0])
    jailed, unjailed = (summary(times[flag]) for flag in times)
    results = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "first_kvm_run_ms": {"jail": jailed, "no_jail": unjailed},
        "jail_costs_ms": jailed["median"] - unjailed["median"],
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
