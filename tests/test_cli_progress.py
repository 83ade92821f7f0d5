"""Progress on a terminal, silence elsewhere: the CLI run on a pseudo-terminal, as a user sees it."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from bundles import contents

from smolformat import samples, write_bundle

READ_LIMIT = 600  # seconds: a bound on a stuck child, not a measurement


class Terminal:
    """A command whose stdin, stdout and stderr are one pseudo-terminal of 200x24, read as it writes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self._controller, terminal = pty.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
        self.process = subprocess.Popen(
            args, stdin=terminal, stdout=terminal, stderr=terminal, env=env, start_new_session=True
        )
        os.close(terminal)
        self.seen = b""

    def read_until(self, pattern: bytes) -> re.Match[bytes] | None:
        """Read until ``pattern`` shows (with every \\r redraw as a line) or the command ends."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + READ_LIMIT
        while not (match := regex.search(self.seen)) and time.monotonic() < deadline:
            if not select.select([self._controller], [], [], 1)[0]:
                continue
            try:
                chunk = os.read(self._controller, 65536)
            except OSError:  # EIO: the command closed the terminal
                return None
            if not chunk:
                return None
            self.seen += chunk
        return match

    def lines(self) -> list[str]:
        return [line for line in re.split(r"[\r\n]+", self.seen.decode(errors="replace")) if line.strip()]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        os.close(self._controller)


def test_the_first_demo_on_a_clean_cache_shows_progress_at_once(tmp_path: Path) -> None:
    """Resolving, downloading and building the demo guest are shown as they happen, long before
    the guest boots (the test stops the demo once the download shows)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TERM": "xterm", "SMOLVMM_PROGRESS_DELAY": "0"}
    env.pop("NO_COLOR", None)
    demo = Terminal([sys.executable, "-m", "smolvmm", "demo"], env)
    try:
        download = demo.read_until(rb"downloading linux-image-[^\r\n]*\d+%\|[^\r\n]*/\d[\d.]*M")
    finally:
        demo.stop()
    assert download, demo.seen.decode(errors="replace")[-2000:]
    lines = demo.lines()
    # The first thing the demo prints is a progress line with the time so far.
    assert re.match(r"looking up the default guest's Debian packages \[\d\d:\d\d\]", lines[0]), lines[:3]


@pytest.fixture(scope="module")
def big_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw bundle holding 192 MiB of guest-like RAM: long enough to pack that progress shows."""
    work = tmp_path_factory.mktemp("big")
    ram = [(0, 192 << 20)]
    device_config, _ = samples.devices(1)
    big = dataclasses.replace(
        contents(work),
        config=samples.machine_config("x86_64", ram, device_config, vcpus=2),
        memory=[samples.realistic_memory(192 << 20, seed=7)],
    )
    path = work / "big.smolmachine"
    write_bundle(path, big, memory_encoding="raw")
    return path


def test_pack_and_verify_show_bytes_done_of_total_on_a_terminal(big_bundle: Path, tmp_path: Path) -> None:
    env = {**os.environ, "TERM": "xterm", "SMOLVMM_PROGRESS_DELAY": "0"}  # bars at once, however fast the work
    out = tmp_path / "out.smolmachine"
    pack = Terminal([sys.executable, "-m", "smolvmm", "pack", "--zstd", str(big_bundle), str(out)], env)
    try:
        assert pack.read_until(rb": packed \(zstd\)"), pack.seen[-2000:]
    finally:
        pack.stop()
    lines = pack.lines()
    assert any(re.match(rf"reading {re.escape(str(big_bundle))}: +\d+%\|.*\| [\d.]+M/[\d.]+M ", line) for line in lines)
    assert any(re.match(rf"writing {re.escape(str(out))} \[\d\d:\d\d\], [\d.]+MB", line) for line in lines), lines
    verify = Terminal([sys.executable, "-m", "smolvmm", "verify", str(big_bundle)], env)
    try:
        assert verify.read_until(rb": ok \("), verify.seen[-2000:]
    finally:
        verify.stop()
    sized = [line for line in verify.lines() if line.startswith(f"verifying {big_bundle}: ")]
    assert sized and re.search(r"\d+%\|.*\| [\d.]+M?/[\d.]+M ", sized[-1]), verify.lines()


def test_no_progress_when_stderr_is_not_a_terminal(big_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.smolmachine"
    quick = {**os.environ, "SMOLVMM_PROGRESS_DELAY": "0"}
    pack = subprocess.run(
        [sys.executable, "-m", "smolvmm", "pack", "--zstd", str(big_bundle), str(out)],
        capture_output=True,
        text=True,
        timeout=READ_LIMIT,
        env=quick,
    )
    assert pack.returncode == 0 and pack.stderr == "" and pack.stdout == f"{out}: packed (zstd)\n"
    verify = subprocess.run(
        [sys.executable, "-m", "smolvmm", "verify", str(out)],
        capture_output=True,
        text=True,
        timeout=READ_LIMIT,
        env=quick,
    )
    assert verify.returncode == 0 and verify.stderr == ""
