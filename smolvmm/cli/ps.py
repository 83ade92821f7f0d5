"""``smolvmm ps`` and ``smolvmm stop ID``: the machines this user's smolvmm processes run.

Each ``boot`` or ``run`` writes one JSON entry, atomically, to ``$XDG_RUNTIME_DIR/smolvmm/`` (or
``/tmp/smolvmm-UID/`` where XDG_RUNTIME_DIR is unset) while its machine runs and removes it when
the machine ends. An entry whose process is gone (or whose pid now belongs to another process)
is stale: it is ignored, and removed by the next ``ps``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import smolvmm
from smolvmm.cli import output as cli_output
from smolvmm.cli import runtime as cli_runtime
from smolvmm.cli import status as cli_status
from smolvmm.cli.args import positive_float


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), or None if it
    is gone or has ended (a zombie its parent has not reaped yet)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold anything
    return None if fields[0] in ("Z", "X") else fields[19]


def new_id() -> str:
    """A fresh machine id: 8 hex digits."""
    return secrets.token_hex(4)


@contextlib.contextmanager
def registered(command: str, what: str, machine_id: str | None = None, console: Path | None = None) -> Iterator[str]:
    """List this process's machine (``command`` boot/run, ``what`` it runs) until the block ends; yields its id.

    Where no entry can be written (a read-only or foreign runtime directory) the machine runs
    anyway, unlisted, and a note says why."""
    machine_id = machine_id or new_id()
    entry = {
        "id": machine_id,
        "pid": os.getpid(),
        "pid_started": _started(os.getpid()),
        "command": command,
        "what": what,
        "started_unix": time.time(),
        "console": None if console is None else str(console),
    }
    path: Path | None = None
    try:
        import tempfile  # here: a restore's start-up does not wait for it

        directory = cli_runtime.runtime_dir()
        with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".", suffix=".tmp", delete=False) as tmp:
            json.dump(entry, tmp)
        path = directory / f"{machine_id}.json"
        os.replace(tmp.name, path)
    except (OSError, smolvmm.SmolvmmError) as exc:
        cli_output.message(f"note: smolvmm ps will not list this machine: {getattr(exc, 'strerror', None) or exc}")
    try:
        yield machine_id
    finally:
        if path is not None:
            path.unlink(missing_ok=True)


def entry_file(machine_id: str) -> Path | None:
    """The file ``registered`` listed ``machine_id`` in, or None if it could not write one."""
    try:
        path = cli_runtime.runtime_dir() / f"{machine_id}.json"
    except smolvmm.SmolvmmError:
        return None
    return path if path.exists() else None


def running() -> list[dict[str, Any]]:
    """The entries of machines still running, oldest first; stale entries are removed."""
    directory = cli_runtime.runtime_dir()
    entries = []
    for path in directory.glob("*.json"):
        try:
            entry = json.loads(path.read_text())
            alive = entry["pid_started"] is not None and _started(int(entry["pid"])) == entry["pid_started"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written or removed, or not ours to judge
        if alive:
            entries.append(entry)
        else:
            for leftover in (path, *(path.with_suffix(suffix) for suffix in (".console", ".control", ".log"))):
                leftover.unlink(missing_ok=True)
    return sorted(entries, key=lambda e: e["started_unix"])


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    if name == "ps":
        parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    else:
        parser.add_argument("id", metavar="ID", help="the machine's id (as ps shows it; a unique prefix will do)")
        parser.add_argument(
            "--timeout",
            type=positive_float,
            default=10,
            help="seconds to wait for it to stop before killing its process (default 10)",
        )


def run(name: str, args: argparse.Namespace) -> int:
    entries = running()
    if name == "ps":
        if args.json:
            cli_output.result_json(entries)
        else:
            now = time.time()
            rows = [f"{'ID':<10}{'PID':>8}  {'COMMAND':<8}{'UP':>8}  WHAT"]
            rows += [
                f"{e['id']:<10}{e['pid']:>8}  {e['command']:<8}{_duration(now - e['started_unix']):>8}  {e['what']}"
                for e in entries
            ]
            cli_output.result("\n".join(rows))
        return cli_status.OK
    return _stop(lookup(args.id, entries), args.timeout)


def lookup(machine_id: str, entries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The running machine whose id starts with ``machine_id``; ConfigError unless exactly one does."""
    entries = running() if entries is None else entries
    matches = [e for e in entries if e["id"].startswith(machine_id)]
    if len(matches) != 1:
        known = ", ".join(e["id"] for e in entries) or "none is running"
        raise smolvmm.ConfigError(
            f"{'no' if not matches else 'more than one'} machine {machine_id!r} (smolvmm ps: {known})"
        )
    return matches[0]


def _stop(entry: dict[str, Any], timeout: float) -> int:
    """SIGTERM (the machine stops and its process ends), then SIGKILL after ``timeout`` seconds."""
    pid, started = int(entry["pid"]), entry["pid_started"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _started(pid) == started and time.monotonic() < deadline:
        time.sleep(0.05)
    if _started(pid) == started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        cli_output.result(f"{entry['id']}: killed (it did not stop within {timeout:g} s)")
        return cli_status.ERROR
    cli_output.result(f"{entry['id']}: stopped")
    return cli_status.OK


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"
