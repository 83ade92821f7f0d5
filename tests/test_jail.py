"""The jailed monitor (``--jail``, smolvmm.host.jail): what the process can still do and what it cannot.

The jail cannot be undone for a process, so each test jails a child process and looks at it
from outside too (/proc/PID: credentials, no_new_privs, seccomp, its root). The native test runs
the real machine on this host's /dev/kvm (on PVM the guest only gets into its decompressor); the
kvm test resumes the real guest inside tools/nested-kvm, jailed, and saves it from the jail.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from guests import GUEST_TIMEOUT

import smolformat
from smolvmm.host import jail as jail_module
from smolvmm.host.jail import Jail
from smolvmm.host.syscalls import ALLOWED_SYSCALLS, DENIED_SYSCALLS, MARGIN, MEASURED

CHILD = textwrap.dedent(
    """
    import ctypes, errno, json, os, sys
    import anyio
    from smolvmm import Jail, Machine, MachineConfig

    def attempt(call):
        try:
            call()
            return "allowed"
        except OSError as exc:
            return errno.errorcode[exc.errno]

    def ptrace():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(16, os.getppid(), 0, 0) != 0:  # PTRACE_ATTACH to the test process
            raise OSError(ctypes.get_errno(), "ptrace")

    async def main():
        saved = os.path.join(sys.argv[1], "jailed.smolmachine")
        writable = sys.argv[3] == "writable"
        jail = Jail.parse(None, (sys.argv[1],) if writable else (), () if writable else (saved,))
        async with Machine.boot(MachineConfig(vcpus=2, memory=128 << 20), jail=jail) as machine:
            report = {
                "jail": machine.timings.notes["jail"], "uid": os.getuid(), "gid": os.getgid(),
                "root": sorted(os.listdir("/")), "shadow": attempt(lambda: open("/etc/shadow")),
                "exec": attempt(lambda: os.execv("/bin/sh", ["sh"])), "ptrace": attempt(ptrace),
                "write_root": attempt(lambda: open("/escape", "w")),
            }
            await machine.snapshot(saved)
            print(json.dumps(report), flush=True)
            sys.stdin.readline()  # the test looks at /proc/PID meanwhile
            await machine.stop()

    anyio.run(main, backend=sys.argv[2])
    """
)


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


@pytest.mark.kvm(linux_guest=False)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.parametrize("save_to", ["writable", "outputs"])
def test_a_jailed_monitor_runs_its_machine_sees_no_host_file_and_cannot_exec_or_ptrace(
    tmp_path: Path, anyio_backend: str, save_to: str
) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    if save_to == "writable":
        out.chmod(0o777)  # the jail's user (nobody) writes the snapshot here itself
        tmp_path.chmod(0o755)
    # else root's own directory, that nobody cannot even enter: the jail's keeper publishes the snapshot
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out), anyio_backend, save_to],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()
        report = json.loads(line)
        status = _proc_status(child.pid)
        jail_root = sorted(os.listdir(f"/proc/{child.pid}/root"))
        other_namespace = os.readlink(f"/proc/{child.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        other_network = os.readlink(f"/proc/{child.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=120) == 0, child.stderr.read()
    finally:
        child.kill()
    nobody = Jail.parse(None)
    assert report["uid"] == nobody.uid and report["gid"] == nobody.gid
    assert report["root"] == jail_root == [str(out).split("/")[1]]  # only the path to the writable directory
    assert report["shadow"] == "ENOENT" and report["exec"] == "EPERM" and report["ptrace"] == "EPERM"
    assert report["write_root"] == "EROFS"
    assert f"seccomp allows {len(ALLOWED_SYSCALLS)} calls" in report["jail"] and "no network" in report["jail"]
    assert status["Uid"].split() == [str(nobody.uid)] * 4 and status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert status["CapEff"] == "0000000000000000"
    assert other_namespace and other_network
    smolformat.verify_bundle(out / "jailed.smolmachine")  # saved from inside the jail
    assert [p.name for p in out.iterdir()] == ["jailed.smolmachine"]  # no staging or temporary file left
    if save_to == "outputs":
        assert (out / "jailed.smolmachine").stat().st_uid == 0  # published as the user's own


ESCAPES = textwrap.dedent(
    """
    import os, sys
    from smolvmm.host.jail import Jail, enter
    enter(Jail.parse(None), network=False)
    print("jailed", flush=True)
    {call}
    print("survived", flush=True)
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.parametrize(
    "call",
    [
        "os.fork()",  # clone without CLONE_THREAD: a new process
        "os.getpgid(0)",  # on no list
        "import socket; socket.socket()",  # socket: the monitor opens its sockets before the jail
    ],
)
def test_a_call_off_the_allow_list_kills_the_jailed_process(call: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", ESCAPES.format(call=call)], capture_output=True, text=True, timeout=120
    )
    assert done.stdout == "jailed\n", done.stderr
    assert done.returncode == -signal.SIGSYS, (done.returncode, done.stderr)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_threads_still_start_in_the_jail() -> None:
    call = "import threading; t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()"
    done = subprocess.run(
        [sys.executable, "-c", ESCAPES.format(call=call)], capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout) == (0, "jailed\nthread\nsurvived\n"), done.stderr


def test_the_syscall_lists_name_real_calls_and_do_not_overlap() -> None:
    seccomp = jail_module._libseccomp()
    for name in (*ALLOWED_SYSCALLS, *DENIED_SYSCALLS):
        assert seccomp.seccomp_syscall_resolve_name(name.encode()) >= 0, name
    assert not set(ALLOWED_SYSCALLS) & set(DENIED_SYSCALLS)
    assert not set(MEASURED) & set(MARGIN)  # a measured call is not margin
    assert {"execve", "ptrace", "mount", "unshare", "bpf"} <= set(DENIED_SYSCALLS)
    assert not {"socket", "connect", "bind", "fork", "vfork", "clone3"} & set(ALLOWED_SYSCALLS)


# Imported inside functions that only run before a jail (or in commands that never enter one).
BEFORE_THE_JAIL = {
    *("difflib", "importlib.metadata", "tqdm"),
    *("smolvmm.cli.registry", "smolvmm.oci.registry", "smolvmm.monitor.signing"),
    *("smolvmm.cli.image", "smolvmm.images.guest"),  # building, and a cold boot's default kernel
}

LAZY_IMPORTS = """
import ast, importlib, json, sys
from pathlib import Path
from smolvmm.host import jail
jail._preload()
missing = []
for package in ("smolvmm", "smolformat"):
    top = Path(importlib.import_module(package).__path__[0])
    for path in sorted(top.rglob("*.py")):
        parts = path.relative_to(top.parent).with_suffix("").parts
        dotted = {".".join(parts[: n + 1]) for n in range(len(parts))}
        if set(parts) & set(jail.PRELOAD_SKIP) or dotted & set(jail.PRELOAD_SKIP):
            continue
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if isinstance(node, ast.Import):
                        names = [alias.name for alias in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        names = [node.module]
                    else:
                        continue
                    missing += [n for n in names if n not in sys.modules and n not in sys.builtin_module_names]
print(json.dumps(sorted(set(missing))))
"""


def test_every_module_a_jailed_monitor_imports_late_is_preloaded() -> None:
    """What the monitor imports inside a function, it may import once jailed, where no host file is
    left: the preload must have imported it (as trio's import once did ctypes for the writer)."""
    done = subprocess.run([sys.executable, "-c", LAZY_IMPORTS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) - BEFORE_THE_JAIL == set()


def test_jail_users_parse_and_root_is_refused() -> None:
    assert Jail.parse("1234:5678") == Jail(1234, 5678)
    assert Jail.parse("4321") == Jail(4321, 4321)
    for spec in ("0", "root", "1000:0", "no-such-user-here"):
        with pytest.raises(Exception, match=r"--jail-user"):
            Jail.parse(spec)


@pytest.mark.kvm
@pytest.mark.skipif(os.geteuid() != 0, reason="the jail is the default for root")
def test_run_as_root_is_jailed_and_saves_from_the_jail_into_roots_own_directory(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o700)  # root's; the jail's user cannot even enter it (nor tmp_path)
    saved = out / "saved.smolmachine"
    monitor = subprocess.Popen(
        [sys.executable, "-m", "smolvmm", "run", "--timings", "--save", "out/saved.smolmachine", str(bundle)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,  # a relative --save: the jailed monitor's own directory is its empty root
    )
    try:
        monitor.stdin.write(b"echo jailed-$((6*7)) > /tmp/mark; cat /tmp/mark\n")
        monitor.stdin.flush()
        output = b""
        deadline = time.monotonic() + GUEST_TIMEOUT
        while b"jailed-42" not in output and time.monotonic() < deadline:
            chunk = os.read(monitor.stdout.fileno(), 4096)
            if not chunk:
                break
            output += chunk
        assert b"jailed-42" in output, monitor.stderr.read().decode(errors="replace") if not chunk else output
        status = _proc_status(monitor.pid)
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2" and status["Uid"].split()[0] != "0"
        assert os.listdir(f"/proc/{monitor.pid}/root") == [str(out).split("/")[1]]
        monitor.send_signal(signal.SIGUSR1)
        while not saved.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        monitor.stdin.write(b"poweroff -f\n")
        monitor.stdin.close()
        assert monitor.wait(timeout=GUEST_TIMEOUT) == 0, monitor.stderr.read().decode(errors="replace")
    finally:
        monitor.kill()
    stderr = monitor.stderr.read().decode(errors="replace")
    assert re.search(r"\"jail\": \"jailed: uid \d+", stderr), stderr  # the --timings JSON line
    assert [p.name for p in out.iterdir()] == ["saved.smolmachine"]  # published; no staging directory left
    assert saved.stat().st_uid == 0
    again = subprocess.run(
        [sys.executable, "-m", "smolvmm", "run", str(saved)],
        input=b"cat /tmp/mark\npoweroff -f\n",
        capture_output=True,
        timeout=GUEST_TIMEOUT,
    )
    assert again.returncode == 0 and b"jailed-42" in again.stdout, again.stderr.decode(errors="replace")


def _serving(pid: int, deadline: float) -> dict[str, str]:
    """/proc/PID/status once the monitor catches SIGTERM: its machine runs (after any jail) and
    ``smolvmm stop`` would end it cleanly."""
    while not int(_proc_status(pid)["SigCgt"], 16) & 1 << (signal.SIGTERM - 1):
        assert time.monotonic() < deadline, "the monitor never got as far as serving its machine"
        time.sleep(0.1)
    return _proc_status(pid)


@pytest.mark.kvm(linux_guest=False)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_boot_as_root_is_jailed_unless_told_not_to(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    nobody = Jail.parse(None)
    for flags, uid, seccomp in (([], nobody.uid, "2"), (["--no-jail"], 0, "0")):
        monitor = subprocess.Popen(
            [sys.executable, "-m", "smolvmm", "boot", *flags],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            status = _serving(monitor.pid, time.monotonic() + GUEST_TIMEOUT)
            assert list((tmp_path / "smolvmm").glob("*.json")), "smolvmm ps does not list it"
            monitor.send_signal(signal.SIGTERM)  # smolvmm stop
            assert monitor.wait(timeout=60) == 0, monitor.stderr.read()
        finally:
            monitor.kill()
        assert (status["Uid"].split()[0], status["Seccomp"]) == (str(uid), seccomp), flags
        assert list((tmp_path / "smolvmm").iterdir()) == [], flags  # its ps entry went with it, jailed or not
    both = subprocess.run(
        [sys.executable, "-m", "smolvmm", "boot", "--jail", "--no-jail"], capture_output=True, text=True, timeout=60
    )
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    user = subprocess.run(
        [sys.executable, "-m", "smolvmm", "boot", "--no-jail", "--jail-user", "nobody"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert user.returncode == 2 and user.stderr.count("\n") == 1 and "--jail-user needs the jail" in user.stderr
