"""Benchmark turning an OCI image into a base disk (host side, natively); prints a Markdown table.

Run: ``python bench/bench_image.py [--repeat 3]``. The image is the test suite's Debian bookworm
minbase + python3 layout (mmdebstrap + umoci, three layers; made and cached on first use).
smolvmm's path (verify blobs, apply layers in Python, ``mke2fs -d``) runs in an empty cache each
time; the reference does the same work with Go and C tools: ``umoci unpack`` (which verifies and
applies the layers) then the same ``mke2fs -d``. Timings are the median and best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import oci_images  # noqa: E402
from common import machine_info  # noqa: E402

from smolvmm.oci.rootdisk import DEFAULT_HEADROOM, make_ext4, root_disk  # noqa: E402
from smolvmm.oci.source import open_source  # noqa: E402


def _smolvmm(layout: Path) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["XDG_CACHE_HOME"] = scratch
        start = time.perf_counter()
        with open_source(f"oci:{layout}:{oci_images.TAG}", Path(scratch)) as image:
            root_disk(image, Path(scratch))
        return time.perf_counter() - start


def _reference(layout: Path) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        subprocess.run(
            ["umoci", "unpack", "--image", f"{layout}:{oci_images.TAG}", f"{scratch}/bundle"],
            check=True,
            capture_output=True,
        )
        make_ext4(Path(scratch) / "bundle" / "rootfs", Path(scratch) / "disk.ext4", DEFAULT_HEADROOM)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cache = os.environ.get("XDG_CACHE_HOME")
    layout = oci_images.oci_layout()
    rows = []
    for name, measure in (
        ("smolvmm: verify + apply layers + mke2fs -d", _smolvmm),
        ("reference: umoci unpack + mke2fs -d", _reference),
    ):
        times = [measure(layout) for _ in range(args.repeat)]
        rows.append((name, statistics.median(times), min(times)))
    if cache is not None:
        os.environ["XDG_CACHE_HOME"] = cache
    print(f"machine: {machine_info()}")
    print("| OCI layout -> ext4 base disk (Debian minbase + python3, 3 layers) | median s | best s |")
    print("|---|---|---|")
    for name, median, best in rows:
        print(f"| {name} | {median:.2f} | {best:.2f} |")
    print(f"ratio smolvmm / reference (median): {rows[0][1] / rows[1][1]:.2f}")


if __name__ == "__main__":
    main()
