"""smolvmm: run virtual machines that start from a snapshot in a fraction of a second.

Each subcommand lives in a module with ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``--help`` stays cheap. This package
module holds only the command table and ``expand``, all a ``run`` reads before it hands itself
to a warm helper (``helper.py``); ``dispatch.py`` parses and runs a command in this process.
"""

from __future__ import annotations

import os
import sys

from smolvmm.cli import status as cli_status

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing, which every CLI start would pay
if TYPE_CHECKING:
    from typing import NoReturn

SUMMARY = str(__doc__).splitlines()[0]  # the first line of ``smolvmm --help``

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


def expand(argv: list[str]) -> list[str]:
    """The command line as ``main`` reads it: ``APP.smolmachine`` alone is short for ``run
    APP.smolmachine``; a mistyped command is a usage error (exit 2)."""
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        if typo := _typo(argv[0]):
            usage_error("smolvmm", f"no command {argv[0]!r}: did you mean {typo!r}?")
        return ["run", *argv]
    return argv


def usage_error(prog: str, message: str) -> NoReturn:
    """End with one line on stderr and exit status 2: every usage error of the CLI, from
    ``expand`` or from a command's argument parser."""
    sys.stderr.write(f"{prog}: error: {message} (--help shows the usage)\n")
    raise SystemExit(cli_status.USAGE)


def _typo(word: str) -> str | None:
    """The command ``word`` was probably meant to be, unless it may name a bundle (a path, a file
    name, a registry reference)."""
    if any(c in word for c in "/:.") or os.path.exists(word):
        return None
    import difflib  # only for a word that names neither a command nor a bundle

    close = difflib.get_close_matches(word, COMMANDS, n=1, cutoff=0.6)
    return close[0] if close else None
