"""smolvmm: run virtual machines that start from a snapshot in a fraction of a second.

Each subcommand lives in a module with ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``--help`` stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "boot": ("smolvmm.cli_machine", "cold-boot a kernel (default: the built-in demo guest)"),
    "build": ("smolvmm.cli_machine", "cold-boot, wait until ready, save a .smolmachine bundle"),
    "run": ("smolvmm.cli_machine", "restore a .smolmachine bundle and carry on"),
    "demo": ("smolvmm.cli_machine", "build (once) and run the built-in demo guest"),
    "inspect": ("smolvmm.cli_bundle", "describe a bundle's sections"),
    "verify": ("smolvmm.cli_bundle", "check a bundle's structure and digests"),
    "pack": ("smolvmm.cli_bundle", "re-encode a bundle (raw for mmap, zstd for shipping)"),
    "push": ("smolvmm.cli_registry", "push a bundle to an OCI registry (REGISTRY/REPO:TAG)"),
    "pull": ("smolvmm.cli_registry", "pull a bundle from an OCI registry into a file"),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 2, like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help shows the usage)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="smolvmm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `python -m smolvmm APP.smolmachine` is short for `run APP.smolmachine`.
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["run", *argv]
    if not argv or argv[0] not in COMMANDS:
        _parser().parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = _Parser(prog=f"smolvmm {name}", description=COMMANDS[name][1])
    module.add_arguments(name, parser)
    args = parser.parse_args(argv[1:])
    try:
        return module.run(name, args)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        if isinstance(exc, SystemExit) or os.environ.get("SMOLVMM_DEBUG"):
            raise
        print(f"smolvmm: error: {_one_line(exc)}", file=sys.stderr)
        return 2 if name == "verify" else 1


def _one_line(exc: BaseException) -> str:
    """The first smolvmm error inside ``exc`` (task groups wrap them), else a short description.

    A traceback is for developers: SMOLVMM_DEBUG=1 shows it.
    """
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = next((e for e in exc.exceptions if not isinstance(e, BaseExceptionGroup)), exc.exceptions[0])
    from smolvmm import SmolvmmError

    if isinstance(exc, SmolvmmError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc} (SMOLVMM_DEBUG=1 shows the traceback)"
