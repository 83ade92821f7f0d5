"""``run --detach`` and ``smolvmm attach ID``: a machine in the background, its console reachable by id.

The detached process is an ordinary ``run`` in a new session whose console is a Unix socket
beside its ps entry (``ID.console`` in the runtime directory, which is private to the user). One
client is attached at a time; output while nobody is attached is kept (the last 64 KiB) for the
next one. ``exec ID -- CMD`` runs commands in it (``control``); ``stop ID`` ends it as it ends any
machine.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketListener, SocketStream

import smolvmm
from smolvmm.cli import output as cli_output
from smolvmm.cli import ps as cli_ps
from smolvmm.cli import runtime as cli_runtime
from smolvmm.cli import status as cli_status

KEPT = 64 << 10  # console output kept while no client is attached
START_TIMEOUT = 300  # seconds for a detached restore to list itself (restores in the nested machine are slow)


def start(args: argparse.Namespace) -> int:
    """Start ``run`` of ``args.bundle`` in the background; once its machine runs, says its forwards
    on stderr (as ``run`` does) and prints its id."""
    machine_id = cli_ps.new_id()
    directory = cli_runtime.runtime_dir()
    log = log_path(machine_id)
    flags = [f"--net={spec}" for spec in args.net]
    flags += [f"--console-socket={args.console_socket}"] if args.console_socket else []
    flags += [f"--save={args.save}"] if args.save else []
    flags += [f"--trusted-keys={args.trusted_keys}"] if args.trusted_keys else []
    flags += ["--insecure"] if args.insecure else []
    flags += ["--jail"] if args.jail else ["--no-jail"] if args.no_jail else []
    flags += [f"--jail-user={args.jail_user}"] if args.jail_user else []
    flags += [f"--env={name}={value}" for name, value in args.env] + [
        f"--secret-env={name}" for name in args.secret_env
    ]
    bundle = str(args.bundle)
    # after --, run takes a command to run in the clone: a bundle named like a flag gets ./ instead
    bundle = f"./{bundle}" if bundle.startswith("-") else bundle
    argv = [sys.executable, "-m", "smolvmm", "run", f"--detached-as={machine_id}", *flags, bundle]
    with open(log, "wb") as errors:
        child = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True
        )
    entry_path = directory / f"{machine_id}.json"
    deadline = time.monotonic() + START_TIMEOUT
    while (entry := _started_entry(entry_path)) is None:
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            try:
                said = log.read_text(errors="replace").strip().splitlines()
            except FileNotFoundError:  # a machine that ended cleanly at once removed it
                said = []
            log.unlink(missing_ok=True)
            sys.stderr.write(
                (said[-1] if said else f"smolvmm: error: the detached run ended ({child.returncode})") + "\n"
            )
            return child.wait() or cli_status.ERROR
        time.sleep(0.05)
    for forward in cli_ps.forwards(entry):  # as `run` in the foreground says them, with the ports bound
        cli_output.message(cli_ps.describe_forward(forward))
    cli_output.result(machine_id)
    return cli_status.OK


def _started_entry(path: Path) -> dict[str, Any] | None:
    """The ps entry at ``path`` once its machine runs (``ps.started`` added its forwards), else None."""
    try:
        entry = cli_ps.read_entry(path)
    except (OSError, ValueError):
        return None
    return entry if "forwards" in entry else None


def console_path(machine_id: str) -> Path:
    """Where a detached machine serves its console."""
    return cli_runtime.runtime_dir() / f"{machine_id}.console"


def log_path(machine_id: str) -> Path:
    """Where a detached machine's process writes its errors."""
    return cli_runtime.runtime_dir() / f"{machine_id}.log"


@dataclass
class Sockets:
    """A detached machine's console and control listeners, made before the machine is assembled
    (a jail would hide the runtime directory after), and what it leaves in the runtime directory."""

    console: SocketListener
    control: SocketListener
    paths: tuple[Path, ...]
    log: Path

    @classmethod
    async def open(cls, machine_id: str) -> Sockets:
        """Listen on ``machine_id``'s console and control sockets."""
        from smolvmm.cli import control as cli_control

        paths = (console_path(machine_id), cli_control.path(machine_id))
        listeners = []
        try:
            for path in paths:  # bound here: anyio's create_unix_listener binds in a worker thread,
                # which would still run when the jail is entered, and the jail takes one thread only
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listeners.append(listener)
                listener.bind(str(path))
                listener.listen()
            console, control = [await SocketListener.from_socket(listener) for listener in listeners]
        except BaseException:
            for listener in listeners:
                listener.close()
            for path in paths:
                path.unlink(missing_ok=True)
            raise
        return cls(console, control, paths, log_path(machine_id))

    def ended(self, clean: bool) -> None:
        """The machine ended: remove the sockets, and the log unless it explains a failure (a jailed
        monitor cannot: its keeper removes them, and keeps the log when told)."""
        for path in (*self.paths, self.log) if clean else self.paths:
            path.unlink(missing_ok=True)  # in a jail, these paths are not there
        if not clean:
            smolvmm.Jail.keep(self.log)


async def serve_console(machine: smolvmm.Machine, listener: SocketListener) -> None:
    """Serve the machine's console on ``listener`` until the machine ends. Only this function's own
    loop writes to the attached client (a stream takes one writer at a time)."""
    kept = bytearray()
    attached: list[SocketStream] = []

    async def client(stream: SocketStream) -> None:
        async with stream:
            if attached:
                await stream.send(b"smolvmm: another client is attached\r\n")
                return
            attached.append(stream)
            try:
                async for data in stream:
                    await machine.console.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            finally:
                attached.remove(stream)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, client)
        async for chunk in machine.console:
            kept.extend(chunk)
            del kept[:-KEPT]
            if attached:  # what came while nobody was attached, then this
                try:
                    await attached[0].send(bytes(kept))
                    kept.clear()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass
        tg.cancel_scope.cancel()


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", metavar="ID", help="a machine started with `run --detach` (a unique prefix will do)")


def run(name: str, args: argparse.Namespace) -> int:
    """``attach ID``: the console on stdin/stdout until the machine ends (or Ctrl-] detaches)."""
    entry = cli_ps.lookup(args.id)
    if not entry.get("console"):
        raise smolvmm.ConfigError(
            f"machine {entry['id']} was not started with `run --detach`: its console is its own terminal's"
        )
    return anyio.run(_attach, entry, backend="trio")


async def _attach(entry: dict[str, Any]) -> int:
    try:
        stream = await anyio.connect_unix(entry["console"])
    except OSError as exc:
        raise smolvmm.SmolvmmError(f"cannot reach machine {entry['id']}'s console: {exc.strerror}") from exc
    async with stream, anyio.create_task_group() as tg:
        with cli_output.raw_terminal() as interactive:
            if interactive:
                cli_output.message(f"attached to {entry['id']}; Ctrl-] detaches (the machine keeps running)\r")
            tg.start_soon(_forward_input, stream, interactive, tg.cancel_scope)
            async for chunk in stream:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            tg.cancel_scope.cancel()
    return cli_status.OK


async def _forward_input(stream: SocketStream, interactive: bool, scope: anyio.CancelScope) -> None:
    while data := await cli_output.read_stdin():
        if interactive and cli_output.ESCAPE_KEY in data:
            scope.cancel()  # detach: the machine keeps running
            return
        await stream.send(data)
    # EOF on stdin: keep showing the console until the machine ends
