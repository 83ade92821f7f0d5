"""Benchmark the .smolmachine format on a snapshot's guest RAM; prints Markdown tables.

Run: ``python bench/bench_format.py [--bundle PATH | --synthetic MIB] [--repeat 5]``. The RAM comes from
the demo bundle (``python -m smolvmm demo`` makes it) or ``--bundle``, read through ``open_bundle``;
``--synthetic`` uses ``smolformat.samples.realistic_memory`` instead, for a host that cannot boot a guest.
The bundles written hold that RAM beside sample vCPU, VM and device state (tens of KiB). Writes, decodes
and maps go through smolformat's writer and reader and smolvmm's ``GuestMemory``, as a snapshot and a
restore do. Timings are the median and the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

from common import machine_info

from smolformat import BundleContents, FormatError, make_metadata, open_bundle, samples, write_bundle
from smolformat.layout import SectionKind
from smolformat.pages import DEFAULT_CHUNK_SIZE
from smolformat.payloads import payload
from smolvmm.cli.demo import demo_bundle
from smolvmm.host.memory import GuestMemory

MIB = 1 << 20
PAGE = 4096


def _contents(layout: list[tuple[int, int]], memory: Sequence[Any]) -> BundleContents:
    """A bundle of ``memory`` (one buffer per ``layout`` region) with sample vCPU, VM and device state."""
    device_config, states = samples.devices(1)  # without its block device (index 3): no disk comes along
    return BundleContents(
        config=samples.machine_config("x86_64", layout, device_config[:3] + device_config[4:]),
        vcpus=[samples.x86_64_vcpu(0), samples.x86_64_vcpu(1)],
        vm_state=samples.x86_64_vm_state(),
        devices=states[:3] + states[4:],
        memory=memory,
        metadata=make_metadata("kvm-hardware"),
    )


def _section(path: Path, kind: SectionKind) -> bytes:
    """The stored bytes of the first section of ``kind`` in ``path``."""
    with open_bundle(path) as bundle:
        found = next(s for s in bundle.sections if s.kind == kind)
        return os.pread(bundle.fileno(), found.length, found.offset)


def _timed(action: Callable[[], object]) -> tuple[float, float]:
    """Wall and process-CPU seconds of one call of ``action``."""
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return time.perf_counter() - wall, time.process_time() - cpu


def _stats(values: list[float]) -> tuple[float, float]:
    """Median and min."""
    return statistics.median(values), min(values)


def _wall_cpu(times: list[tuple[float, float]]) -> tuple[str, str]:
    """Median and best wall ms of ``times`` (wall, CPU), the median with its median process CPU ms."""
    walls = [wall for wall, _ in times]
    cpu = statistics.median(cpu for _, cpu in times)
    return f"{statistics.median(walls) * 1e3:.0f} ms (CPU {cpu * 1e3:.0f} ms)", f"{min(walls) * 1e3:.0f} ms"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


# name: (memory_encoding, other write_bundle arguments, label)
VARIANTS = {
    "raw": ("raw", {}, "raw, default dedup and zero gaps"),
    "raw-smallest": (
        "raw",
        {"min_dedup_run": 1, "min_zero_gap": 1},
        "raw, `pack --raw --smallest` (min_dedup_run=1, min_zero_gap=1)",
    ),
    "zstd": ("zstd", {}, f"zstd, level 3, {DEFAULT_CHUNK_SIZE // MIB} MiB chunks, 2 threads"),
}


def measure(layout: list[tuple[int, int]], memory: Sequence[Any], scratch: Path, repeat: int) -> tuple[str, list[str]]:
    """A note on ``memory`` (guest RAM laid out as ``layout``), and Markdown tables: sizes, then timings."""
    contents = _contents(layout, memory)
    ram_size = sum(size for _, size in layout)
    zero_page = bytes(PAGE)
    zero_pages = sum(
        view[p : p + PAGE] == zero_page for view in map(memoryview, memory) for p in range(0, len(view), PAGE)
    )
    sizes = ["| bundle | RAM section MiB | RAM / section | extents |", "|---|---|---|---|"]
    rows = ["| measure | median | best | median / write floor |", "|---|---|---|---|"]
    paths = {name: scratch / f"{name}.smolmachine" for name in VARIANTS}
    extents = {}
    non_zero = b"".join(
        page
        for view in map(memoryview, memory)
        for p in range(0, len(view), PAGE)
        if (page := view[p : p + PAGE]) != zero_page
    )
    floor = [_timed(partial(_write_floor, scratch / "floor.bin", non_zero)) for _ in range(repeat)]
    floor_median = statistics.median(wall for wall, _ in floor)
    label = f"write floor: `write` + `fsync` of the {len(non_zero) / MIB:.1f} MiB of non-zero pages, same directory"
    rows.append(_row(label, *_wall_cpu(floor), "1"))
    digest = [_timed(partial(hashlib.blake2b, non_zero, digest_size=32)) for _ in range(repeat)]
    rows.append(
        _row(
            "BLAKE2b-256 of those bytes (the section digest's cost)",
            *_wall_cpu(digest),
            f"{statistics.median(wall for wall, _ in digest) / floor_median:.2f}",
        )
    )
    del non_zero
    for name, (encoding, options, label) in VARIANTS.items():
        write = partial(write_bundle, paths[name], contents, memory_encoding=encoding, **options)
        times = [_timed(write) for _ in range(repeat)]
        ratio = statistics.median(wall for wall, _ in times) / floor_median
        rows.append(_row(f"write ({label}), fsync included", *_wall_cpu(times), f"{ratio:.2f}"))
        stored = len(_section(paths[name], SectionKind.MEMORY_DATA))
        index = payload(SectionKind.MEMORY_INDEX).parse(_section(paths[name], SectionKind.MEMORY_INDEX))
        extents[name] = index.extents
        sizes.append(_row(label, f"{stored / MIB:.1f}", f"{ram_size / stored:.2f}", str(len(extents[name]))))
    decoded = sum(chunk.length for chunk in extents["zstd"])  # non-zero chunks only

    with open_bundle(paths["zstd"]) as bundle:
        for threads in (1, 2):
            walls, shares = [], []
            for _ in range(repeat):
                guest = GuestMemory.anonymous(layout)
                views = [guest.region_view(i) for i in range(len(layout))]
                wall, cpu = _timed(lambda views=views, threads=threads: bundle.read_memory_into(views, threads))
                guest.close()
                walls.append(wall)
                shares.append(cpu / wall)
            median, best = (f"{_ms(s)} = {decoded / MIB / s:,.0f} MiB/s" for s in _stats(walls))
            label = f"zstd: decode all RAM into fresh guest memory, {threads} thread(s)"
            rows.append(_row(label, f"{median}, CPU/wall {statistics.median(shares):.2f}", best, ""))

    for name in ("raw", "raw-smallest"):
        opens, maps = [], []
        for _ in range(repeat):
            start = time.perf_counter()
            bundle = open_bundle(paths[name])
            opened = time.perf_counter()
            guest = GuestMemory.anonymous(layout)
            guest.map_file(bundle.fileno(), bundle.memory_extents())
            opens.append(opened - start)
            maps.append(time.perf_counter() - opened)
            bundle.close()
            guest.close()
        both = [o + m for o, m in zip(opens, maps)]
        cells = (
            f"{_ms(b)} (open {_ms(o)}, map {_ms(m)})" for b, o, m in zip(_stats(both), _stats(opens), _stats(maps))
        )
        rows.append(_row(f"{VARIANTS[name][2]}: open + reserve RAM + mmap {len(extents[name])} extents", *cells, ""))
    note = (
        f"{ram_size / MIB:.0f} MiB of RAM, {zero_pages * PAGE * 100 // ram_size}% zero pages; zstd decodes"
        f" {len(extents['zstd'])} non-zero chunks, {decoded / MIB:.0f} MiB (all-zero chunks are skipped)"
    )
    return note, [*sizes, "", *rows]


def _write_floor(path: Path, data: bytes) -> None:
    """What writing ``data`` costs at least: plain ``write`` calls and an ``fsync``, to a new file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()


def _guest_ram(layout: list[tuple[int, int]], memory: bytes | bytearray) -> GuestMemory:
    """``memory`` copied into guest RAM as a guest would hold it: pages it never wrote stay untouched."""
    ram = GuestMemory.anonymous(layout)
    view, source = ram.region_view(0), memoryview(memory)
    zero_block = bytes(16 * PAGE)
    for at in range(0, len(source), len(zero_block)):
        if source[at : at + len(zero_block)] != zero_block:
            view[at : at + len(zero_block)] = source[at : at + len(zero_block)]
    return ram


def _snapshot_ram(source: Path) -> tuple[list[tuple[int, int]], GuestMemory]:
    """The RAM layout of bundle ``source`` and its RAM, decoded by the reader into fresh guest memory."""
    with open_bundle(source) as bundle:
        layout = [(r.gpa, r.size) for r in bundle.config.ram]
        ram = GuestMemory.anonymous(layout)
        bundle.read_memory_into([ram.region_view(i) for i in range(len(layout))])
    return layout, ram


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source_group = parser.add_mutually_exclusive_group()
    source_group.add_argument("--bundle", type=Path, help="snapshot to take RAM from (default: the demo bundle)")
    source_group.add_argument("--synthetic", type=int, metavar="MIB", help="synthetic RAM of MIB MiB instead")
    parser.add_argument("--repeat", type=int, default=5, help="runs per timing (default 5)")
    args = parser.parse_args()
    with ExitStack() as stack:
        if args.synthetic is not None:
            layout = [(0, args.synthetic * MIB)]
            ram = _guest_ram(layout, samples.realistic_memory(args.synthetic * MIB))
            stack.callback(ram.close)
            memory: list[Any] = [ram.region_view(0)]
            what = "synthetic RAM (`samples.realistic_memory`)"
        else:
            source = args.bundle or Path(demo_bundle())
            if not source.exists():
                hint = "; run `python -m smolvmm demo` first" if args.bundle is None else ""
                print(f"bench_format: no bundle at {source}{hint}", file=sys.stderr)
                return 1
            try:
                layout, ram = _snapshot_ram(source)
            except FormatError as exc:
                print(f"bench_format: {source}: {exc}", file=sys.stderr)
                return 1
            stack.callback(ram.close)
            memory = [ram.region_view(i) for i in range(len(layout))]
            what = f"`{source}`"
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-format.")))
        note, tables = measure(layout, memory, scratch, args.repeat)
    machine = machine_info()
    print(f"{what}: {note}.")
    print(
        f"{machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}; load {machine['load']} after the"
        f" run; {args.repeat} runs per timing. Decode MiB/s = MiB that zstd produced / time; CPU/wall = process"
        " CPU time / wall time (2.00: both cores busy); CPU: process CPU time (all threads, kernel included).\n"
    )
    print("\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
