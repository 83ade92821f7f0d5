"""``smolvmm helper``: run commands handed to a warm process behave as they do in place.

These run natively (nothing enters a guest); the kvm test in test_exec_guest.py hands a real
restore, its streams and a Ctrl-C to the helper.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import smolvmm

SMOLVMM = [sys.executable, "-m", "smolvmm"]


def _env(runtime: Path) -> dict[str, str]:
    return {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    path = tmp_path / "runtime"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def helper(runtime: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [*SMOLVMM, "helper"], env=_env(runtime), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    assert process.stderr is not None
    first = process.stderr.readline()  # written once it listens
    assert first.startswith("smolvmm helper: serving run commands on"), first
    yield process
    process.terminate()
    process.wait(60)


def _lines(process: subprocess.Popen[str], count: int) -> list[str]:
    assert process.stderr is not None
    return [process.stderr.readline().rstrip("\n") for _ in range(count)]


def test_a_handed_run_says_and_exits_as_it_does_in_place(
    helper: subprocess.Popen[str], runtime: Path, tmp_path: Path
) -> None:
    (tmp_path / "bad.smolmachine").write_bytes(b"not a bundle at all" * 100)
    command = [*SMOLVMM, "run", "bad.smolmachine"]  # relative: the helper's child works in the client's directory
    handed = subprocess.run(command, cwd=tmp_path, env=_env(runtime), capture_output=True, text=True, timeout=120)
    elsewhere = _env(tmp_path / "no-helper")
    in_place = subprocess.run(command, cwd=tmp_path, env=elsewhere, capture_output=True, text=True, timeout=120)
    assert (handed.returncode, handed.stdout, handed.stderr) == (in_place.returncode, in_place.stdout, in_place.stderr)
    assert handed.returncode == 3 and handed.stderr.count("\n") == 1 and "bad.smolmachine" in handed.stderr
    ran, ended = _lines(helper, 2)
    assert ran.endswith("runs: run bad.smolmachine") and ended.endswith("ended with status 3")

    usage = subprocess.run([*SMOLVMM, "run", "--help"], env=_env(runtime), capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: smolvmm run") and usage.stderr == ""
    assert _lines(helper, 2)[1].endswith("ended with status 0")


def test_a_handed_run_imports_only_the_hand_off(tmp_path: Path) -> None:
    """The client a ``run`` starts as imports the hand-off alone: not the CLI, the monitor,
    tempfile (its runtime directory under ``$TMPDIR`` when there is no XDG_RUNTIME_DIR), typing or
    pathlib. It runs without site (``-S``), the package found on PYTHONPATH: the development venv's
    editable install imports pathlib at every start, which a user's install does not."""
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "PYTHONDONTWRITEBYTECODE")}
    env["TMPDIR"] = str(tmp_path)
    process = subprocess.Popen([*SMOLVMM, "helper"], env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert process.stderr is not None
    try:
        first = process.stderr.readline()
        assert first.startswith(f"smolvmm helper: serving run commands on {tmp_path}/smolvmm-"), first
        (tmp_path / "bad.smolmachine").write_bytes(b"not a bundle at all" * 100)
        command = [sys.executable, "-S", "-X", "importtime", "-m", "smolvmm", "run", "bad.smolmachine"]
        client_env = {**env, "PYTHONPATH": str(Path(smolvmm.__file__).parent.parent)}
        done = subprocess.run(command, cwd=tmp_path, env=client_env, capture_output=True, text=True, timeout=120)
        handed = _lines(process, 1)
    finally:
        process.terminate()
        process.wait(60)
    assert handed[0].startswith("smolvmm helper: pid "), handed
    assert done.returncode == 3 and "bad.smolmachine" in done.stderr, done.stderr[-2000:]  # a bad bundle's status
    loaded = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \| *(\S+)$", done.stderr, re.MULTILINE))
    assert "smolvmm.cli.handoff" in loaded
    assert (
        loaded & {"smolvmm.cli.dispatch", "smolvmm.monitor.machine", "anyio", "tempfile", "typing", "pathlib"} == set()
    )


def test_without_a_listening_helper_run_runs_in_place(runtime: Path) -> None:
    stale = runtime / "smolvmm" / "helper.sock"
    stale.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as left:
        left.bind(str(stale))  # bound, never listening: a helper that died
    result = subprocess.run(
        [*SMOLVMM, "run", "/nonexistent.smolmachine"], env=_env(runtime), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 3 and result.stderr == (
        "smolvmm: error: cannot open /nonexistent.smolmachine: No such file or directory\n"
    )


def _request(path: Path, body: bytes, fds: list[int]) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(path))
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        conn.sendmsg([struct.pack("!I", len(body)), body], rights)
        reply = conn.makefile("rb").readline()
    value = json.loads(reply)
    assert isinstance(value, dict)
    return value


def test_the_helper_refuses_what_is_not_a_run_of_its_own_code(helper: subprocess.Popen[str], runtime: Path) -> None:
    path = runtime / "smolvmm" / "helper.sock"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    own = {"env": {}, "umask": 0o22, "executable": sys.executable}
    package = str(Path(__file__).resolve().parent.parent / "smolvmm")
    stdio = [0, 1, 2, os.open(".", os.O_RDONLY | os.O_DIRECTORY)]
    try:
        other = json.dumps({**own, "argv": ["stop", "x"], "package": package}).encode()
        assert "only `run`" in str(_request(path, other, stdio)["refused"])
        elsewhere = json.dumps({**own, "argv": ["run", "x"], "package": "/elsewhere"}).encode()
        assert "runs " + sys.executable in str(_request(path, elsewhere, stdio)["refused"])
        assert "four descriptors" in str(_request(path, json.dumps({**own, "argv": ["run"]}).encode(), [])["refused"])
        with socket.socket(socket.AF_UNIX) as silent:  # says nothing: refused after 5 s, then the next is served
            silent.connect(str(path))
            assert "runs " + sys.executable in str(_request(path, elsewhere, stdio)["refused"])
            assert "timed out" in json.loads(silent.makefile("rb").readline())["refused"]
    finally:
        os.close(stdio[3])
    assert helper.poll() is None  # still serving


def test_stopping_the_helper_removes_its_socket(runtime: Path) -> None:
    process = subprocess.Popen([*SMOLVMM, "helper"], env=_env(runtime), stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None and process.stderr.readline().startswith("smolvmm helper: serving")
    path = runtime / "smolvmm" / "helper.sock"
    assert path.exists()
    second = subprocess.run([*SMOLVMM, "helper"], env=_env(runtime), capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and "a helper already listens on" in second.stderr
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    assert not path.exists()


def test_runs_at_once_each_run_once(helper: subprocess.Popen[str], runtime: Path, tmp_path: Path) -> None:
    """The first goes to the spare child forked ahead, the others are forked when they come."""
    names = [f"bad{n}.smolmachine" for n in range(4)]
    for name in names:
        (tmp_path / name).write_bytes(b"not a bundle" * 100)
    clients = [
        subprocess.Popen(
            [*SMOLVMM, "run", name], cwd=tmp_path, env=_env(runtime), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for name in names
    ]
    for name, client in zip(names, clients, strict=True):
        out, err = client.communicate(timeout=120)
        assert client.returncode == 3 and out == b""
        assert err.count(b"\n") == 1 and name.encode() in err, err
    lines = _lines(helper, 2 * len(names))
    assert sorted(line.rsplit(" ", 1)[-1] for line in lines if "runs: run" in line) == sorted(names)
    assert sum(line.endswith("ended with status 3") for line in lines) == len(names)


class _Conn:
    """A socket that takes every byte in its first send and is then closed by its reader."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendmsg(self, buffers: list[bytes], ancillary: object) -> int:
        self.sent.append(b"".join(buffers))
        return len(self.sent[0])

    def sendall(self, data: bytes) -> None:
        raise BrokenPipeError  # what a send does once the reader has closed its end


def test_a_request_taken_whole_is_not_sent_again() -> None:
    from smolvmm.cli.handoff import send_request

    conn = _Conn()
    send_request(conn, {"argv": ["run", "x"]}, [0, 1, 2, 3])  # type: ignore[arg-type]
    assert len(conn.sent) == 1 and conn.sent[0].endswith(b'{"argv": ["run", "x"]}')
