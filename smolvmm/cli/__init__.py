"""smolvmm: run virtual machines that start from a snapshot in a fraction of a second.

Each subcommand lives in a module with ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``--help`` stays cheap.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from typing import NoReturn

from smolvmm.cli import output as cli_output
from smolvmm.cli import progress as cli_progress
from smolvmm.cli import status as cli_status

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "boot": ("smolvmm.cli.machine", "cold-boot a kernel (default: the built-in demo guest)"),
    "build": ("smolvmm.cli.machine", "cold-boot, wait until ready, save a .smolmachine bundle"),
    "run": ("smolvmm.cli.machine", "restore a .smolmachine bundle and carry on"),
    "demo": ("smolvmm.cli.demo", "build (once) and run the built-in demo guest"),
    "inspect": ("smolvmm.cli.bundle", "describe a bundle's sections"),
    "verify": ("smolvmm.cli.bundle", "check a bundle's structure and digests"),
    "pack": ("smolvmm.cli.bundle", "re-encode a bundle (raw for mmap, zstd for shipping)"),
    "keygen": ("smolvmm.cli.sign", "make an Ed25519 key pair for signing bundles"),
    "sign": ("smolvmm.cli.sign", "sign a bundle's content with a private key"),
    "kernel": ("smolvmm.cli.kernel", "build the minimal guest kernel (--kernel minimal) from Debian's source"),
    "cache": ("smolvmm.cli.cache", "list the cache (guest images, packages, disks) or prune what is stale"),
    "ps": ("smolvmm.cli.ps", "list the machines this user's smolvmm processes run"),
    "stop": ("smolvmm.cli.ps", "stop a machine that ps lists"),
    "attach": ("smolvmm.cli.detach", "connect to the console of a machine started with run --detach"),
    "exec": ("smolvmm.cli.control", "run a command in a machine started with run --detach"),
    "doctor": ("smolvmm.cli.doctor", "say whether this host can run smolvmm's machines, and what is missing"),
    "push": ("smolvmm.cli.registry", "push a bundle to an OCI registry (REGISTRY/REPO:TAG)"),
    "pull": ("smolvmm.cli.registry", "pull a bundle from an OCI registry into a file"),
    "helper": ("smolvmm.cli.helper", "keep a warm process that run commands hand themselves to (no start-up)"),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 2, like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help shows the usage)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="smolvmm",
        description=__doc__.splitlines()[0],
        epilog=cli_status.TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"smolvmm {cli_output.version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def expand(argv: list[str]) -> list[str]:
    """The command line as ``main`` reads it: ``APP.smolmachine`` alone is short for ``run
    APP.smolmachine``; a mistyped command is a usage error (exit 2)."""
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        if typo := _typo(argv[0]):
            _parser().error(f"no command {argv[0]!r}: did you mean {typo!r}?")
        return ["run", *argv]
    return argv


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


def _typo(word: str) -> str | None:
    """The command ``word`` was probably meant to be, unless it may name a bundle (a path, a file
    name, a registry reference)."""
    if any(c in word for c in "/:.") or os.path.exists(word):
        return None
    close = difflib.get_close_matches(word, COMMANDS, n=1, cutoff=0.6)
    return close[0] if close else None


def _one_line(exc: BaseException) -> str:
    """A smolvmm error's own line, else a short description: a traceback is for developers
    (SMOLVMM_DEBUG=1 shows it)."""
    from smolvmm import SmolvmmError

    if isinstance(exc, SmolvmmError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc} (SMOLVMM_DEBUG=1 shows the traceback)"
