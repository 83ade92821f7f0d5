"""Faults leave nothing broken, with real guests (issue 13): ``kill -9`` of the monitor while it
builds, while it saves a snapshot and while it restores never leaves a partial bundle under the
final name nor changes a base disk or the bundle, a rerun leaves no temporary file, and a full disk
during a save is one line while the machine runs on."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bundles import digest, kill_when, leftovers
from guests import GUEST_TIMEOUT

from smolformat import verify_bundle

pytestmark = pytest.mark.kvm


def smolvmm(*args: str, env: dict[str, str], **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "smolvmm", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        **kwargs,  # type: ignore[call-overload]
    )


def read_until(process: subprocess.Popen[bytes], marker: bytes) -> bytes:
    """The machine's console output up to ``marker`` (bounded by the host clock)."""
    assert process.stdout is not None
    seen, deadline = b"", time.monotonic() + GUEST_TIMEOUT
    while marker not in seen and time.monotonic() < deadline and process.poll() is None:
        seen += os.read(process.stdout.fileno(), 4096)
    assert marker in seen, seen[-2000:]
    return seen


def running(process: subprocess.Popen[bytes], command: bytes, marker: bytes) -> None:
    """Wait until the machine's shell answers ``command`` with ``marker``."""
    assert process.stdin is not None
    process.stdin.write(command + b"\n")
    process.stdin.flush()
    read_until(process, marker)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The monitor's temporary files go to a directory of the test's own, so that leftovers show (and
    the list of running machines to another: without XDG_RUNTIME_DIR it would be in TMPDIR)."""
    (tmp_path / "tmp").mkdir()
    (tmp_path / "run").mkdir(mode=0o700)
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "XDG_RUNTIME_DIR": str(tmp_path / "run")}


def test_kill_9_during_build_save_and_restore_leaves_nothing_broken(
    bundle: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    base = tmp_path / "base.img"
    shutil.copyfile(bundle.parent / "base.img", base)
    base_before, bundle_before = digest(base), digest(bundle)
    built = tmp_path / "built.smolmachine"

    # build: killed once its bundle is half written, then built again
    build = ["build", "-o", str(built), "--cpus", "1", "--mem", "128M", "--disk", str(base)]
    assert kill_when(smolvmm(*build, env=env), tmp_path, built.name, 4 << 20), "build ended before it was killed"
    assert not built.exists() and digest(base) == base_before
    rebuilt = smolvmm(*build, env=env)
    assert rebuilt.wait(GUEST_TIMEOUT) == 0, rebuilt.stderr.read() if rebuilt.stderr else ""
    assert leftovers(tmp_path, built.name) == [] and digest(base) == base_before
    verify_bundle(built)

    # a snapshot (run --save, SIGUSR1): killed while it writes, then saved by a new run
    saved = tmp_path / "saved.smolmachine"
    run = smolvmm("run", "--save", str(saved), str(bundle), env=env)
    running(run, b"echo up-$((6*7))", b"up-42")
    run.send_signal(signal.SIGUSR1)
    assert kill_when(run, tmp_path, saved.name, 4 << 20), "the save ended before it was killed"
    assert not saved.exists()
    rerun = smolvmm("run", "--save", str(saved), str(bundle), env=env)
    running(rerun, b"echo up-$((6*7))", b"up-42")
    rerun.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + GUEST_TIMEOUT
    while not saved.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    running(rerun, b"echo still-$((6*7))", b"still-42")  # the machine runs on after its save
    rerun.send_signal(signal.SIGTERM)
    assert rerun.wait(GUEST_TIMEOUT) == 0
    assert rerun.stderr is not None
    said = rerun.stderr.read()  # plain lines off a terminal: no carriage returns for a raw one
    assert f"smolvmm: saved {saved} (".encode() in said and b"\r" not in said, said
    verify_bundle(saved)
    assert leftovers(tmp_path, saved.name) == []
    # jailed (the default as root), the save went through a staging directory: the keeper removed
    # the killed monitor's, and the second run's once it had published the save
    assert list(tmp_path.glob(".smolvmm-jail-*")) == []

    # a restore killed as it starts, and once its shell answers
    for answered in (False, True):
        victim = smolvmm("run", str(bundle), env=env)
        if answered:
            running(victim, b"echo up-$((6*7))", b"up-42")
        victim.send_signal(signal.SIGKILL)
        victim.wait()

    assert digest(bundle) == bundle_before and digest(base) == base_before
    assert os.listdir(tmp_path / "tmp") == []  # the reruns removed the killed snapshots' scratch


def test_a_full_disk_during_a_save_is_one_line_and_the_machine_runs_on(
    bundle: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    namespace = ["unshare", "--mount", "--propagation", "private"] if os.geteuid() == 0 else ["unshare", "-rm"]
    script = 'mount -t tmpfs -o size=8m tmpfs "$1" && exec "$2" -m smolvmm run --save "$1/saved.smolmachine" "$3"'
    run = subprocess.Popen(
        [*namespace, "sh", "-c", script, "sh", str(small), sys.executable, str(bundle)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        running(run, b"echo up-$((6*7))", b"up-42")
        run.send_signal(signal.SIGUSR1)  # 256 MiB of RAM into 8 MiB
        running(run, b"sleep 5; echo still-$((6*7))", b"still-42")  # the machine runs on
        assert run.stdin is not None
        run.stdin.write(b"poweroff -f\n")
        run.stdin.close()
        assert run.wait(GUEST_TIMEOUT) == 0
        assert run.stderr is not None
        errors = [line for line in run.stderr.read().decode().splitlines() if "error" in line]
        assert len(errors) == 1 and "No space left on device" in errors[0], errors
        assert f"{small}/saved.smolmachine" in errors[0]
    finally:
        run.kill()
