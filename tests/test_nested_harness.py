"""tools/nested-kvm from the host: exit status, separate live streams, --out write-back, nested KVM.

Each call boots the nested machine (seconds under TCG), so the checks share two boots.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
    script = (
        f"echo to-stdout; echo to-stderr >&2; ls -l /dev/kvm; grep -m1 -o -E 'svm|vmx' /proc/cpuinfo;"
        f" python -c 'import smolvmm, os; print(os.environ[\"SMOLVMM_NESTED\"])';"
        f" pwd; echo written-inside > {tmp_path}/back; exit 7"
    )
    result = nested("--out", str(tmp_path), "sh", "-c", script)
    assert result.returncode == 7, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "to-stdout"
    assert lines[1].startswith("crw") and lines[1].endswith("/dev/kvm")
    assert lines[2:5] == ["svm", "1", os.getcwd()]
    assert result.stderr == "to-stderr\n"
    assert (tmp_path / "back").read_text() == "written-inside\n"


@needs_qemu
def test_failing_command_status_comes_back() -> None:
    assert nested("false").returncode == 1


def test_job_script_quotes_and_forwards_a_sane_environment(tmp_path: Path) -> None:
    env = {"PATH": "/bin", "PYTHONPATH": "/x", "SMOLVMM_X": "1", "SECRET_TOKEN": "no", "LC_ALL": "C"}
    assert forwarded_env(env) == {"PATH": "/bin", "PYTHONPATH": "/x", "SMOLVMM_X": "1", "LC_ALL": "C",
                                  "SMOLVMM_NESTED": "1"}
    script = job_script(Job(["printf", "%s\n", "a b", "it's"], cwd=tmp_path, env=env))
    result = subprocess.run(["sh", "-c", script.replace("exec ", "env; exec ")], capture_output=True, text=True)
    assert result.stdout.endswith("a b\nit's\n")
    assert "SMOLVMM_NESTED=1" in result.stdout and "SECRET_TOKEN" not in result.stdout


def test_kvm_tests_fail_loudly_inside_a_machine_without_hardware_kvm(tmp_path: Path) -> None:
    tests = Path(__file__).resolve().parent
    (tmp_path / "conftest.py").write_text(
        "from nested_plugin import NestedKvm\n\n"
        "def pytest_configure(config):\n"
        "    config.addinivalue_line('markers', 'kvm: needs KVM')\n"
        "    config.pluginmanager.register(NestedKvm(config))\n"
    )
    (tmp_path / "test_inner.py").write_text(
        "import pytest\n\n@pytest.mark.kvm\ndef test_needs_kvm():\n    pass\n\ndef test_plain():\n    pass\n"
    )
    env = {**os.environ, "SMOLVMM_NESTED": "1", "PYTHONPATH": str(tests)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rf", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    if probe().kind == "hardware":
        assert result.returncode == 0, result.stdout
    else:
        assert result.returncode == 1 and "1 failed, 1 passed" in result.stdout, result.stdout
        assert "kvm tests cannot run" in result.stdout
