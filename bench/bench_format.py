"""Benchmark the .smolmachine format on synthetic guest RAM; prints a table.

Run: ``python bench/bench_format.py [--ram-mib 256]``. RAM content is ``smolformat.samples.realistic_memory``:
zero runs, duplicated runs (page-cache-like), text/code-like pages, random pages.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import mmap
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from smolformat import BundleContents, make_metadata, open_bundle, samples, verify_bundle, write_bundle
from smolformat.pages import MIN_DEDUP_RUN

MIB = 1 << 20
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FIXED = 0x10
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE


def _contents(ram: bytearray) -> BundleContents:
    device_config, states = samples.devices(1)
    return BundleContents(
        config=samples.machine_config(
            "x86_64", [(0, len(ram))], device_config[:3] + device_config[4:], vcpus=2
        ),
        vcpus=[samples.x86_64_vcpu(0), samples.x86_64_vcpu(1)],
        vm_state=samples.x86_64_vm_state(),
        devices=states[:3] + states[4:],
        memory=[ram],
        metadata=make_metadata("kvm-hardware"),
    )


def _timed(action, repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _map_raw(path: Path, ram_size: int) -> tuple[float, int]:
    """Reserve guest RAM, then MAP_FIXED|MAP_PRIVATE every extent from the bundle: (seconds, extents)."""
    with open_bundle(path) as bundle:
        start = time.perf_counter()
        base = _libc.mmap(None, ram_size, PROT_RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        extents = bundle.memory_extents()
        for gpa, length, file_offset in extents:
            got = _libc.mmap(
                base + gpa, length, PROT_RW, mmap.MAP_PRIVATE | MAP_FIXED, bundle.fileno(), file_offset
            )
            if got != base + gpa:
                raise OSError(ctypes.get_errno(), "mmap failed")
        elapsed = time.perf_counter() - start
        _libc.munmap(base, ram_size)
    return elapsed, len(extents)


def _cold_open_ms(path: Path) -> float:
    """First open in a fresh interpreter (imports done, nothing opened yet)."""
    code = (
        f"import time, smolformat; t = time.perf_counter(); smolformat.open_bundle({str(path)!r}).close(); "
        "print((time.perf_counter() - t) * 1e3)"
    )
    return float(
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram-mib", type=int, default=256)
    args = parser.parse_args()
    ram_size = args.ram_mib * MIB
    ram = samples.realistic_memory(ram_size)
    zero_page = bytes(4096)
    zero_pages = sum(1 for p in range(0, ram_size, 4096) if ram[p : p + 4096] == zero_page)
    nonzero = ram_size - zero_pages * 4096
    rows: list[tuple[str, str]] = [
        ("guest RAM", f"{args.ram_mib} MiB, {zero_pages * 100 // (ram_size // 4096)}% zero pages")
    ]
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as scratch:
        raw, zstd = Path(scratch) / "raw.smolmachine", Path(scratch) / "zstd.smolmachine"
        contents = _contents(ram)
        rows.append(
            ("write raw", f"{_timed(lambda: write_bundle(raw, contents, memory_encoding='raw')):.2f} s")
        )
        rows.append(
            (
                "write zstd (2 threads, level 3)",
                f"{_timed(lambda: write_bundle(zstd, contents, memory_encoding='zstd')):.2f} s",
            )
        )
        for name, path in (("raw", raw), ("zstd", zstd)):
            size = path.stat().st_size
            rows.append((f"{name} bundle size", f"{size / MIB:.1f} MiB (RAM/size {ram_size / size:.2f})"))
        for min_run in (0, 1, 4, MIN_DEDUP_RUN):
            variant = Path(scratch) / f"dedup{min_run}.smolmachine"
            write_bundle(variant, contents, memory_encoding="raw", min_dedup_run=min_run)
            with open_bundle(variant) as bundle:
                extents = len(bundle.memory_extents())
            label = "off" if min_run == 0 else f"runs >= {min_run} pages"
            rows.append((f"raw, dedup {label}", f"{variant.stat().st_size / MIB:.1f} MiB, {extents} extents"))
            variant.unlink()
        for threads in (1, 2):
            target = mmap.mmap(-1, ram_size)
            with open_bundle(zstd) as bundle:
                cpu_start = time.process_time()
                seconds = _timed(lambda: bundle.read_memory_into([target], threads), repeat=3)
                cpu_share = (time.process_time() - cpu_start) / 3 / seconds  # cores this process got
            target.close()
            rows.append(
                (
                    f"zstd decode, {threads} thread(s)",
                    f"{ram_size / MIB / seconds:.0f} MiB/s of RAM, {nonzero / MIB / seconds:.0f} MiB/s non-zero,"
                    f" cpu/wall {cpu_share:.2f}",
                )
            )
        target = mmap.mmap(-1, ram_size)
        with open_bundle(raw) as bundle:
            seconds = _timed(lambda: bundle.read_memory_into([target], 2), repeat=3)
        target.close()
        rows.append(("raw copy into RAM (preadv)", f"{ram_size / MIB / seconds:.0f} MiB/s of RAM"))
        open_bundle(raw).close()
        for name, path in (("raw", raw), ("zstd", zstd)):
            warm = _timed(lambda: open_bundle(path).close(), repeat=50) * 1e3
            rows.append((f"open+parse {name}, warm (median of 50)", f"{warm:.2f} ms"))
            rows.append((f"open+parse {name}, cold (new process)", f"{_cold_open_ms(path):.1f} ms"))
        for name, path in (("raw", raw), ("zstd", zstd)):
            rows.append(
                (f"verify {name} (hash all, decode zstd)", f"{_timed(lambda: verify_bundle(path)):.2f} s")
            )
        map_seconds, extents = _map_raw(raw, ram_size)
        rows.append(
            ("mmap raw memory (MAP_FIXED|MAP_PRIVATE)", f"{map_seconds * 1e3:.2f} ms for {extents} extents")
        )
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
