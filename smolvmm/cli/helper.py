"""``smolvmm helper``: a warm process that ``run`` hands itself to, so a restore pays no start-up.

A CLI restore spends most of its time before the restore begins: starting the interpreter,
importing the monitor and, as root, preloading what the jail hides. The helper pays that once:
it imports everything a ``run`` needs, listens on ``helper.sock`` in this user's runtime
directory (``$XDG_RUNTIME_DIR/smolvmm/``, else ``/tmp/smolvmm-UID/``, 0700), and forks a child
per command; while none runs, a spare child waits forked ahead with its memory already copied
(``_spare``), so the next command pays neither the fork nor its copy-on-write faults.
``python -m smolvmm run ...`` connects to it first (``handoff.py``); the child gets the client's
stdin, stdout and stderr, working directory, umask and environment, runs the command as it
would have run in the client (jailed as root), and its exit status becomes the client's.
Signals the client gets (Ctrl-C, SIGTERM, SIGHUP) are forwarded to the child; a client that
goes away has its child sent SIGTERM. Without a helper, or when it refuses (another user,
another interpreter, or its code changed since it started: restart it), ``run`` runs in place.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import selectors
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import smolvmm
from smolvmm.cli import runtime as cli_runtime
from smolvmm.cli.handoff import FDS, FORWARDED, LENGTH, SOCKET_NAME, package, peer_uid, send_request

_MAX_REQUEST = 1 << 20
_MADV_POPULATE_WRITE = 23  # Linux 5.14
_REQUEST_SECONDS = 5.0


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket", type=Path, help=f"where to listen (default: {SOCKET_NAME} in the runtime directory)"
    )


def run(name: str, args: argparse.Namespace) -> int:
    import gc

    path = args.socket or cli_runtime.runtime_dir() / SOCKET_NAME
    with _Listening(path) as listener:  # commands that come meanwhile wait in its backlog
        smolvmm.Jail.preload()  # the monitor, the CLI and what a jail hides: every command's imports
        gc.freeze()  # a child's collections then leave the helper's objects, and their shared pages, alone
        print(f"smolvmm helper: serving run commands on {path} (pid {os.getpid()})", file=sys.stderr, flush=True)
        _Helper(listener, _code_stamp()).serve()
    return 0


class _Listening:
    """The listening socket at ``path`` (a stale one, nobody listening, is replaced), removed on exit."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> socket.socket:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with probe:
            try:
                probe.connect(str(self.path))
            except FileNotFoundError:
                pass
            except ConnectionRefusedError:
                self.path.unlink()
            else:
                raise smolvmm.UsageError(f"a helper already listens on {self.path}")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.listener.bind(str(self.path))
        finally:
            os.umask(old)
        self.listener.listen(16)
        return self.listener

    def __exit__(self, *_exc: object) -> None:
        self.listener.close()
        self.path.unlink(missing_ok=True)


class _Request(NamedTuple):
    argv: list[str]
    env: dict[str, str]
    umask: int
    executable: str
    package: str


class _Command(NamedTuple):
    conn: socket.socket
    pid: int
    pidfd: int


class _Spare(NamedTuple):
    """A child forked before its command, waiting on ``sock`` for it (see ``_spare``)."""

    pid: int
    sock: socket.socket


class _Helper:
    """Accept commands, fork a child for each, report each child's status to its client."""

    def __init__(self, listener: socket.socket, stamp: dict[str, int]) -> None:
        self.listener, self.stamp = listener, stamp
        self.selector = selectors.DefaultSelector()
        self.commands: dict[int, _Command] = {}  # by pidfd
        self.spare: _Spare | None = None

    def serve(self) -> None:
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        for signum in (signal.SIGINT, signal.SIGTERM):  # either stops the helper and its commands
            signal.signal(signum, signal.default_int_handler)
        try:
            while True:
                if self.spare is None and not self.commands:  # never beside a command: it would slow it
                    self._fork_spare()
                for key, _ in self.selector.select():
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "ended":
                        self._ended(self.commands[key.fd])
                    else:
                        self._client_gone(key.data)
        except KeyboardInterrupt:
            pass
        finally:
            self._stop_all()

    def _accept(self) -> None:
        """Take one command; a client that misbehaves or goes away costs only its own command."""
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        try:
            request, fds = self._admit(conn)
        except (_Refused, OSError, ValueError) as exc:
            _refuse(conn, str(exc))
            return
        try:
            pid = self._start(request, fds, conn)
        except OSError as exc:
            _refuse(conn, f"cannot start the command: {exc.strerror}")
            return
        finally:
            for fd in fds:
                os.close(fd)
        pidfd = os.pidfd_open(pid)
        command = _Command(conn, pid, pidfd)
        self.commands[pidfd] = command
        self.selector.register(pidfd, selectors.EVENT_READ, "ended")
        self.selector.register(conn, selectors.EVENT_READ, command)
        try:
            _send(conn, {"pid": pid})
        except OSError:
            pass  # the client went away: its end reads as closed, and its command is stopped
        print(f"smolvmm helper: pid {pid} runs: {' '.join(request.argv)}", file=sys.stderr, flush=True)

    def _start(self, request: _Request, fds: list[int], conn: socket.socket) -> int:
        """The pid of the child that runs ``request``: the spare, else one forked now."""
        spare, self.spare = self.spare, None
        if spare is not None:
            with spare.sock:
                try:
                    send_request(spare.sock, request._asdict(), fds)
                    return spare.pid
                except OSError:  # it died waiting: reaped, and the command forked instead
                    os.kill(spare.pid, signal.SIGKILL)
                    os.waitpid(spare.pid, 0)
        return _fork(lambda: _child(request, fds, [conn.fileno(), *self._descriptors()]))

    def _fork_spare(self) -> None:
        """Fork the child that the next command goes to; it makes its memory its own meanwhile."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            pid = _fork(lambda: _spare(theirs, [ours.fileno(), *self._descriptors()]))
        except OSError:
            ours.close()  # no spare: the next command is forked when it comes
            return
        finally:
            theirs.close()
        self.spare = _Spare(pid, ours)

    def _admit(self, conn: socket.socket) -> tuple[_Request, list[int]]:
        uid = peer_uid(conn)
        if uid != os.getuid():
            raise _Refused(f"uid {uid} is not the helper's user")
        conn.settimeout(_REQUEST_SECONDS)  # a client that sends nothing holds up the others 5 s at most
        request, fds = _receive(conn)
        conn.settimeout(None)
        refusal = self._refusal(request)
        if refusal:
            for fd in fds:
                os.close(fd)
            raise _Refused(refusal)
        return request, fds

    def _descriptors(self) -> list[int]:
        """The helper's own descriptors, which a child closes: its listener, selector, the spare's
        socket, and every other command's connection and pidfd."""
        others = [fd for command in self.commands.values() for fd in (command.conn.fileno(), command.pidfd)]
        spare = [self.spare.sock.fileno()] if self.spare is not None else []
        return [self.listener.fileno(), self.selector.fileno(), *spare, *others]

    def _refusal(self, request: _Request) -> str | None:
        if request.executable != sys.executable or request.package != package():
            return f"it runs {sys.executable} with {package()}"
        if _code_stamp() != self.stamp:
            return "its code changed since it started: restart it"
        return None

    def _client_gone(self, command: _Command) -> None:
        """The client closed its end (it sends nothing after its request): end its command."""
        self.selector.unregister(command.conn)
        try:
            os.kill(command.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def _ended(self, command: _Command) -> None:
        _, wait_status = os.waitpid(command.pid, 0)
        status = os.waitstatus_to_exitcode(wait_status)
        status = 128 - status if status < 0 else status  # killed by signal N: 128 + N, as a shell says
        print(f"smolvmm helper: pid {command.pid} ended with status {status}", file=sys.stderr, flush=True)
        self.selector.unregister(command.pidfd)
        if command.conn in (key.fileobj for key in self.selector.get_map().values()):
            self.selector.unregister(command.conn)
        try:
            _send(command.conn, {"status": status})
        except OSError:
            pass
        command.conn.close()
        os.close(command.pidfd)
        del self.commands[command.pidfd]

    def _stop_all(self) -> None:
        """Stopping the helper stops the commands it runs (each told with SIGTERM, then awaited)
        and its spare (which ends when its socket closes)."""
        if self.spare is not None:
            self.spare.sock.close()
            os.waitpid(self.spare.pid, 0)
            self.spare = None
        for command in list(self.commands.values()):
            try:
                os.kill(command.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for command in list(self.commands.values()):
            self._ended(command)


class _Refused(Exception):
    pass


def _fork(child: Callable[[], None]) -> int:
    """Fork, ``child`` running in the child (it never returns); the child's pid. The forwarded
    signals stay blocked across the fork: the client forwards its signals as soon as it knows the
    child, and they wait until the child has its own handlers (``_child`` unblocks them)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        pid = os.fork()
        if pid == 0:
            child()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    return pid


def _receive(conn: socket.socket) -> tuple[_Request, list[int]]:
    """One request: a length, the JSON it measures, and the client's four descriptors."""
    header, ancillary, _, _ = conn.recvmsg(LENGTH.size, socket.CMSG_SPACE(FDS * 4))
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    try:
        if len(fds) != FDS or len(header) != LENGTH.size:
            raise _Refused("a request needs a length and four descriptors")
        (length,) = LENGTH.unpack(header)
        if length > _MAX_REQUEST:
            raise _Refused(f"a request of {length} bytes")
        body = b""
        while len(body) < length:
            chunk = conn.recv(length - len(body))
            if not chunk:
                raise _Refused("the request ended early")
            body += chunk
        value = json.loads(body)
        if not isinstance(value, dict):
            raise _Refused("a request is a JSON object")
        argv, env, umask = value.get("argv"), value.get("env"), value.get("umask")
        if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv) and argv and argv[0] == "run"):
            raise _Refused("the helper runs only `run` commands")
        if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            raise _Refused("a request's environment is strings")
        if not (isinstance(umask, int) and 0 <= umask <= 0o777):
            raise _Refused("a request's umask is a file mode")
        request = _Request(argv, env, umask, str(value.get("executable")), str(value.get("package")))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return request, list(fds)


def _send(conn: socket.socket, message: dict[str, object]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _refuse(conn: socket.socket, reason: str) -> None:
    try:
        _send(conn, {"refused": reason})
    except OSError:
        pass
    conn.close()


def _code_stamp() -> dict[str, int]:
    """The modification time of every loaded module of smolvmm and smolformat, by file."""
    stamp = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and module.__name__.split(".")[0] in ("smolvmm", "smolformat"):
            try:
                stamp[path] = os.stat(path).st_mtime_ns
            except OSError:
                stamp[path] = -1
    return stamp


def _spare(sock: socket.socket, inherited: list[int]) -> None:
    """In a child forked ahead of its command: copy now the helper's pages it would write, then
    wait for the command on ``sock`` and run it; ends quietly when the helper closes ``sock``."""
    try:
        for fd in inherited:
            os.close(fd)
        _own_memory()
        request, fds = _receive(sock)
        sock.close()
    except BaseException:  # noqa: BLE001 - the helper stopped, or sent nonsense: nothing ran
        os._exit(0)
    _child(request, fds, [])


def _own_memory() -> None:
    """Copy now every page this fork shares with the helper and may write (its private writable
    mappings, ``MADV_POPULATE_WRITE``), so that its command takes none of those copy-on-write
    faults as it runs: about 2,000 natively, each far dearer in a nested machine. The helper's
    memory is the interpreter and its modules (tens of MiB), so the copy is as large; a kernel
    before 5.14 refuses the advice and leaves the faults to the command."""
    import ctypes

    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split(maxsplit=2)[:2]
            if perms.startswith("rw") and perms[3] == "p":
                start, end = (int(edge, 16) for edge in span.split("-"))
                madvise(start, end - start, _MADV_POPULATE_WRITE)


def _child(request: _Request, fds: list[int], inherited: list[int]) -> None:
    """In the forked child: become the client's process and run its command; never returns."""
    status = 1
    try:
        os.setsid()  # no controlling terminal: the client's terminal is only its descriptors
        for fd in inherited:
            os.close(fd)
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        os.fchdir(fds[3])
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.umask(request.umask)
        os.environ.clear()
        os.environ.update(request.env)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a Python process starts
        # The streams as the client's interpreter would have made them for its descriptors.
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
        sys.argv = ["smolvmm", *request.argv]
        from smolvmm.cli import status as cli_status
        from smolvmm.cli.dispatch import main

        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
            status = main(request.argv)
        except KeyboardInterrupt:  # before the command's own handling began
            status = cli_status.INTERRUPTED
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child must end here, never return into the helper's loop
        status = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)
