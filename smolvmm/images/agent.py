"""Building the guest agent (agent.c) into a static binary for the default guest's initramfs."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from smolvmm.errors import ImageError

SOURCE = Path(__file__).with_name("agent.c")
GUEST_PATH = "bin/smolvmm-agent"


def build_agent(source: Path = SOURCE) -> bytes:
    """Compile agent.c (or another guest helper's ``source``) with the host's gcc, statically
    linked (glibc's libc.a from libc6-dev)."""
    if shutil.which("gcc") is None:
        raise ImageError("gcc is needed to build the guest agent: run tools/setup (gcc, libc6-dev)")
    with tempfile.TemporaryDirectory(prefix="smolvmm-agent-") as scratch:
        binary = Path(scratch) / "smolvmm-agent"
        result = subprocess.run(
            ["gcc", "-static", "-Os", "-s", "-Wall", "-o", str(binary), str(source)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise ImageError(f"building {source.name} failed: {result.stderr.strip().splitlines()[-1]}")
        return binary.read_bytes()
