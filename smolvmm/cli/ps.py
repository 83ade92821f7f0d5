"""``smolvmm ps`` and ``smolvmm stop ID``: the machines this user's smolvmm processes run.

Each ``boot`` or ``run`` writes one JSON entry, atomically, to ``$XDG_RUNTIME_DIR/smolvmm/`` (or
``/tmp/smolvmm-UID/`` where XDG_RUNTIME_DIR is unset) while its machine runs and removes it when
the machine ends. An entry whose process is gone (or whose pid now belongs to another process)
is stale: it is ignored, and removed by the next ``ps``. Once the machine runs, ``started``
adds its port forwards (``forwards``, host ports as bound: ``forward=0:80`` picks one); an
entry without them (a machine still starting, or listed by an older smolvmm) has none.
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
from typing import TYPE_CHECKING, Any

import smolvmm
from smolvmm.cli import output as cli_output
from smolvmm.cli import runtime as cli_runtime
from smolvmm.cli import status as cli_status
from smolvmm.cli.args import positive_float

if TYPE_CHECKING:
    from smolvmm import PortForward

ANY_ADDRESS = "0.0.0.0"  # a forward listens on every host address (and on :: where the host has IPv6)
READ_TRIES = 3  # an entry read while ``started`` rewrites it may be torn: read it again

# The open entry files of this process's machines, by id: ``started`` rewrites one through its
# descriptor, which still reaches it after a jail has hidden the runtime directory.
_entries: dict[str, tuple[int, dict[str, Any]]] = {}


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
        _entries[machine_id] = (os.open(path, os.O_WRONLY | os.O_CLOEXEC), entry)
    except (OSError, smolvmm.SmolvmmError) as exc:
        cli_output.message(f"note: smolvmm ps will not list this machine: {getattr(exc, 'strerror', None) or exc}")
    try:
        yield machine_id
    finally:
        opened = _entries.pop(machine_id, None)
        if opened is not None:
            os.close(opened[0])
        if path is not None:
            path.unlink(missing_ok=True)


def started(machine_id: str, forwards: tuple[PortForward, ...]) -> None:
    """The machine listed as ``machine_id`` runs, with ``forwards``: its entry says so (which
    ``run --detach`` waits for). Rewritten in place through the descriptor ``registered`` keeps,
    since a jailed monitor can no longer reach the runtime directory (the entry only grows, so a
    reader sees the old entry, the new one, or a torn one that ``running`` reads again)."""
    opened = _entries.get(machine_id)
    if opened is None:
        return  # not listed
    fd, entry = opened
    entry["forwards"] = [
        {"host_address": ANY_ADDRESS, "host_port": f.host, "guest_port": f.guest, "protocol": f.protocol}
        for f in forwards
    ]
    data = json.dumps(entry).encode()
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    except OSError as exc:
        cli_output.message(f"note: smolvmm ps will not show this machine's forwards: {exc.strerror}")


def forwards(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """An entry's forwards; none where it has none (a machine still starting, an older entry)."""
    listed = entry.get("forwards")
    return listed if isinstance(listed, list) else []


def describe_forward(forward: dict[str, Any]) -> str:
    """One forward as ``run`` reports it: ``forwarding host port 8080/tcp to guest port 80``."""
    return f"forwarding host port {forward['host_port']}/{forward['protocol']} to guest port {forward['guest_port']}"


def read_entry(path: Path) -> dict[str, Any]:
    """An entry; ValueError if it is still not JSON after ``READ_TRIES`` reads (torn while rewritten)."""
    for _ in range(READ_TRIES - 1):
        try:
            return dict(json.loads(path.read_text()))
        except ValueError:
            time.sleep(0.01)
    return dict(json.loads(path.read_text()))


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
            entry = read_entry(path)
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
            cli_output.result_json([{**e, "forwards": forwards(e)} for e in entries])
        else:
            now = time.time()
            shown = [_forwards_column(e) for e in entries]
            width = max([len("FORWARDS"), *map(len, shown)]) + 2
            rows = [f"{'ID':<10}{'PID':>8}  {'COMMAND':<8}{'UP':>8}  {'FORWARDS':<{width}}WHAT"]
            rows += [
                f"{e['id']:<10}{e['pid']:>8}  {e['command']:<8}{_duration(now - e['started_unix']):>8}"
                f"  {column:<{width}}{e['what']}"
                for e, column in zip(entries, shown)
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


def _forwards_column(entry: dict[str, Any]) -> str:
    """``ps``'s FORWARDS: ``8080->80/tcp`` for each (as ``docker ps`` shows ports), or ``-``."""
    listed = forwards(entry)
    return ",".join(f"{f['host_port']}->{f['guest_port']}/{f['protocol']}" for f in listed) if listed else "-"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"
