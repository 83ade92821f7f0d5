"""``smolvmm COMMAND ...`` in this process: the top-level parser, then the command's module."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from smolvmm.cli import COMMANDS, SUMMARY, expand, usage_error
from smolvmm.cli import output as cli_output
from smolvmm.cli import progress as cli_progress
from smolvmm.cli import status as cli_status


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 2, like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        usage_error(self.prog, message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="smolvmm",
        description=SUMMARY,
        epilog=cli_status.TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"smolvmm {cli_output.version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: this process's arguments) here; its exit status."""
    argv = expand(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _parser().parse_args(argv or ["--help"])
        return cli_status.USAGE
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = _Parser(prog=f"smolvmm {name}", description=COMMANDS[name][1])
    module.add_arguments(name, parser)
    command: list[str] | None = None
    if name in ("run", "exec") and "--" in argv:  # `run [FLAGS] BUNDLE [FLAGS] -- CMD...`: flags may follow BUNDLE
        command, argv = argv[argv.index("--") + 1 :], argv[: argv.index("--")]
    args = parser.parse_args(argv[1:])
    if command is not None:
        args.command = command
    try:
        with cli_progress.shown():
            status: int = module.run(name, args)
            return status
    except BaseException as exc:
        leaf = cli_status.leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            return cli_status.INTERRUPTED
        if isinstance(leaf, BrokenPipeError):
            cli_output.discard_stdout()
            return cli_status.BROKEN_PIPE
        if isinstance(exc, SystemExit) or os.environ.get("SMOLVMM_DEBUG"):
            raise
        cli_output.error(_one_line(leaf))
        return cli_status.for_error(leaf)


def _one_line(exc: BaseException) -> str:
    """A smolvmm error's own line, else a short description: a traceback is for developers
    (SMOLVMM_DEBUG=1 shows it)."""
    from smolvmm import SmolvmmError

    if isinstance(exc, SmolvmmError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc} (SMOLVMM_DEBUG=1 shows the traceback)"
