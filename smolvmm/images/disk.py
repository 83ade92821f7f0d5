"""Small ext4 disk images for tests and demos, built without root or loop devices."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from smolvmm.errors import ImageError


def ext4_image(path: Path, contents: Path | None = None, size_mib: int = 32) -> Path:
    """Create an ext4 image of ``size_mib`` at ``path`` holding the files of ``contents`` (``mke2fs -d``)."""
    if shutil.which("mke2fs") is None:
        raise ImageError("mke2fs not found: apt-get install e2fsprogs")
    args = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "smolvmm"]
    if contents is not None:
        args += ["-d", str(contents)]
    result = subprocess.run([*args, str(path), f"{size_mib}M"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ImageError(f"mke2fs {path} failed: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
    return path
