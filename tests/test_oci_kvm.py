"""A Debian image with python3 (made by mmdebstrap and umoci) built into a pre-warmed bundle and run.

One bundle per session: ``build --image oci:DIR:app --warm 'python3 -m http.server 8000 &'
--ready-port 8000``; each test restores it and runs a command as a user would.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import oci_images
import pytest
from guests import GUEST_TIMEOUT
from nested_plugin import prepare_on_host
from network import GATEWAY, named_netns

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


# From the host's side of the forward: a slow nested machine may take a while to answer at first.
FETCH_FORWARDED = """
import sys, time, urllib.request
for attempt in range(10):
    try:
        print(urllib.request.urlopen("http://127.0.0.1:18080/hello.txt", timeout=30).read())
        break
    except OSError as exc:
        print(f"attempt {attempt}: {exc}", file=sys.stderr)
        time.sleep(2)
"""


def _first_line(process: subprocess.Popen[str]) -> str:
    """The first line ``process`` prints, waited for at most GUEST_TIMEOUT."""
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    stdout = process.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    return lines.get(timeout=GUEST_TIMEOUT)


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """A network namespace with what passt needs (an address and a default route, through a TAP
    device nobody reads: the nested machine has no network)."""
    with named_netns(f"smolvmm-image-{os.getpid()}") as name:
        yield name


@pytest.mark.kvm
def test_an_image_machine_has_user_networking_by_default(netns: str, tmp_path: Path) -> None:
    """Built where the host has a network, the machine has a card on user networking: a clone
    takes its lease, reaches the host's loopback through its gateway and publishes a port."""
    bundle, www = tmp_path / "net.smolmachine", tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("page from the host\n")
    in_netns = ["ip", "netns", "exec", netns, sys.executable]
    built = subprocess.run(
        [*in_netns, "-m", "smolvmm", "build", "--json", "--image", SOURCE.format(layout=oci_images.oci_layout()),
         "-o", str(bundle), "--warm", "python3 -m http.server 8000 >/dev/null 2>&1 &", "--ready-port", "8000"],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert "network card" not in built.stderr
    report = json.loads(built.stdout)  # build --json: path, digest, sizes and the phases' timings
    assert report["path"] == str(bundle) and report["sizes"]["file"] == bundle.stat().st_size
    assert 0 < report["timings"]["disk"] < report["timings"]["up"] < report["timings"]["saved"]
    guest = (
        "import os, time, urllib.request\n"
        f"get = lambda path: urllib.request.urlopen('http://{GATEWAY}:18000/' + path, timeout=30).read().decode()\n"
        "print('fetched:', get('').strip(), flush=True)\n"
        "while True:\n"
        "    try:\n"
        "        get('done'); break\n"
        "    except OSError:\n"
        "        time.sleep(0.2)\n"
    )
    server = subprocess.Popen(
        [*in_netns, "-m", "http.server", "--bind", "127.0.0.1", "18000"],
        cwd=www, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    clone = subprocess.Popen(
        [*in_netns, "-m", "smolvmm", "run", "--net", "user,forward=18080:8000", str(bundle), "--", "python3", "-c", guest],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert _first_line(clone) == "fetched: page from the host\n"
        fetched = subprocess.run(
            [*in_netns, "-c", FETCH_FORWARDED], capture_output=True, text=True, timeout=GUEST_TIMEOUT
        )
        if fetched.stdout != "b'hello from layer 2\\n'\n":  # the server --warm started, through the forward
            clone.kill()
            pytest.fail(f"the forward: {fetched.stderr[-600:]}; the clone: {clone.communicate()[1][-2000:]}")
        (www / "done").write_text("")
        _, stderr = clone.communicate(timeout=GUEST_TIMEOUT)
        assert clone.returncode == 0, stderr
        assert "smolvmm: forwarding host port 18080/tcp to guest port 8000" in stderr
    finally:
        for process in (clone, server):
            process.kill()
            process.wait()
