"""How save and host-side restore grow with guest RAM: synthetic guests of 256 MiB to 16 GiB, natively.

Run: ``python bench/bench_scaling.py [--sizes 256M,1G,4G,16G] [--repeat 3] [--out bench/plots]``.
Each guest's RAM is a ``GuestMemory`` reservation of which the guest "wrote" one eighth (at most
1 GiB): 64 MiB blocks of ``smolformat.samples.realistic_memory`` (a different seed each); the rest
was never touched, as in a guest that has not used all its RAM. For each size:

- **save**: ``write_bundle`` of that RAM (raw, defaults, fsync included) beside sample vCPU, VM and
  device state, and the write floor (plain ``write`` + ``fsync`` of its non-zero pages);
- **restore, host side**: what of a restore depends on RAM: ``open_bundle``, reserving RAM and
  mapping the bundle's extents ``MAP_PRIVATE``, and a KVM VM with that RAM as its memory slot
  (``KVM_CREATE_VM`` + ``KVM_SET_USER_MEMORY_REGION``; needs /dev/kvm, PVM included).

Prints a Markdown table (medians of ``--repeat``) and writes ``save_scaling.png`` and
``restore_scaling.png`` into ``--out`` (needs matplotlib: ``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from bench_format import _contents, _write_floor
from bench_restore_floor import CREATE_VM, SET_USER_MEMORY_REGION
from common import machine_info

from smolformat import open_bundle, samples, write_bundle
from smolvmm.config import parse_size
from smolvmm.host.memory import GuestMemory

MIB = 1 << 20
PAGE = 4096
BLOCK = 64 * MIB


def _guest(size: int) -> tuple[GuestMemory, int]:
    """RAM of ``size`` bytes with one eighth (at most 1 GiB) written; returns it and its non-zero bytes."""
    ram = GuestMemory.anonymous([(0, size)])
    view = ram.region_view(0)
    written = min(size // 8, 1 << 30)
    non_zero = 0
    zero_page = bytes(PAGE)
    for seed, at in enumerate(range(0, written, BLOCK)):
        block = samples.realistic_memory(min(BLOCK, written - at), seed=seed + 1)
        source = memoryview(block)
        for page in range(0, len(block), 16 * PAGE):  # leave all-zero stretches untouched
            piece = source[page : page + 16 * PAGE]
            if piece != bytes(len(piece)):
                view[at + page : at + page + len(piece)] = piece
        non_zero += sum(PAGE for p in range(0, len(block), PAGE) if source[p : p + PAGE] != zero_page)
    return ram, non_zero


def _non_zero_bytes(view: memoryview, written: int) -> bytes:
    zero_page = bytes(PAGE)
    return b"".join(page for p in range(0, written, PAGE) if (page := view[p : p + PAGE]) != zero_page)


def _restore(path: Path, kvm: int) -> float:
    """Seconds for the RAM-dependent part of a host-side restore of ``path``."""
    began = time.perf_counter()
    with open_bundle(path) as bundle:
        layout = [(r.gpa, r.size) for r in bundle.config.ram]
        ram = GuestMemory.anonymous(layout)
        ram.map_file(bundle.fileno(), bundle.memory_extents())
        vm = fcntl.ioctl(kvm, CREATE_VM, 0)
        for slot, region in enumerate(ram.regions):
            fcntl.ioctl(
                vm, SET_USER_MEMORY_REGION, struct.pack("<IIQQQ", slot, 0, region.gpa, region.size, region.host_address)
            )
        seconds = time.perf_counter() - began
    os.close(vm)
    ram.close()
    return seconds


def _plot(out: Path, sizes: list[int], series: dict[str, list[float]], name: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    gib = [s / (1 << 30) for s in sizes]
    for label, values in series.items():
        axes.plot(gib, [v * 1e3 for v in values], marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(gib, [f"{s // MIB} MiB" if s < 1 << 30 else f"{s >> 30} GiB" for s in sizes])
    axes.set_xlabel("guest RAM (one eighth written, at most 1 GiB)")
    axes.set_ylabel("ms (median)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = out / name
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256M,1G,4G,16G", help="guest RAM sizes (default 256M,1G,4G,16G)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing (default 3)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "plots", help="directory for the PNGs")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    rows, save, floor, restore = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-scaling.") as scratch:
        path = Path(scratch) / "guest.smolmachine"
        for size in sizes:
            ram, non_zero = _guest(size)
            contents = _contents([(0, size)], [ram.region_view(0)])
            saves, cpus = [], []
            for _ in range(args.repeat):
                began, cpu = time.perf_counter(), time.process_time()
                write_bundle(path, contents)
                saves.append(time.perf_counter() - began)
                cpus.append(time.process_time() - cpu)
            data = _non_zero_bytes(ram.region_view(0), min(size // 8, 1 << 30))
            floors = []
            for _ in range(args.repeat):
                began = time.perf_counter()
                _write_floor(Path(scratch) / "floor.bin", data)
                floors.append(time.perf_counter() - began)
            del data, contents
            ram.close()
            restores = [_restore(path, kvm) for _ in range(args.repeat)]
            save.append(statistics.median(saves))
            floor.append(statistics.median(floors))
            restore.append(statistics.median(restores))
            label = f"{size // MIB} MiB" if size < 1 << 30 else f"{size >> 30} GiB"
            rows.append(
                f"| {label} | {non_zero / MIB:.0f} | {save[-1] * 1e3:.0f} | {statistics.median(cpus) * 1e3:.0f} |"
                f" {floor[-1] * 1e3:.0f} | {save[-1] / floor[-1]:.2f} | {restore[-1] * 1e3:.1f} |"
            )
            path.unlink()
    args.out.mkdir(parents=True, exist_ok=True)
    plots = [
        _plot(
            args.out,
            sizes,
            {"save (write_bundle, raw)": save, "write floor (write + fsync)": floor},
            "save_scaling.png",
            "Save: time against guest RAM",
        ),
        _plot(
            args.out,
            sizes,
            {"restore, RAM-dependent host side": restore},
            "restore_scaling.png",
            "Host-side restore: time against guest RAM",
        ),
    ]
    machine = machine_info()
    print(
        f"{machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}; load {machine['load']} after the"
        f" run; median of {args.repeat}.\n"
    )
    print(
        "| guest RAM | non-zero MiB | save ms | save CPU ms | write floor ms | save / floor |"
        " restore ms (open, map, memslot) |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nPlots: " + ", ".join(str(p) for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
