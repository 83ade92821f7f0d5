"""``python -m smolvmm.nested [--arm64] [--out DIR]... [--timeout SEC] [--evidence FILE] CMD [ARGS...]``
(what tools/nested-kvm and, with --arm64, tools/arm64-kvm run).

Exit status: the command's, or 124 when the watchdog found the nested machine frozen (no heartbeat
for $SMOLVMM_NESTED_WATCHDOG seconds, default 60), or 125 when the nested machine failed otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

from smolvmm.errors import SmolvmmError
from smolvmm.nested import arm64
from smolvmm.nested.harness import HARNESS_FAILURE, NESTED_FROZE, HarnessError, Job, NestedMachineFroze, run
from smolvmm.nested.watchdog import WATCHDOG_DEFAULT, WATCHDOG_ENV


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nested-kvm",
        description="Run CMD as root inside a nested machine with a hardware-like /dev/kvm "
        "(QEMU TCG + emulated AMD-V), in this directory, with the host root visible read-only.",
        epilog=f"Exit status: CMD's; {NESTED_FROZE} when the nested machine froze (no heartbeat for "
        f"${WATCHDOG_ENV} seconds, default {WATCHDOG_DEFAULT:g}: QEMU is killed); {HARNESS_FAILURE} when "
        "it failed otherwise. CMD may write what it is doing to $SMOLVMM_NESTED_ACTIVITY: a freeze report names it.",
    )
    parser.add_argument(
        "--arm64",
        action="store_true",
        help="use the emulated arm64 machine instead (QEMU TCG at EL2: arm64 KVM, arm64 Python)",
    )
    parser.add_argument(
        "--out",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="make DIR writable inside; what is written there appears on the host (repeatable)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        metavar="SEC",
        help="kill the machine after SEC seconds (default: %(default)g)",
    )
    parser.add_argument(
        "--evidence",
        type=Path,
        metavar="FILE",
        help="when the nested machine freezes or fails, also write what the host saw "
        "(QEMU's state, its registers, the console, the command's activity) to FILE",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD [ARGS...]")
    return parser


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the command; return its exit status, or 125 when the nested machine failed."""
    args = _parser().parse_args(argv)
    if not args.command:
        _parser().error("missing CMD")
    signal.signal(signal.SIGTERM, _terminate)
    outs = [out.resolve() for out in args.out]
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
    try:
        job = Job(args.command, outs=outs, timeout=args.timeout)
    except ValueError as exc:
        _parser().error(str(exc))
    try:
        return (arm64.run if args.arm64 else run)(job)
    except HarnessError as exc:
        print(f"nested-kvm: {exc}", file=sys.stderr)
        if isinstance(exc, NestedMachineFroze):
            print(
                f"--- QEMU threads (id, name, state, CPU, wait channel, system call) ---\n{exc.threads}",
                file=sys.stderr,
            )
        if exc.console:
            print(f"--- nested console (tail) ---\n{exc.console}", file=sys.stderr)
        if args.evidence:
            _write_atomically(args.evidence, exc.evidence)
            print(f"--- all the evidence: {args.evidence} ---", file=sys.stderr)
        return NESTED_FROZE if isinstance(exc, NestedMachineFroze) else HARNESS_FAILURE
    except SmolvmmError as exc:
        print(f"nested-kvm: building the nested machine image failed: {exc}", file=sys.stderr)
        return HARNESS_FAILURE
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.replace(temporary, path)


if __name__ == "__main__":
    sys.exit(main())
