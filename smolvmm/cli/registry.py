"""CLI commands that move bundles through OCI registries: ``push`` and ``pull``; only the public API is used."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio

import smolvmm

_Result = TypeVar("_Result", "smolvmm.PushResult", "smolvmm.PullResult")  # strings: no import of the registry here


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    if name == "push":
        parser.add_argument("bundle", type=Path, help="the .smolmachine file to push")
        parser.add_argument("reference", metavar="REF", help="REGISTRY/REPO:TAG")
    if name == "pull":
        parser.add_argument("reference", metavar="REF", help="REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:HEX")
        parser.add_argument("-o", "--output", type=Path, required=True, help="the .smolmachine file to write")
    add_registry_flags(parser)


def add_registry_flags(parser: argparse.ArgumentParser) -> None:
    """``--insecure``, for commands that reach a registry."""
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain HTTP and unverified TLS (always allowed for loopback registries)",
    )


def progress_printer(verb: str) -> Callable[[smolvmm.Transfer], None] | None:
    """A progress callback that rewrites one line on a terminal's stderr; None when stderr is not one."""
    if not sys.stderr.isatty():
        return None

    shown = ""

    def show(transfer: smolvmm.Transfer) -> None:
        nonlocal shown
        to_move = transfer.total - transfer.present
        text = f"\rsmolvmm: {verb} {_mib(transfer.moved)} of {_mib(to_move)} MiB ({_mib(transfer.present)} MiB already there)"
        if text != shown:  # at most one update per 0.1 MiB
            print(text, end="", file=sys.stderr, flush=True)
            shown = text

    return show


def _mib(count: int) -> str:
    return f"{count / (1 << 20):.1f}"


async def _with_progress(verb: str, operation: Callable[..., Awaitable[_Result]], *args: Any, **kwargs: Any) -> _Result:
    """``operation(*args, progress=..., **kwargs)`` with progress on a terminal and a last line when done."""
    progress = progress_printer(verb)
    result = await operation(*args, progress=progress, **kwargs)
    if progress is not None:
        transfer = result.transfer
        print(
            f"\rsmolvmm: {verb} {_mib(transfer.moved)} MiB, {_mib(transfer.present)} MiB already there" + " " * 20,
            file=sys.stderr,
        )
    return result


async def _push(args: argparse.Namespace) -> int:
    result = await _with_progress("sent", smolvmm.push, args.bundle, args.reference, insecure=args.insecure)
    print(f"{result.reference}@{result.digest}")
    return 0


async def _pull(args: argparse.Namespace) -> int:
    result = await _with_progress("fetched", smolvmm.pull, args.reference, args.output, insecure=args.insecure)
    print(f"{args.output}: {result.bundle_digest.hex()[:16]}")
    return 0


def run(name: str, args: argparse.Namespace) -> int:
    return anyio.run(_push if name == "push" else _pull, args, backend="trio")


async def resolve_bundle(bundle: Path, insecure: bool) -> Path:
    """``bundle`` itself when it is a file (or not a reference); else pulled into the local store."""
    if bundle.exists():
        return bundle
    try:
        reference = smolvmm.Reference.parse(str(bundle))
    except smolvmm.ConfigError:
        return bundle
    result = await _with_progress("fetched", smolvmm.pull, reference, insecure=insecure)
    return result.path
