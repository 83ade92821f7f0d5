"""The client side of ``smolvmm helper``: a ``run`` hands itself to this user's warm helper.

Every ``python -m smolvmm run`` starts here, so this module imports only what the hand-off needs.
"""

from __future__ import annotations

import array
import io
import json
import os
import signal
import socket
import struct
import sys

from smolvmm.cli import runtime as cli_runtime

SOCKET_NAME = "helper.sock"
FDS = 4  # stdin, stdout, stderr, the working directory, passed with the request
LENGTH = struct.Struct("!I")  # the request's length, before its JSON
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def hand_off(argv: list[str]) -> int | None:
    """Run ``argv`` in this user's helper and return its exit status, or None when no helper
    takes it (then the caller runs it in place)."""
    path = _socket_path()
    if path is None:
        return None
    forwarder = _Forwarder()  # from now: a signal that comes before the child is known waits for it
    status = _exchange(argv, path, forwarder)
    if status is None:
        forwarder.restore()
    return status


def _exchange(argv: list[str], path: str, forwarder: _Forwarder) -> int | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        conn.connect(path)
        if peer_uid(conn) != os.getuid():  # the command's streams and environment go to this user only
            raise ConnectionRefusedError
    except OSError:
        conn.close()
        return None
    with conn:
        umask = os.umask(0)
        os.umask(umask)
        request = {
            "argv": argv,
            "env": dict(os.environ),
            "umask": umask,
            "executable": sys.executable,
            "package": package(),
        }
        try:
            cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # fails if it was removed
        except OSError:
            return None
        try:
            send_request(conn, request, [0, 1, 2, cwd])
        except OSError:
            return None
        finally:
            os.close(cwd)
        replies = conn.makefile("rb")
        first = _reply(replies)
        pid = first.get("pid")
        if not isinstance(pid, int):
            if "refused" in first:
                print(
                    f"smolvmm: the helper did not take the command ({first['refused']}); running it here",
                    file=sys.stderr,
                )
            return None
        forwarder.to(pid)
        status = _reply(replies).get("status")
        if not isinstance(status, int):
            print("smolvmm: error: the helper stopped before the command ended", file=sys.stderr)
            return 1
        return status


def send_request(conn: socket.socket, request: dict[str, object], fds: list[int]) -> None:
    """A command as the helper reads it: the length of its JSON, the JSON, and its ``FDS``
    descriptors (stdin, stdout, stderr, working directory), which go with the first bytes."""
    body = json.dumps(request).encode()
    data = LENGTH.pack(len(body)) + body
    sent = conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    if sent < len(data):  # (never an empty send: the reader may have everything and be gone)
        conn.sendall(data[sent:])


def _socket_path() -> str | None:
    """The helper's socket in this user's runtime directory, if that is private and the socket
    there; nothing created, and no pathlib (~4 ms of imports), since every ``run`` pays for this."""
    directory = cli_runtime.runtime_location()
    path = os.path.join(directory, SOCKET_NAME)
    return path if cli_runtime.is_private(directory) and os.path.exists(path) else None


def package() -> str:
    """The smolvmm package this process runs: a helper serves only clients of the same one."""
    return os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def peer_uid(conn: socket.socket) -> int:
    return int(struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1])


def _reply(replies: io.BufferedReader) -> dict[str, object]:
    """The helper's next message, empty if it sent none (it ended) or nonsense."""
    try:
        value = json.loads(replies.readline() or b"{}")
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class _Forwarder:
    """The client's Ctrl-C, SIGTERM, SIGHUP and SIGQUIT (those it does not ignore), passed on to the
    helper's child once it is known; ``restore`` puts the handlers back and delivers what came
    meanwhile to this process, for a command that runs in place after all."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.pending: list[int] = []
        self.previous = {
            signum: signal.signal(signum, self._caught)
            for signum in FORWARDED
            if signal.getsignal(signum) is not signal.SIG_IGN
        }

    def _caught(self, signum: int, _frame: object) -> None:
        if self.pid is None:
            self.pending.append(signum)
        else:
            _kill(self.pid, signum)

    def to(self, pid: int) -> None:
        self.pid = pid
        for signum in self.pending:
            _kill(pid, signum)

    def restore(self) -> None:
        for forwarded, handler in self.previous.items():
            signal.signal(forwarded, handler)
        for signum in self.pending:
            signal.raise_signal(signum)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
