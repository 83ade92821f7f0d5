"""Soak: clones of one bundle doing disk and network I/O for minutes, in one monitor process,
sampling its open descriptors, threads and RSS every few seconds; a guest-visible error (a
command failing, a block read back different, a download with another digest) is counted.

Needs a /dev/kvm that runs standard guests (here: ``tools/nested-kvm python bench/bench_soak.py``)
and root (a network namespace for user networking). Builds a bundle of the default guest with a
32 MiB raw disk and ``--net user`` unless ``--bundle`` is given; prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from common import guest_ram_rss_kib, machine_info

import smolvmm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from network import private_network  # noqa: E402

PAYLOAD = 256 * 1024
RAM = 128 << 20  # each clone's
GUEST_RAM: list[tuple[int, int]] = []  # (host address, size) of each running clone's RAM regions
# The host's HTTP server, with room for every clone's connection at once (the default backlog of 5
# made passt reset some when eight arrived together).
SERVER = (
    "import http.server as h\n"
    "class Server(h.ThreadingHTTPServer):\n    request_queue_size = 128\n"
    "h.test(h.SimpleHTTPRequestHandler, Server, port=0, bind='127.0.0.1')"
)


def process_sample(began: float) -> dict[str, float | int]:
    """This process now: open descriptors, threads, RSS in KiB, and of it the guests' RAM."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    rss, guests = int(status["VmRSS"].split()[0]), guest_ram_rss_kib(GUEST_RAM)
    return {
        "s": round(time.monotonic() - began, 1),
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": int(status["Threads"]),
        "rss_kib": rss,
        "guest_ram_rss_kib": guests,
        "monitor_rss_kib": rss - guests,
    }


async def clone_loop(bundle: Path, index: int, port: int, digest: str, until: float, tally: dict[str, int]) -> None:
    """One clone: until ``until``, write 512 KiB to its disk and read it back, then download the
    host's payload; every round's outcome is counted in ``tally``."""
    script = (
        f"dd if=/dev/urandom of=/tmp/blk bs=64k count=8 2>/dev/null"
        f" && dd if=/tmp/blk of=/dev/vda bs=64k seek={index * 8} conv=fsync 2>/dev/null"
        f" && dd if=/dev/vda bs=64k skip={index * 8} count=8 2>/dev/null | cmp -s - /tmp/blk"
        f' && gw=$(ip route | awk "/default/ {{print \\$3}}")'
        f" && wget -q -O - http://$gw:{port}/payload | sha256sum"
    )
    async with smolvmm.Machine.restore(bundle) as machine:
        # Where the clone's RAM is mapped (private attributes: a benchmark's view, not an API).
        ram = [(r.host_address, r.size) for r in machine._vm.memory.regions]  # noqa: SLF001
        GUEST_RAM.extend(ram)
        while time.monotonic() < until:
            result = await machine.exec(["sh", "-c", script], timeout=300)
            ok = result.exit_code == 0 and result.stdout.split()[:1] == [digest.encode()]
            tally["rounds"] += 1
            tally["errors"] += not ok
            if not ok:
                print(f"bench_soak: clone {index}: {result}", file=sys.stderr, flush=True)
        await machine.stop()
        for region in ram:
            GUEST_RAM.remove(region)


async def soak(bundle: Path, clones: int, seconds: float, interval: float, port: int, digest: str) -> dict[str, object]:
    began = time.monotonic()
    samples = [process_sample(began)]
    tally = {"rounds": 0, "errors": 0}
    until = began + seconds

    async def sampler() -> None:
        while time.monotonic() < until:
            await anyio.sleep(interval)
            samples.append(process_sample(began))

    async with anyio.create_task_group() as group:
        group.start_soon(sampler)
        for index in range(clones):
            group.start_soon(clone_loop, bundle, index, port, digest, until, tally)
    samples.append(process_sample(began))
    return {"clones": clones, "seconds": seconds, **tally, "samples": samples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle with a raw disk and --net user (default: build one)")
    parser.add_argument("--clones", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--interval", type=float, default=10, help="seconds between samples")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    private_network()
    with tempfile.TemporaryDirectory() as work:
        payload = Path(work) / "payload"
        payload.write_bytes(os.urandom(PAYLOAD))
        server = subprocess.Popen(
            [
                sys.executable,
                "-u",
                "-c",
                SERVER,
            ],
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline().split(" port ")[1].split()[0])
            bundle = args.bundle
            if bundle is None:
                disk = Path(work) / "disk.img"
                disk.write_bytes(b"")
                os.truncate(disk, 32 << 20)
                bundle = Path(work) / "soak.smolmachine"
                build = ["build", "-o", str(bundle), "--mem", f"{RAM >> 20}M", "--disk", str(disk), "--net", "user"]
                subprocess.run([sys.executable, "-m", "smolvmm", *build], check=True)
            digest = hashlib.sha256(payload.read_bytes()).hexdigest()
            results: dict[str, object] = {"machine": machine_info()}
            results.update(anyio.run(soak, bundle, args.clones, args.minutes * 60, args.interval, port, digest))
        finally:
            server.kill()
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        partial = args.json.with_name(f".{args.json.name}.partial")
        partial.write_text(text + "\n")
        partial.replace(args.json)
    return 0 if results["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
