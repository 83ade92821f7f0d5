"""``smolvmm run ... BUNDLE -- CMD [ARGS...]``: run one command in a fresh clone and exit with its status.

The clone is resumed with ``--env`` and ``--secret-env`` values, ``--copy-in`` files are
uploaded, CMD's stdout and stderr stream to ours byte for byte (our stdin goes to its stdin),
``--copy-out`` files are downloaded, and the clone stops. The exit status is CMD's (128+N when
a signal N killed it). Only the public API is used.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

import anyio

import smolformat
from smolvmm import BundleError, ConfigError, ImageConfig, Machine, Process, bundle_image_config
from smolvmm.cli import args as cli_args
from smolvmm.cli import output as cli_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``run`` that only a command uses, and the command itself (after ``--``)."""
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        type=cli_args.assignment,
        metavar="K=V",
        help="an environment variable every command in the clone sees (repeatable)",
    )
    parser.add_argument(
        "--secret-env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass host environment variable NAME as a secret: held only in the guest agent's"
        " memory, never saved in a snapshot (repeatable)",
    )
    parser.add_argument(
        "--copy-in",
        action="append",
        default=[],
        metavar="HOST:GUEST",
        help="copy a host file into the clone before the command (repeatable)",
    )
    parser.add_argument(
        "--copy-out",
        action="append",
        default=[],
        metavar="GUEST:HOST",
        help="copy a guest file out after the command (repeatable)",
    )
    parser.add_argument(
        "command",
        nargs="*",
        default=[],  # else argparse lists it as required
        metavar="-- CMD [ARGS...]",
        help="run CMD in the clone instead of attaching the console; exit with its status",
    )


def _pair(spec: str, flag: str) -> tuple[str, str]:
    first, colon, second = spec.partition(":")
    if not colon or not first or not second:
        raise ConfigError(f"{flag} {spec!r}: expected SOURCE:DESTINATION")
    return first, second


def identity(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    """(env, secrets) from ``--env K=V`` and ``--secret-env NAME`` (NAME's value from our environment)."""
    env = dict(args.env)
    secrets: dict[str, str] = {}
    for name in args.secret_env:
        if not name:
            raise ConfigError("--secret-env needs the NAME of a variable set here")
        if "=" in name:  # a value typed by mistake: not repeated on stderr
            raise ConfigError(f"--secret-env {name.partition('=')[0]}=...: give the NAME of a variable set here")
        if name not in os.environ:
            raise ConfigError(f"--secret-env {name}: {name} is not set in this environment")
        secrets[name] = os.environ[name]
    return env, secrets


def image_config(bundle: Path) -> ImageConfig | None:
    """The image config of ``bundle``, or None when it was not built from an image."""
    try:
        with smolformat.open_bundle(bundle) as opened:
            labels = opened.labels
    except smolformat.FormatError as exc:
        raise BundleError(f"{bundle}: {exc}") from exc
    except OSError as exc:
        raise BundleError(f"cannot open {bundle}: {exc.strerror or exc}") from exc
    return bundle_image_config(labels)


async def _pump_out(output: AsyncIterator[bytes], fd: int) -> None:
    async for chunk in output:
        await cli_output.write_all(fd, chunk)


async def _pump_in(process: Process) -> None:
    try:
        while True:
            data = await cli_output.read_stdin(65536)
            if not data:
                break
            await process.stdin.send(data)
        await process.stdin.aclose()
    except (anyio.BrokenResourceError, OSError):
        pass  # the command ended first, or there is no stdin


async def attach(process: Process) -> int:
    """Our stdin to the process, its stdout and stderr to ours, until it ends; its exit status."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_pump_in, process)
        async with anyio.create_task_group() as outputs:
            outputs.start_soon(_pump_out, process.stdout, sys.stdout.fileno())
            outputs.start_soon(_pump_out, process.stderr, sys.stderr.fileno())
        status = await process.wait()
        tg.cancel_scope.cancel()
    return status


def copy_in_files(args: argparse.Namespace, opened: contextlib.ExitStack) -> list[tuple[BinaryIO, str]]:
    """The ``--copy-in HOST:GUEST`` pairs, each host file opened now (into ``opened``): a jail
    hides the host's files once the machine is assembled."""
    files: list[tuple[BinaryIO, str]] = []
    for host, guest in (_pair(spec, "--copy-in") for spec in args.copy_in):
        if not Path(host).is_file():
            said = "not a regular file" if Path(host).exists() else "no such file"
            raise ConfigError(f"--copy-in {host}: {said}")
        try:
            files.append((opened.enter_context(open(host, "rb")), guest))
        except OSError as exc:
            raise ConfigError(f"--copy-in {host}: {exc.strerror}") from None
    return files


async def run_command(
    machine: Machine,
    args: argparse.Namespace,
    copy_in: list[tuple[BinaryIO, str]],
    copy_out: list[tuple[str, str]],
    image: ImageConfig | None = None,
) -> int:
    """In the clone ``machine``: upload ``copy_in``, run ``args.command``, or in a bundle built
    from ``image`` the image's own command (with its Env, WorkingDir and User), download
    ``copy_out``; returns the command's exit status."""
    for source, guest in copy_in:
        await machine.files.upload(source, guest)
    if image is None:
        process = machine.process(args.command)
    else:
        from smolvmm import image_process

        process = image_process(machine, image, args.command or None, dict(args.env))
    async with process as started:
        status = await attach(started)
    for guest, host in copy_out:
        await machine.files.download(guest, host)
    return status


def copy_out_files(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The ``--copy-out GUEST:HOST`` pairs, each host path where the file will be written
    (``cli_args.output_file``: what a jail stages and publishes), checked before the clone
    starts: a download that cannot be written would fail only after CMD ran."""
    files = []
    for guest, host in (_pair(spec, "--copy-out") for spec in args.copy_out):
        target = cli_args.output_file(host)
        if os.path.isdir(target):
            raise ConfigError(f"--copy-out {host}: is a directory (name the file to write)")
        if not os.path.isdir(os.path.dirname(target)):
            raise ConfigError(f"--copy-out {host}: no such directory {os.path.dirname(target)}")
        files.append((guest, target))
    return files
