"""tools/nested-kvm from the host: exit status, separate live streams, --out write-back, nested KVM.

Each call boots the nested machine (seconds under TCG), so the checks share two boots.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smolvmm.hostkvm import probe
from smolvmm.nested.harness import Job, forwarded_env, job_script

TOOL = Path(__file__).resolve().parent.parent / "tools" / "nested-kvm"
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None and not os.environ.get("CI"),
    reason="needs qemu-system-x86_64 (apt-get install qemu-system-x86)",
)


def nested(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TOOL), *args], capture_output=True, text=True, timeout=600)


@needs_qemu
def test_command_runs_with_kvm_streams_and_write_back(tmp_path: Path) -> None:
    smoke = Path(__file__).resolve().parent / "kvm_smoke_guest.py"
    script = (
        f"echo to-stdout; echo to-stderr >&2; ls -l /dev/kvm; grep -m1 -o -E 'svm|vmx' /proc/cpuinfo;"
        f" python -c 'import smolvmm, os; print(os.environ[\"SMOLVMM_NESTED\"])';"
        f" pwd; python {smoke}; test -c /dev/net/tun && echo tun;"
        f" ip netns add probe && ip netns exec probe ip -o link show lo | grep -c lo;"
        f" touch /tmp/scratch && echo scratch;"
        f" echo written-inside > {tmp_path}/back; exit 7"
    )
    result = nested("--out", str(tmp_path), "sh", "-c", script)
    assert result.returncode == 7, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "to-stdout"
    assert lines[1].startswith("crw") and lines[1].endswith("/dev/kvm")
    assert lines[2:10] == ["svm", "1", os.getcwd(), "guest wrote 'ok' to port 0x3f8", "tun", "1", "scratch"]
    assert result.stderr == "to-stderr\n"
    assert (tmp_path / "back").read_text() == "written-inside\n"


@needs_qemu
def test_failing_command_status_comes_back() -> None:
    assert nested("false").returncode == 1


def qemu_pids() -> set[int]:
    """Processes running the nested machine's QEMU."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"smolvmm-nested-" in (entry / "cmdline").read_bytes():
                pids.add(int(entry.name))
        except OSError:
            pass
    return pids


@needs_qemu
def test_no_qemu_outlives_a_timeout_or_a_killed_harness() -> None:
    before = qemu_pids()
    result = nested("--timeout", "8", "sleep", "600")
    assert result.returncode == 125 and "timed out after 8 s" in result.stderr
    assert qemu_pids() - before == set()

    harness = subprocess.Popen([str(TOOL), "sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not qemu_pids() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pids() - before, "the nested machine never started"
    harness.kill()
    harness.wait()
    deadline = time.monotonic() + 10
    while qemu_pids() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pids() - before == set()


def test_job_script_quotes_and_forwards_a_sane_environment(tmp_path: Path) -> None:
    env = {"PATH": "/bin", "PYTHONPATH": "/x", "SMOLVMM_X": "1", "SECRET_TOKEN": "no", "LC_ALL": "C"}
    assert forwarded_env(env) == {"PATH": "/bin", "PYTHONPATH": "/x", "SMOLVMM_X": "1", "LC_ALL": "C",
                                  "SMOLVMM_NESTED": "1"}
    script = job_script(Job(["printf", "%s\n", "a b", "it's"], cwd=tmp_path, env=env))
    result = subprocess.run(["sh", "-c", script.replace("exec ", "env; exec ")], capture_output=True, text=True)
    assert result.stdout.endswith("a b\nit's\n")
    assert "SMOLVMM_NESTED=1" in result.stdout and "SECRET_TOKEN" not in result.stdout


def run_plugin(tmp_path: Path, host: str | None, **env: str) -> subprocess.CompletedProcess[str]:
    """pytest on one kvm test and one plain test, on a host that ``probe`` calls ``host`` (None: this one)."""
    fake = f"nested_plugin.probe = lambda: HostKvm({host!r}, 'the host says {host}')\n" if host else ""
    (tmp_path / "conftest.py").write_text(
        "import nested_plugin\nfrom nested_plugin import NestedKvm\nfrom smolvmm.hostkvm import HostKvm\n"
        f"{fake}\n"
        "def pytest_configure(config):\n"
        "    config.addinivalue_line('markers', 'kvm: needs KVM')\n"
        "    config.pluginmanager.register(NestedKvm(config))\n"
    )
    (tmp_path / "test_inner.py").write_text(
        "import pytest\n\n@pytest.mark.kvm\ndef test_needs_kvm():\n    pass\n\ndef test_plain():\n    pass\n"
    )
    environment = {key: value for key, value in os.environ.items() if key not in ("CI", "SMOLVMM_NESTED")}
    environment.update(PYTHONPATH=str(Path(__file__).resolve().parent), **env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfs", str(tmp_path)],
        cwd=tmp_path, env=environment, capture_output=True, text=True,
    )


def test_kvm_tests_fail_loudly_inside_a_machine_without_hardware_kvm(tmp_path: Path) -> None:
    result = run_plugin(tmp_path, None, SMOLVMM_NESTED="1")
    if probe().kind == "hardware":
        assert result.returncode == 0, result.stdout
    else:
        assert result.returncode == 1 and "1 failed, 1 passed" in result.stdout, result.stdout
        assert "kvm tests cannot run" in result.stdout


def test_without_kvm_kvm_tests_skip_with_the_reason(tmp_path: Path) -> None:
    result = run_plugin(tmp_path, "none")
    assert result.returncode == 0 and "1 passed, 1 skipped" in result.stdout, result.stdout
    assert "the host says none" in result.stdout


def test_without_kvm_in_ci_kvm_tests_fail(tmp_path: Path) -> None:
    result = run_plugin(tmp_path, "none", CI="true")
    assert result.returncode == 1 and "1 failed, 1 passed" in result.stdout, result.stdout
    assert "kvm tests cannot run: the host says none" in result.stdout


def test_on_hardware_kvm_kvm_tests_run_directly(tmp_path: Path) -> None:
    result = run_plugin(tmp_path, "hardware", CI="true")
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout
    assert "nested" not in result.stdout
