"""A Debian image with python3 (made by mmdebstrap and umoci) built into a pre-warmed bundle and run.

One bundle per session: ``build --image oci:DIR:app --warm 'python3 -m http.server 8000 &'
--ready-port 8000``; each test restores it and runs a command as a user would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import oci_images
import pytest
from nested_plugin import prepare_on_host

from smolvmm.images.imageroot import PREBUILT_IMAGE_ENV, image_guest

SOURCE = f"oci:{{layout}}:{oci_images.TAG}"


def _prepare_on_the_host() -> dict[str, str]:
    """Make the test image, its base disk and the image guest here, where apt and the cache are
    writable, for the kvm tests inside tools/nested-kvm (which sees them read-only)."""
    oci_images.base_disk()
    return {PREBUILT_IMAGE_ENV: str(image_guest().kernel.parent)}


prepare_on_host(_prepare_on_the_host)


def smolvmm(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smolvmm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pre-warmed bundle, built once."""
    path = tmp_path_factory.mktemp("image") / "app.smolmachine"
    result = smolvmm(
        "build",
        "--image",
        SOURCE.format(layout=oci_images.oci_layout()),
        "-o",
        str(path),
        "--warm",
        "python3 -m http.server 8000 >/dev/null 2>&1 &",
        "--ready-port",
        "8000",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: ")
    return path


@pytest.mark.kvm
def test_run_with_a_command_prints_its_output(app: Path) -> None:
    result = smolvmm("run", str(app), "--", "python3", "-c", "print(6*7)")
    assert (result.returncode, result.stdout) == (0, "42\n"), result.stderr


@pytest.mark.kvm
def test_the_image_env_workdir_layers_and_warm_server_hold_in_the_clone(app: Path) -> None:
    script = (
        "import os, urllib.request\n"
        "print(os.getcwd()); print(os.environ['GREETING']); print(os.environ['PATH'])\n"
        f"print(os.path.exists('/{oci_images.DOOMED}'), open('/srv/app/hello.txt').read().strip())\n"
        "print(urllib.request.urlopen('http://127.0.0.1:8000/hello.txt', timeout=30).read().decode().strip())\n"
    )
    result = smolvmm("run", str(app), "--", "python3", "-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    cwd, greeting, path, layers, served = result.stdout.splitlines()
    assert (cwd, greeting) == (oci_images.WORKDIR, oci_images.ENV.partition("=")[2])
    assert path == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # the image sets none
    assert layers == "False hello from layer 2"  # layer 3's whiteout deleted layer 2's file
    assert served == "hello from layer 2"  # the server started by --warm answers its first request


@pytest.mark.kvm
def test_run_without_a_command_runs_the_image_cmd_and_returns_exit_statuses(app: Path) -> None:
    result = smolvmm("run", str(app))
    assert (result.returncode, result.stdout) == (0, f"cmd ran in {oci_images.WORKDIR} hello from the image\n")
    failed = smolvmm("run", str(app), "--", "sh", "-c", "echo out; echo to stderr >&2; exit 3")
    assert (failed.returncode, failed.stdout) == (3, "out\n") and "to stderr\n" in failed.stderr
    fed = subprocess.run(
        [sys.executable, "-m", "smolvmm", "run", str(app), "--", "wc", "-c"],
        input="four",
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert (fed.returncode, fed.stdout.strip()) == (0, "4")  # stdin reaches the command
