"""``python -m smolvmm.nested [--arm64] [--out DIR]... [--timeout SEC] CMD [ARGS...]``
(what tools/nested-kvm and, with --arm64, tools/arm64-kvm run)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from smolvmm.errors import SmolvmmError
from smolvmm.nested import arm64
from smolvmm.nested.harness import HARNESS_FAILURE, HarnessError, Job, run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nested-kvm",
        description="Run CMD as root inside a nested machine with a hardware-like /dev/kvm "
        "(QEMU TCG + emulated AMD-V), in this directory, with the host root visible read-only.",
    )
    parser.add_argument("--arm64", action="store_true",
                        help="use the emulated arm64 machine instead (QEMU TCG at EL2: arm64 KVM, arm64 Python)")
    parser.add_argument("--out", action="append", type=Path, default=[], metavar="DIR",
                        help="make DIR writable inside; what is written there appears on the host (repeatable)")
    parser.add_argument("--timeout", type=float, default=1800.0, metavar="SEC",
                        help="kill the machine after SEC seconds (default: %(default)g)")
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
        return (arm64.run if args.arm64 else run)(Job(args.command, outs=outs, timeout=args.timeout))
    except HarnessError as exc:
        print(f"nested-kvm: {exc}", file=sys.stderr)
        if exc.console:
            print(f"--- nested console (tail) ---\n{exc.console}", file=sys.stderr)
        return HARNESS_FAILURE
    except SmolvmmError as exc:
        print(f"nested-kvm: building the nested machine image failed: {exc}", file=sys.stderr)
        return HARNESS_FAILURE
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
