"""``smolvmm ps`` and ``smolvmm stop``: the runtime directory, stale entries, stopping; natively with
stand-in processes that register as a machine does, and once with a real restored machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from guests import GUEST_TIMEOUT

# A stand-in for a running smolvmm: registered as a machine, ends on SIGTERM unless told to ignore it.
STAND_IN = """
import signal, sys, time
from smolvmm.cli.ps import registered
stopping = []
signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[1] == "stubborn" else lambda *_: stopping.append(1))
with registered("run", "app.smolmachine") as machine_id:
    print(machine_id, flush=True)
    while not stopping:
        time.sleep(0.05)
"""


def smolvmm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "smolvmm", *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "run").mkdir(mode=0o700)
    return {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "run")}


def stand_in(env: dict[str, str], kind: str = "polite") -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([sys.executable, "-c", STAND_IN, kind], stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def test_ps_lists_a_running_machine_and_stop_ends_it(env: dict[str, str], tmp_path: Path) -> None:
    process, machine_id = stand_in(env)
    try:
        listed = json.loads(smolvmm(env, "ps", "--json").stdout)
        assert [(e["id"], e["pid"], e["command"], e["what"]) for e in listed] == [
            (machine_id, process.pid, "run", "app.smolmachine")
        ]
        assert listed[0]["forwards"] == []  # an entry without them (a machine starting, an older smolvmm)
        table = smolvmm(env, "ps").stdout.splitlines()
        assert table[0].split() == ["ID", "PID", "COMMAND", "UP", "FORWARDS", "WHAT"]
        assert table[1].split()[:3] == [machine_id, str(process.pid), "run"]
        assert table[1].split()[4:] == ["-", "app.smolmachine"]
        stopped = smolvmm(env, "stop", machine_id[:5])  # a unique prefix will do
        assert stopped.returncode == 0 and stopped.stdout == f"{machine_id}: stopped\n", stopped.stderr
        assert process.wait(10) == 0
    finally:
        process.kill()
    assert list((tmp_path / "run" / "smolvmm").iterdir()) == []  # the entry went with its machine
    assert json.loads(smolvmm(env, "ps", "--json").stdout) == []


# A stand-in for a machine that runs with two forwards (bound host ports), as `run` lists it once restored.
STARTED = """
import signal, sys, time
from smolvmm import PortForward
from smolvmm.cli.ps import registered, started
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
with registered("run", "web.smolmachine") as machine_id:
    started(machine_id, (PortForward(41234, 80), PortForward(41235, 53, "udp")))
    print(machine_id, flush=True)
    while not stopping:
        time.sleep(0.05)
"""

FORWARDS = [
    {"host_address": "0.0.0.0", "host_port": 41234, "guest_port": 80, "protocol": "tcp"},
    {"host_address": "0.0.0.0", "host_port": 41235, "guest_port": 53, "protocol": "udp"},
]


def test_ps_shows_the_forwards_of_a_running_machine(env: dict[str, str]) -> None:
    process = subprocess.Popen([sys.executable, "-c", STARTED], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        machine_id = process.stdout.readline().strip()
        (listed,) = json.loads(smolvmm(env, "ps", "--json").stdout)
        assert (listed["id"], listed["forwards"]) == (machine_id, FORWARDS)
        table = smolvmm(env, "ps").stdout.splitlines()
        assert table[1].split()[4:] == ["41234->80/tcp,41235->53/udp", "web.smolmachine"]
        assert table[0].index("FORWARDS") == table[1].index("41234")  # a column
    finally:
        process.kill()


# A stand-in for the process `run --detach` starts (sys.executable -m smolvmm run --detached-as=ID
# ... BUNDLE): lists itself as that id, then, as a restored machine, its forwards; BUNDLE "broken"
# fails before the machine runs instead, "slow" takes a while.
DETACHED = """#!{python}
import signal, sys, time
from smolvmm import PortForward
from smolvmm.cli.ps import registered, started
machine_id = next(a for a in sys.argv if a.startswith("--detached-as=")).split("=", 1)[1]
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
with registered("run", sys.argv[-1], machine_id):
    time.sleep(1 if sys.argv[-1] == "slow" else 0)
    if sys.argv[-1] == "broken":
        sys.exit("smolvmm: error: passt failed: no route")
    started(machine_id, (PortForward(41234, 80), PortForward(41235, 53, "udp")))
    while not stopping:
        time.sleep(0.05)
"""

START = """
import argparse, sys
from pathlib import Path
from smolvmm.cli import detach
sys.executable = sys.argv[1]
none = dict(console_socket=None, save=None, trusted_keys=None, insecure=False, jail=False, no_jail=True, jail_user=None)
args = argparse.Namespace(net=["user,forward=0:80"], env=[], secret_env=[], bundle=Path(sys.argv[2]), **none)
sys.exit(detach.start(args))
"""


@pytest.mark.parametrize("bundle", ["web.smolmachine", "slow"])
def test_a_detached_run_says_its_forwards_before_its_id(env: dict[str, str], tmp_path: Path, bundle: str) -> None:
    """``run --detach`` returns once the machine runs, with its forwards on stderr as ``run`` says
    them (``forward=0:80`` binds a port only the machine knows); ``ps`` lists them."""
    child = tmp_path / "python"
    child.write_text(DETACHED.format(python=sys.executable))
    child.chmod(0o755)
    done = subprocess.run(
        [sys.executable, "-c", START, str(child), bundle], capture_output=True, text=True, env=env, timeout=60
    )
    machine_id = done.stdout.strip()
    try:
        assert done.returncode == 0, done.stderr
        assert done.stderr.splitlines() == [
            "smolvmm: forwarding host port 41234/tcp to guest port 80",
            "smolvmm: forwarding host port 41235/udp to guest port 53",
        ]
        (listed,) = json.loads(smolvmm(env, "ps", "--json").stdout)
        assert (listed["id"], listed["forwards"]) == (machine_id, FORWARDS)
    finally:
        assert not machine_id or smolvmm(env, "stop", machine_id).returncode == 0


def test_a_detached_run_that_fails_before_its_machine_runs_says_why(env: dict[str, str], tmp_path: Path) -> None:
    child = tmp_path / "python"
    child.write_text(DETACHED.format(python=sys.executable))
    child.chmod(0o755)
    done = subprocess.run(
        [sys.executable, "-c", START, str(child), "broken"], capture_output=True, text=True, env=env, timeout=60
    )
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "smolvmm: error: passt failed: no route\n"
    assert json.loads(smolvmm(env, "ps", "--json").stdout) == []


def test_attach_needs_a_detached_machine(env: dict[str, str]) -> None:
    process, machine_id = stand_in(env)
    try:
        done = smolvmm(env, "attach", machine_id)
        assert done.returncode == 2 and "was not started with `run --detach`" in done.stderr
        assert smolvmm(env, "attach", "nothing").returncode == 2
        done = smolvmm(env, "exec", machine_id, "--", "true")
        assert done.returncode == 2 and "was not started with `run --detach`" in done.stderr
        assert smolvmm(env, "exec", "nothing", "--", "true").returncode == 2
        assert smolvmm(env, "exec", machine_id).returncode == 2  # no command
    finally:
        process.kill()


def test_stop_kills_what_does_not_stop_in_time(env: dict[str, str]) -> None:
    process, machine_id = stand_in(env, "stubborn")
    try:
        done = smolvmm(env, "stop", "--timeout", "0.5", machine_id)
        assert done.returncode == 1 and "killed" in done.stdout
        assert process.wait(10) == -9
    finally:
        process.kill()


def test_stale_entries_are_ignored_and_removed(env: dict[str, str], tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    directory = tmp_path / "run" / "smolvmm"
    directory.mkdir(mode=0o700)
    entry = {
        "id": "deadbeef",
        "pid": int(dead.stdout),
        "pid_started": "1",
        "command": "run",
        "what": "x",
        "started_unix": 0,
    }
    (directory / "deadbeef.json").write_text(json.dumps(entry))
    (directory / "mine.json").write_text(json.dumps({**entry, "id": "mine", "pid": os.getpid()}))  # a reused pid
    assert json.loads(smolvmm(env, "ps", "--json").stdout) == []
    assert list(directory.iterdir()) == []
    done = smolvmm(env, "stop", "deadbeef")
    assert done.returncode == 2 and "no machine 'deadbeef'" in done.stderr


def test_without_xdg_runtime_dir_a_private_directory_in_tmp(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"} | {"TMPDIR": str(tmp_path)}
    assert smolvmm(env, "ps").returncode == 0
    made = tmp_path / f"smolvmm-{os.getuid()}"
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    made.chmod(0o755)  # someone else could read it: refused
    done = smolvmm(env, "ps")
    assert done.returncode == 1 and "is not a private directory" in done.stderr


@pytest.mark.kvm
def test_a_restored_machine_is_listed_and_stopped(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    machine = subprocess.Popen(
        [sys.executable, "-m", "smolvmm", "run", str(bundle)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert machine.stdin is not None and machine.stdout is not None
        machine.stdin.write(b"echo up-$((6*7))\n")
        machine.stdin.flush()
        seen = b""
        while b"up-42" not in seen:
            chunk = os.read(machine.stdout.fileno(), 4096)
            assert chunk, seen
            seen += chunk
        (listed,) = json.loads(smolvmm(env, "ps", "--json").stdout)
        assert listed["pid"] == machine.pid and listed["what"] == str(bundle)
        stopped = smolvmm(env, "stop", listed["id"])
        assert stopped.returncode == 0, stopped.stderr
        assert machine.wait(GUEST_TIMEOUT) == 0
    finally:
        machine.kill()
    assert json.loads(smolvmm(env, "ps", "--json").stdout) == []


@pytest.mark.kvm
def test_a_command_in_a_clone_is_listed_and_stopped(bundle: Path, tmp_path: Path) -> None:
    """``run BUNDLE -- CMD`` too: stopped before CMD ends, it exits 128+SIGTERM, as a killed command."""
    (tmp_path / "run").mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    machine = subprocess.Popen(
        [sys.executable, "-m", "smolvmm", "run", str(bundle), "--", "sh", "-c", "echo up; sleep 600"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert machine.stdout is not None
        assert machine.stdout.readline() == b"up\n"
        (listed,) = json.loads(smolvmm(env, "ps", "--json").stdout)
        assert (listed["pid"], listed["command"], listed["what"]) == (machine.pid, "run", str(bundle))
        stopped = smolvmm(env, "stop", listed["id"])
        assert stopped.returncode == 0, stopped.stderr
        assert machine.wait(GUEST_TIMEOUT) == 128 + signal.SIGTERM
    finally:
        machine.kill()
    assert json.loads(smolvmm(env, "ps", "--json").stdout) == []


def test_a_machine_that_cannot_be_listed_still_runs(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o755)  # not private: refused as a runtime directory
    (tmp_path / "run" / "smolvmm").mkdir(mode=0o755)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    script = "from smolvmm.cli.ps import registered\nwith registered('run', 'x') as machine_id: print(machine_id)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and len(done.stdout.strip()) == 8
    assert done.stderr.startswith("smolvmm: note: smolvmm ps will not list this machine: ") and "private" in done.stderr


@pytest.mark.kvm
def test_a_detached_machine_runs_in_the_background_and_is_attached_to(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    started = subprocess.run(
        [sys.executable, "-m", "smolvmm", "run", "--detach", str(bundle)],
        capture_output=True,
        text=True,
        env=env,
        timeout=GUEST_TIMEOUT,
    )
    assert started.returncode == 0, started.stderr
    machine_id = started.stdout.strip()
    try:
        (listed,) = json.loads(smolvmm(env, "ps", "--json").stdout)
        assert listed["id"] == machine_id and listed["console"].endswith(f"{machine_id}.console")
        exec_in = [sys.executable, "-m", "smolvmm", "exec", "--env", "WHO=clone", machine_id[:4], "--"]
        script = "echo out-$((6*7)); echo err-$WHO >&2; read line; echo got-$line; exit 7"
        done = subprocess.run(
            [*exec_in, "sh", "-c", script],
            input="hello\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=GUEST_TIMEOUT,
        )
        assert (done.returncode, done.stdout, done.stderr) == (7, "out-42\ngot-hello\n", "err-clone\n")
        status = Path(f"/proc/{listed['pid']}/status").read_text()  # it runs its guest: past any jail
        assert ("Seccomp:\t2" in status) == (os.geteuid() == 0)  # jailed, as root is by default
        # A client that sends garbage is told why and loses its connection; the machine and the next exec are not.
        with socket.socket(socket.AF_UNIX) as hostile:
            hostile.connect(str(tmp_path / "run" / "smolvmm" / f"{machine_id}.control"))
            hostile.sendall(b"R\xff\xff\xff\xff")  # a 4 GiB request
            answer = b"".join(iter(lambda: hostile.recv(4096), b""))  # until the machine closes it
            assert answer.startswith(b"!") and b"over the" in answer
        # more input than a command that does not read it takes: its status still comes back
        done = subprocess.run(
            [*exec_in, "true"], input="y\n" * 500_000, capture_output=True, text=True, env=env, timeout=60
        )
        assert (done.returncode, done.stderr) == (0, "")
        done = subprocess.run([*exec_in, "cat", "/no/such/file"], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 1 and "No such file" in done.stderr and done.stdout == ""
        attached = subprocess.run(
            [sys.executable, "-m", "smolvmm", "attach", machine_id[:4]],
            input="echo detached-$((6*7))\npoweroff -f\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=GUEST_TIMEOUT,
        )
        assert attached.returncode == 0 and "detached-42" in attached.stdout, attached.stderr
        assert json.loads(smolvmm(env, "ps", "--json").stdout) == []  # it powered off, and unlisted itself
    finally:
        smolvmm(env, "stop", machine_id)
    assert sorted(p.name for p in (tmp_path / "run" / "smolvmm").iterdir()) == []
