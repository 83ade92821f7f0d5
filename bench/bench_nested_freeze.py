"""How often the nested machine freezes under each of a few settings, run by run in turn.

Runs a fixed guest-heavy workload (by default the kvm tests of tests/test_devices_guest.py, which
froze 5 of 7 machines on one host with the inner kernel's tick stopping when idle; any pytest
arguments after ``--``) in a fresh ``tools/nested-kvm`` machine
again and again, cycling through the settings (extra inner-kernel arguments,
``$SMOLVMM_NESTED_APPEND``; extra QEMU options, ``$SMOLVMM_NESTED_QEMU_ARGS``) run by run, so that
the host's load falls on all of them alike. Counts per setting: runs, runs that completed (whatever
the tests said), freezes (exit 124: the watchdog; idle or busy by QEMU's CPU in the silent minute),
other machine failures (125) and nested minutes.

    python bench/bench_nested_freeze.py [--rounds N] [--minutes M] [--json FILE] [--logs DIR]
        [--setting NAME KERNEL_ARGS QEMU_ARGS]... [-- PYTEST_ARGS...]

One nested machine at a time. Needs a PVM (or no) /dev/kvm host with qemu-system-x86_64, like
``tools/nested-kvm`` itself. Each run's output and any evidence file stay in ``--logs``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from common import machine_info

from smolvmm.images.guest import PREBUILT_ENV, default_guest
from smolvmm.nested.harness import APPEND_ENV, HARNESS_FAILURE, NESTED_FROZE, QEMU_ARGS_ENV

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "nested-kvm"
WORKLOAD = ["tests/test_devices_guest.py", "-m", "kvm"]
"""Four guest tests (disks, consoles, entropy, a broken device, TAP networking): 2 min 42 s a run when
nothing freezes; the freezes came at idle moments in them (BENCHMARKS.md, "The freeze found")."""
SETTINGS = [
    ("default", "", ""),
    ("nohz=on", "nohz=on", ""),
]
"""The harness's own settings (the inner kernel with ``nohz=off``), against the tick stopping when
idle again (a later ``nohz=`` wins), the setting under which the machines froze."""
RUN_TIMEOUT = 2400.0
_FROZE = re.compile(r"QEMU (?:running|idle) \(state \S+; ([0-9.]+) s of CPU")
_SUMMARY = re.compile(
    r"^=* ?(\d+ (?:passed|failed|errors?|skipped|deselected)\b.* in [0-9.]+s.*?)(?: =+)?$", re.MULTILINE
)


@dataclass
class Run:
    """One nested machine's run of the workload under one setting."""

    setting: str
    started: str
    seconds: float
    status: int
    outcome: str
    """"completed", "froze (idle)", "froze (busy)", "machine failed" or "timed out"."""
    tests: str = ""
    headline: str = ""
    load: str = ""


@dataclass
class Tally:
    """What one setting did over its runs."""

    runs: int = 0
    completed: int = 0
    froze_idle: int = 0
    froze_busy: int = 0
    other: int = 0
    minutes: float = 0.0
    statuses: list[int] = field(default_factory=list)

    def row(self, name: str) -> str:
        froze = self.froze_idle + self.froze_busy
        per = f"{self.minutes / froze:.0f}" if froze else "-"
        return (
            f"| {name} | {self.runs} | {self.completed} | {froze} ({self.froze_idle} idle, {self.froze_busy} busy)"
            f" | {self.other} | {self.minutes:.1f} | {per} |"
        )


def outcome(status: int, output: str) -> tuple[str, str]:
    """The run's outcome and the harness's one-line report (if any) from its exit status and output."""
    headline = next((line for line in reversed(output.splitlines()) if line.startswith("nested-kvm: ")), "")
    if status == NESTED_FROZE:
        match = _FROZE.search(headline)
        busy = match is not None and float(match.group(1)) > 30
        return ("froze (busy)" if busy else "froze (idle)"), headline
    if status == HARNESS_FAILURE:
        return ("timed out" if "timed out after" in headline else "machine failed"), headline
    return "completed", headline


def run_once(name: str, append: str, qemu_args: str, workload: list[str], logs: Path, number: int) -> Run:
    """The workload in one fresh nested machine with the given extra settings; its output goes to ``logs``."""
    prefix = f"{number:03d}-{re.sub(r'[^A-Za-z0-9]+', '_', name)}"
    log, evidence = logs / f"{prefix}.log", logs / f"{prefix}-evidence.log"
    env = {**os.environ, APPEND_ENV: append, QEMU_ARGS_ENV: qemu_args, PREBUILT_ENV: str(default_guest().kernel.parent)}
    command = [str(TOOL), "--timeout", str(RUN_TIMEOUT), "--evidence", str(evidence), sys.executable, "-m", "pytest"]
    command += ["-p", "no:cacheprovider", "-q", *workload]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    started, start = datetime.now(UTC).strftime("%H:%M:%S"), time.monotonic()
    with open(log, "w") as out:
        status = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - start
    output = log.read_text(errors="replace")
    what, headline = outcome(status, output)
    summaries = _SUMMARY.findall(output)
    return Run(name, started, round(seconds, 1), status, what, summaries[-1] if summaries else "", headline, load)


def tally(runs: list[Run], names: list[str]) -> dict[str, Tally]:
    """Per setting, in ``names``' order."""
    tallies = {name: Tally() for name in names}
    for run in runs:
        t = tallies[run.setting]
        t.runs += 1
        t.minutes += run.seconds / 60
        t.statuses.append(run.status)
        if run.outcome == "completed":
            t.completed += 1
        elif run.outcome == "froze (idle)":
            t.froze_idle += 1
        elif run.outcome == "froze (busy)":
            t.froze_busy += 1
        else:
            t.other += 1
    return tallies


def table(tallies: dict[str, Tally]) -> str:
    """The Markdown table BENCHMARKS.md shows."""
    lines = [
        "| setting | runs | completed | froze | other machine failures | nested minutes | minutes per freeze |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + [t.row(name) for name, t in tallies.items()])


def write_json(path: Path, results: dict[str, object]) -> None:
    """``results`` to ``path``, atomically."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as file:
        json.dump(results, file, indent=2)
    os.replace(temporary, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100, help="rounds of one run per setting (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=60, help="start no run after this many minutes")
    parser.add_argument("--json", type=Path, help="write the runs and the tally here (after every run)")
    parser.add_argument("--logs", type=Path, default=Path("nested-freeze-logs"), help="each run's output")
    parser.add_argument(
        "--setting",
        nargs=3,
        action="append",
        metavar=("NAME", "KERNEL_ARGS", "QEMU_ARGS"),
        help="a setting to try (repeatable; default: " + "; ".join(repr(s) for s in SETTINGS) + ")",
    )
    parser.add_argument("pytest_args", nargs="*", help=f"the workload (default: {' '.join(WORKLOAD)})")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C: subprocess.run then kills the nested machine it is waiting for
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    settings = [tuple(s) for s in args.setting] if args.setting else SETTINGS
    workload = args.pytest_args or WORKLOAD
    args.logs.mkdir(parents=True, exist_ok=True)
    names = [name for name, _, _ in settings]
    runs: list[Run] = []
    results: dict[str, object] = {"machine": machine_info(), "workload": workload, "settings": settings}
    start = time.monotonic()
    print(f"bench: nested freezes, settings {names}, workload {' '.join(workload)}", flush=True)
    # each round rotates the order, so no setting always runs first (or right after a given other)
    schedule = [s for r in range(args.rounds) for s in settings[r % len(settings) :] + settings[: r % len(settings)]]
    for name, append, qemu_args in schedule:
        if time.monotonic() - start > args.minutes * 60:
            break
        run = run_once(name, append, qemu_args, workload, args.logs, len(runs) + 1)
        runs.append(run)
        print(
            f"{run.started} {name}: {run.outcome} in {run.seconds / 60:.1f} min (exit {run.status};"
            f" load {run.load}) {run.tests} {run.headline[:160]}",
            flush=True,
        )
        if args.json:
            write_json(args.json, {**results, "runs": [asdict(r) for r in runs]})
    tallies = tally(runs, names)
    print(table(tallies))
    if args.json:
        write_json(
            args.json,
            {**results, "runs": [asdict(r) for r in runs], "tally": {n: asdict(t) for n, t in tallies.items()}},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
