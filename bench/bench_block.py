"""virtio-blk's request path on the host: the CPU the device spends per request against ``preadv`` alone.

Run: ``python bench/bench_block.py [--requests 2000] [--runs 5]``. No guest and no KVM: the test suite's
driver (tests/virtio_driver.py) plays the guest on anonymous memory, one read request at a time
(queue depth 1, as ``dd iflag=direct`` issues them), each an indirect chain of a header, the data
buffers and a status byte, re-posted with a new sector each time. The device runs as in a machine:
its own thread takes the chain from the ring, parses it, reads the disk image (a 64 MiB file in the
page cache, through the copy-on-write overlay) straight into the buffers with ``preadv``, writes the
used element and raises its interrupt.

- **device**: CPU seconds of every thread but the driver's (the device's thread, the event loop's
  share is the driver's) per request, in µs.
- **preadv floor**: CPU seconds of one ``preadv`` of the same buffers from the same file, in µs.

CPU time rather than wall time: both stay put on a loaded host.

Three shapes: 128 buffers of 4 KiB (a 512 KiB request over scattered guest pages, the most a Linux
guest sends with 4 KiB pages), one 512 KiB buffer, and one 4 KiB buffer (a random-read IOPS load's
request, where the device's own cost is all there is). Prints a Markdown table: min / median / max.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the device tests' driver

from common import machine_info, summary  # noqa: E402
from virtio_driver import RING_FEATURES, Driver, running  # noqa: E402

from smolvmm.devices.virtio.block import T_IN, VirtioBlock  # noqa: E402
from smolvmm.devices.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE  # noqa: E402
from smolvmm.host.memory import GuestMemory  # noqa: E402

DISK = 64 << 20
REQUEST = 512 << 10  # the largest request
SHAPES = {"128 x 4 KiB": (128, 4096), "1 x 512 KiB": (1, REQUEST), "1 x 4 KiB": (1, 4096)}
"""Each request's data buffers: (how many, bytes each)."""


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def device_run(image: Path, buffers: int, size: int, requests: int) -> float:
    """µs of device CPU per request (the process's CPU time minus the driver's own thread)."""
    driver = Driver(VirtioBlock(image), GuestMemory.anonymous([(0, 64 << 20)]))
    driver.start(RING_FEATURES)
    header, status, target = driver.alloc(16), driver.alloc(1), driver.alloc(REQUEST)
    chain = [(header, 16, False), *((target + i * size, size, True) for i in range(buffers)), (status, 1, True)]
    table = driver.alloc(16 * len(chain))
    for i, (gpa, length, writable) in enumerate(chain):
        flags = (DESC_F_WRITE if writable else 0) | (DESC_F_NEXT if i + 1 < len(chain) else 0)
        driver.memory.write(table + 16 * i, struct.pack("<QIHH", gpa, length, flags, i + 1))
    # descriptor 0 points at the table; every request makes it available again
    driver.memory.write(driver.desc_addr(0), struct.pack("<QIHH", table, 16 * len(chain), DESC_F_INDIRECT, 0))
    async with running(driver):
        process, own = cpu_seconds(), time.thread_time()
        for request in range(requests):
            sector = request * (buffers * size // 512) % ((DISK - REQUEST) // 512)
            driver.memory.write(header, struct.pack("<IIQ", T_IN, 0, sector))
            driver.publish(0, 0)
            driver.kick(0)
            while not driver.take_used(0):
                await anyio.sleep(0)
        device = (cpu_seconds() - process) - (time.thread_time() - own)
    driver.transport.close()
    return device / requests * 1e6


def floor_run(image: Path, buffers: int, size: int, requests: int) -> float:
    """CPU µs per ``preadv`` of the same buffers from the same file."""
    memory = GuestMemory.anonymous([(0, REQUEST)])
    views = [memory.view(i * size, size) for i in range(buffers)]
    fd = os.open(image, os.O_RDONLY)
    try:
        start = cpu_seconds()
        for request in range(requests):
            os.preadv(fd, views, request * buffers * size % (DISK - REQUEST))
        return (cpu_seconds() - start) / requests * 1e6
    finally:
        os.close(fd)
        memory.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = parser.parse_args()
    results: dict[str, object] = {"machine": machine_info(), "requests": args.requests}
    with tempfile.TemporaryDirectory() as scratch:
        image = Path(scratch) / "disk.img"
        image.write_bytes(os.urandom(DISK))
        for shape, (buffers, size) in SHAPES.items():
            device, floor = [], []
            for _ in range(args.runs):
                device.append(anyio.run(device_run, image, buffers, size, args.requests))
                floor.append(floor_run(image, buffers, size, args.requests))
            results[shape] = {"device_us": summary(device), "floor_us": summary(floor)}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"machine: {results['machine']}; {args.requests} requests per run, {args.runs} runs\n")
    print("| request | device CPU µs/request | `preadv` floor µs | device / floor (medians) |")
    print("|---|---|---|---|")
    for shape in SHAPES:
        entry = results[shape]
        assert isinstance(entry, dict)
        device, floor = entry["device_us"], entry["floor_us"]
        cells = [" / ".join(f"{s[k]:.0f}" for k in ("min", "median", "max")) for s in (device, floor)]
        print(f"| {shape} | {cells[0]} | {cells[1]} | {device['median'] / floor['median']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
