"""Suite-wide wiring: where ``@pytest.mark.kvm`` tests run (see nested_plugin)."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest
from nested_plugin import NestedKvm

# Real arm64 KVM tests: collected on arm64 only (elsewhere test_arm64_emulated.py runs them inside
# tools/arm64-kvm), rather than reported as 42 skips on every x86_64 run.
collect_ignore = [] if platform.machine() == "aarch64" else ["test_arm64_kvm_real.py"]


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(NestedKvm(config), "smolvmm-nested-kvm")


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """API tests run on both anyio backends."""
    return request.param


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of the default guest, 2 vCPUs, 256 MiB, with an ext4 disk holding hello.txt (built once)."""
    from smolvmm.images.disk import ext4_image

    work = tmp_path_factory.mktemp("bundle")
    (work / "files").mkdir()
    (work / "files" / "hello.txt").write_text("hello from the base image\n")
    disk = ext4_image(work / "base.img", work / "files", size_mib=32)
    path = work / "app.smolmachine"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "smolvmm",
            "build",
            "-o",
            str(path),
            "--cpus",
            "2",
            "--mem",
            "256M",
            "--disk",
            str(disk),
        ],
        capture_output=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return path


@pytest.fixture(scope="session")
def demo_run() -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``python -m smolvmm demo`` with stdin not a terminal (builds the demo bundle once): its bundle and result."""
    from smolvmm.cli.demo import demo_bundle

    result = subprocess.run(
        [sys.executable, "-m", "smolvmm", "demo"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900
    )
    return Path(demo_bundle()), result
