"""Shared pieces of the VMM benchmarks: a console-driven child process, QEMU's monitor, PSS, statistics."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QEMU = "qemu-system-x86_64"
QEMU_MISSING = "QEMU not found: apt-get install qemu-system-x86 to measure it side by side; running smolvmm only"


def qemu_path() -> str | None:
    """QEMU's binary, or None (after saying how to install it)."""
    path = shutil.which(QEMU)
    if path is None:
        print(f"bench: {QEMU_MISSING}", flush=True)
    return path


def regular_install(where: Path) -> str:
    """The Python of a venv at ``where`` holding this tree as ``pip install`` leaves it (a wheel),
    its dependencies taken from this venv; made once. The development venv's editable install puts
    an import hook into every Python start (~14 ms natively, two thirds of a bare interpreter's
    start-up imports, several hundred ms in a nested machine), which a user's install does not."""
    python = where / "bin" / "python"
    if python.exists():
        return str(python)
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(where)], check=True)
    query = [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    site = subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="smolvmm-wheel-") as scratch:
        source, wheels = Path(scratch) / "source", Path(scratch) / "wheels"
        # A copy: building in place would leave build/ and an egg-info in the tree.
        skip = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "*.smolmachine")
        shutil.copytree(ROOT, source, ignore=skip)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)], check=True
        )
        (wheel,) = wheels.glob("smolvmm-*.whl")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)], check=True
        )
    Path(site, "smolvmm-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return str(python)


def smolvmm_cli(python: str) -> list[str]:
    """How to run the smolvmm installed for ``python``: with ``-P``, since ``python -m smolvmm`` from
    the tree's directory would otherwise import the tree's package rather than the install's."""
    return [python, "-P", "-m", "smolvmm"]


@contextlib.contextmanager
def warm_helper(argv: Sequence[str], scratch: Path, *, timeout: float, settle: float) -> Iterator[dict[str, str]]:
    """A ``smolvmm helper`` (``argv``: how to start smolvmm) serving from a runtime directory of its
    own under ``scratch``, ``settle`` seconds after it said it serves; yields the environment a
    ``run`` needs to hand itself to it. Its stderr goes to ``scratch/helper.err``."""
    runtime = scratch / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    log = scratch / "helper.err"
    with log.open("wb") as err:
        helper = subprocess.Popen([*argv, "helper"], env={**os.environ, **env}, stderr=err)
    try:
        deadline = time.monotonic() + timeout
        while "serving run commands" not in log.read_text():
            if helper.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the helper did not start: {log.read_text()[-400:]}")
            time.sleep(0.05)
        time.sleep(settle)  # it forks its spare child, which copies its pages
        yield env
    finally:
        helper.terminate()
        helper.wait(timeout=30)


def summary(values: Sequence[float]) -> dict[str, float | int]:
    """min/median/max (and n) of ``values``."""
    return {"n": len(values), "min": min(values), "median": statistics.median(values), "max": max(values)}


def machine_info() -> dict[str, str | int]:
    """CPU model, cores and kernel of the machine running this."""
    model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    return {
        "cpu": model.group(1).strip() if model else platform.processor(),
        "cores": os.cpu_count() or 0,
        "kernel": platform.release(),
        "nested": os.environ.get("SMOLVMM_NESTED") == "1",
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def guest_ram_rss_kib(regions: Sequence[tuple[int, int]]) -> int:
    """Resident KiB of this process's mappings that start inside ``regions`` ((host address, size)
    of guest RAM): the pages the guests have read or written, theirs rather than the monitor's."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            start = int(head.split("-")[0], 16)
            inside = any(base <= start < base + size for base, size in regions)
        elif head == "Rss:" and inside:
            total += int(line.split()[1])
    return total


def rerun_nested(script: Path, out: Path, env: dict[str, str]) -> bool:
    """On a PVM host, run ``script`` with this process's arguments inside ``tools/nested-kvm`` (with
    the default guest built here and ``env`` added: the nested machine has no apt) and return True
    once it has ended well; False where /dev/kvm runs standard guests (run it here)."""
    from smolvmm.host.kvmprobe import probe
    from smolvmm.images.guest import PREBUILT_ENV, default_guest

    host = probe()
    if host.kind == "none":
        raise SystemExit(f"bench: {host.explanation}")
    if host.kind != "pvm":
        return False
    env = {**os.environ, PREBUILT_ENV: str(default_guest().kernel.parent), **env}
    nested = Path(__file__).resolve().parent.parent / "tools" / "nested-kvm"
    argv = [str(nested), "--out", str(out), "--timeout", "3600", "python", str(script), *sys.argv[1:]]
    subprocess.run(argv, env=env, check=True)
    return True


def measured(script: Path, out: Path, name: str, env: dict[str, str], measure: Callable[[Path], dict]) -> dict:
    """``measure(scratch directory)`` here, or inside ``tools/nested-kvm`` on a PVM host (``rerun_nested``,
    with ``env``); its result written to ``out/name`` there and returned here."""
    if os.environ.get("SMOLVMM_NESTED") != "1" and rerun_nested(script, out, env):
        return json.loads((out / name).read_text())
    with tempfile.TemporaryDirectory(prefix="smolbench-") as work:
        result = measure(Path(work))
    (out / name).write_text(json.dumps(result, indent=1))
    return result


def pss_kib(pid: int) -> int:
    """Proportional set size of process ``pid`` in KiB (shared pages divided among their users)."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE).group(1))


class Console:
    """A child process in its own process group whose stdout is the guest console, timestamped."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None, pass_fds: Sequence[int] = ()) -> None:
        self.argv = list(argv)
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=env,
            pass_fds=pass_fds,
        )
        self.out = bytearray()
        self.err = bytearray()
        self._arrivals: list[tuple[int, float]] = []  # (end offset of a chunk, when it arrived)
        self._pos = 0
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out, True), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, sink: bytearray, timed: bool) -> None:
        fd = stream.fileno()
        while chunk := os.read(fd, 65536):
            now = time.perf_counter()
            with self._cond:
                sink.extend(chunk)
                if timed:
                    self._arrivals.append((len(sink), now))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: bytes, timeout: float) -> float:
        """Seconds from process start to the arrival of the first ``pattern`` after the last match."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                index = self.out.find(pattern, self._pos)
                if index >= 0:
                    end = index + len(pattern)
                    self._pos = end
                    arrived = next(t for offset, t in self._arrivals if offset >= end)
                    return arrived - self.start
                if self.proc.poll() is not None and not any(r.is_alive() for r in self._readers[:1]):
                    raise RuntimeError(
                        f"{self.argv[0]} exited ({self.proc.returncode}) before {pattern!r}: {self.tail()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {pattern!r} from {self.argv[0]} within {timeout:g} s: {self.tail()}")
                self._cond.wait(min(left, 1.0))

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def command(self, shell: str, timeout: float) -> bytes:
        """Run ``shell`` in the guest shell; returns its console output (ends at an unforgeable marker)."""
        with self._cond:
            begin = len(self.out)
        self.send(f"{shell}; echo END$((6*7))END\n")
        self.wait_for(b"END42END", timeout)
        with self._cond:
            return bytes(self.out[begin : self._pos])

    def tail(self) -> str:
        text = (bytes(self.out[-600:]) + b" | stderr: " + bytes(self.err[-600:])).decode(errors="replace")
        return text.replace("\r", "").replace("\n", " / ")

    def close(self) -> None:
        """Kill the whole process group and reap it."""
        if self.proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(3)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.proc.wait()
        for reader in self._readers:
            reader.join(2)

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Monitor:
    """QEMU's human monitor (HMP) on a Unix socket."""

    def __init__(self, path: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)
        self.sock.settimeout(timeout)
        self._read_prompt()

    def _read_prompt(self) -> str:
        data = b""
        while not data.endswith(b"(qemu) "):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"QEMU monitor closed: {data[-300:]!r}")
            data += chunk
        return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", data.decode(errors="replace"))

    def __call__(self, command: str) -> str:
        self.sock.sendall(command.encode() + b"\n")
        return self._read_prompt()

    def close(self) -> None:
        self.sock.close()


def qemu_argv(
    qemu: str, kernel: Path, initrd: Path, cmdline: str, monitor: Path, extra: Sequence[str] = ()
) -> list[str]:
    """QEMU microvm (ACPI on, its default) with the same guest, 2 vCPUs, 256 MiB, serial on stdio."""
    return [
        qemu,
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host",
        "-m",
        "256M",
        "-smp",
        "2",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-monitor",
        f"unix:{monitor},server=on,wait=off",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        cmdline,
        *extra,
    ]
