"""The jail's keeper: a small process left outside the jail that publishes the files a jailed monitor writes.

A jailed monitor runs as an unprivileged user in an empty root, so it cannot create files in its
user's directories. Each directory that is to receive one of its files (``run --save``,
``--copy-out``) gets a private staging directory beside the file's place, owned by the jail's
user; the jail binds it at the directory's own path, so the monitor writes there as usual
(atomically). Then the monitor asks the keeper, over a socket pair, to publish the file: the
keeper, still the invoking user, checks that it is a regular file of the jail's user, gives it to
the invoking user and renames it into place (one rename within the directory's filesystem). It
publishes only the paths it was started with. When the monitor's end of the socket closes (it
finished, or died), the keeper removes the staging directories and the files it was given to
discard (what the monitor made before the jail and can no longer remove: its ``smolvmm ps``
entry, a detached machine's sockets and log), but those the monitor asked it to keep (a log
that explains a failure), and exits.

Requests are lines: ``publish PATH`` (answered ``ok`` or with why not) and ``keep PATH`` (``ok``).

The keeper runs this file as a script (``python -I -S``: only the standard library, no site
packages, quick to start), spawned before the jail is entered, in a session of its own so a
terminal's Ctrl-C cannot end it before it has cleaned up.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable

_MAX_REQUEST = 8192


class KeeperError(Exception):
    """The keeper could not publish a file (the line says why)."""


class Keeper:
    """The monitor's end of a running keeper."""

    def __init__(self, outputs: Iterable[str], uid: int, gid: int, discard: Iterable[str] = ()) -> None:
        """Stage a directory for each of ``outputs`` (absolute paths of files to be published), owned
        by ``uid``:``gid``, and start the keeper process, which removes ``discard`` at the end."""
        self.outputs = tuple(dict.fromkeys(outputs))
        self.staging: dict[str, str] = {}
        self._socket, theirs = socket.socketpair()
        try:
            with theirs:
                for directory in dict.fromkeys(os.path.dirname(path) for path in self.outputs):
                    staged = tempfile.mkdtemp(prefix=".smolvmm-jail-", dir=directory)
                    self.staging[directory] = staged
                    os.chown(staged, uid, gid)
                task = {"uid": uid, "staging": self.staging, "outputs": self.outputs, "discard": list(discard)}
                argv = [sys.executable, "-I", "-S", __file__, str(theirs.fileno()), json.dumps(task)]
                self._process = subprocess.Popen(
                    argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True
                )
        except BaseException:
            self._socket.close()
            _remove(self.staging.values())
            raise

    def publish(self, path: str) -> None:
        """Move ``path``, written in its staging directory, into place; KeeperError if it cannot."""
        self._ask("publish", path)

    def keep(self, path: str) -> None:
        """Leave ``path``, one of the files to discard, where it is at the end."""
        self._ask("keep", path)

    def _ask(self, verb: str, path: str) -> None:
        self._socket.sendall(f"{verb} ".encode() + os.fsencode(path) + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = self._socket.recv(_MAX_REQUEST)
            if not chunk:
                raise KeeperError(f"cannot {verb} {path}: the jail's keeper has ended")
            answer += chunk
        if answer != b"ok\n":
            raise KeeperError(answer.decode(errors="replace").strip())

    def close(self) -> None:
        """Let the keeper remove the staging directories, and wait until it has."""
        self._socket.shutdown(socket.SHUT_WR)
        while self._socket.recv(_MAX_REQUEST):
            pass
        self._socket.close()
        self._process.wait()


def _remove(directories: Iterable[str], files: Iterable[str] = ()) -> None:
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)  # rmtree does not follow the jail user's symlinks
    for file in files:
        try:
            os.unlink(file)
        except FileNotFoundError:
            pass


def _publish(path: str, staging: dict[str, str], outputs: tuple[str, ...], jail_uid: int) -> str:
    """Publish ``path``; what to answer."""
    if path not in outputs:
        return f"cannot publish {path}: not a file this monitor was to write\n"
    directory, name = os.path.split(path)
    staged = os.path.join(staging[directory], name)
    try:
        info = os.lstat(staged)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != jail_uid or info.st_nlink != 1:
            return f"cannot publish {path}: what the jail left there is not a file of its own\n"
        os.chown(staged, os.getuid(), os.getgid(), follow_symlinks=False)
        os.replace(staged, path)
    except OSError as exc:
        return f"cannot publish {path}: {exc.strerror}\n"
    return "ok\n"


def _serve(fd: int, jail_uid: int, staging: dict[str, str], outputs: tuple[str, ...], discard: list[str]) -> None:
    kept: set[str] = set()
    with socket.socket(fileno=fd) as monitor:
        try:
            pending = b""
            while chunk := monitor.recv(_MAX_REQUEST):
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    verb, _, path = os.fsdecode(line).partition(" ")
                    if verb == "publish":
                        answer = _publish(path, staging, outputs, jail_uid)
                    elif verb == "keep" and path in discard:
                        kept.add(path)
                        answer = "ok\n"
                    else:
                        answer = f"cannot {verb} {path}: not a request for this keeper\n"
                    monitor.sendall(answer.encode())
                if len(pending) > _MAX_REQUEST:
                    break  # not a request this protocol makes
        finally:
            _remove(staging.values(), [path for path in discard if path not in kept])


def main(argv: list[str]) -> None:
    """``keeper.py FD TASK``, TASK a JSON object: the jail's ``uid``, ``staging`` (directory: its
    staging directory), ``outputs`` (paths) and ``discard`` (paths)."""
    task = json.loads(argv[1])
    _serve(int(argv[0]), task["uid"], task["staging"], tuple(task["outputs"]), task["discard"])


if __name__ == "__main__":
    main(sys.argv[1:])
