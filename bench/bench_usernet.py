"""TCP through user networking, in one run: guest to host and host to guest, smolvmm with
``--net user`` (its own passt) against smolvmm on a TAP device and against QEMU microvm with
``-netdev stream`` connected to a passt started the same way.

    python bench/bench_usernet.py --out DIR [--runs 3] [--mib 16]

The default guest (busybox ``nc``), 2 vCPUs, 256 MiB. Needs a /dev/kvm that runs standard guests
and root (a network namespace of its own, as the tests make, so nothing leaves the machine); on a
PVM host it runs itself inside ``tools/nested-kvm``. Writes ``usernet.json`` into ``--out``.
Guest to host: a host socket counts the bytes from the first to the last (the guest dials the
gateway, which passt maps to the host's loopback). Host to guest: from the host's connect to the
guest's console line saying how many bytes ``nc`` received.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from common import Console, machine_info, qemu_argv, qemu_path, rerun_nested, summary

from smolvmm.images.guest import default_guest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from network import GATEWAY, private_network  # noqa: E402

SMOLVMM = [sys.executable, "-m", "smolvmm"]
TIMEOUT = 300.0
SINK_PORT, GUEST_PORT, FORWARD_PORT = 5001, 5002, 18002
TAP, TAP_HOST, TAP_GUEST = "bench0", "10.0.3.1", "10.0.3.2"


class Sink(threading.Thread):
    """A host TCP sink on every address of this namespace: MiB/s of each connection."""

    def __init__(self, size: int) -> None:
        super().__init__(daemon=True)
        self.size, self.rates = size, []
        self.server = socket.create_server(("0.0.0.0", SINK_PORT))
        self.server.settimeout(TIMEOUT)

    def run(self) -> None:
        buf = bytearray(1 << 20)
        with contextlib.suppress(OSError):  # the server closed at the end
            while True:
                conn, _ = self.server.accept()
                with conn:
                    got, first = 0, 0.0
                    while n := conn.recv_into(buf):
                        first = first or time.perf_counter()
                        got += n
                    if got == self.size:
                        self.rates.append(got / (1 << 20) / (time.perf_counter() - first))


def to_host(vm: Console, sink: Sink, address: str, mib: int) -> float:
    before = len(sink.rates)
    vm.command(f"dd if=/dev/zero bs=1M count={mib} 2>/dev/null | nc {address} {SINK_PORT}", TIMEOUT)
    deadline = time.monotonic() + 10
    while len(sink.rates) == before:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the sink did not get {mib} MiB from the guest")
        time.sleep(0.01)
    return sink.rates[-1]


def to_guest(vm: Console, address: tuple[str, int], mib: int) -> float:
    vm.send(f"nc -l -p {GUEST_PORT} </dev/null | wc -c | sed 's/^/GOT /;s/$/ TOG/'\n")
    time.sleep(1.0)  # nc listening (through passt a connect succeeds before the guest listens)
    block = bytes(1 << 20)
    began = time.perf_counter()
    with socket.create_connection(address, timeout=TIMEOUT) as conn:
        for _ in range(mib):
            conn.sendall(block)
    vm.wait_for(b" TOG", TIMEOUT)
    seconds = time.perf_counter() - began
    got = re.findall(rb"GOT +(\d+) TOG", bytes(vm.out))
    if not got or int(got[-1]) != mib << 20:
        raise RuntimeError(f"the guest received {got[-1:] or 'nothing'} bytes, not {mib << 20}")
    return mib / seconds


def drive(vm: Console, marker: bytes, gateway: str, inbound: tuple[str, int], mib: int, sink: Sink) -> dict[str, float]:
    vm.wait_for(marker, TIMEOUT)
    vm.command("stty cols 500 -echo", TIMEOUT)
    return {"to_host": to_host(vm, sink, gateway, mib), "to_guest": to_guest(vm, inbound, mib)}


@contextlib.contextmanager
def passt_socket(work: Path) -> Iterator[Path]:
    """A passt waiting on a Unix socket, as QEMU's ``-netdev stream`` documentation starts it."""
    path = work / "passt.socket"
    process = subprocess.Popen(
        ["passt", "--foreground", "--quiet", "--socket", str(path), "-t", f"{FORWARD_PORT}:{GUEST_PORT}", "-u", "none"],
        stdin=subprocess.DEVNULL,
    )
    try:
        while not path.exists():
            if process.poll() is not None:
                raise RuntimeError(f"passt exited ({process.returncode})")
            time.sleep(0.01)
        yield path
    finally:
        process.kill()
        process.wait()
        path.unlink(missing_ok=True)


def measure(runs: int, mib: int, work: Path) -> dict[str, object]:
    private_network()
    for command in (f"tuntap add dev {TAP} mode tap", f"addr add {TAP_HOST}/24 dev {TAP}", f"link set {TAP} up"):
        subprocess.run(["ip", *command.split()], check=True)
    guest = default_guest()
    marker = guest.ready_marker.encode()
    qemu = qemu_path()
    result: dict[str, object] = {"machine": machine_info(), "runs": runs, "mib": mib}
    series: dict[str, dict[str, list[float]]] = {}
    sink = Sink(mib << 20)
    sink.start()
    boot = [*SMOLVMM, "boot", "--cpus", "2", "--mem", "256M"]
    inbound = ("127.0.0.1", FORWARD_PORT)

    def add(name: str, rates: dict[str, float]) -> None:
        for key, value in rates.items():
            series.setdefault(name, {}).setdefault(key, []).append(value)
        print(f"bench: {name} {rates}", file=sys.stderr, flush=True)

    for run in range(runs):
        with Console([*boot, "--net", f"user,forward={FORWARD_PORT}:{GUEST_PORT}"]) as vm:
            add("smolvmm_passt", drive(vm, marker, GATEWAY, inbound, mib, sink))
        cmdline = f"{guest.cmdline} smolvmm.ip={TAP_GUEST}/24"
        with Console([*boot, "--net", f"tap={TAP}", "--cmdline", cmdline]) as vm:
            add("smolvmm_tap", drive(vm, marker, TAP_HOST, (TAP_GUEST, GUEST_PORT), mib, sink))
        if qemu:
            with passt_socket(work) as path:
                extra = [
                    "-netdev",
                    f"stream,id=n0,server=off,addr.type=unix,addr.path={path}",
                    "-device",
                    "virtio-net-device,netdev=n0",
                ]
                argv = qemu_argv(
                    qemu, guest.kernel, guest.initrd, f"{guest.cmdline} smolvmm.dhcp=eth0", work / f"q{run}.mon", extra
                )
                with Console(argv) as vm:
                    add("qemu_passt", drive(vm, marker, GATEWAY, inbound, mib, sink))
    sink.server.close()
    for name, rates in series.items():
        result[name] = {f"{key}_mib_s": summary(values) for key, values in rates.items()}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for usernet.json")
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration (default 3)")
    parser.add_argument("--mib", type=int, default=16, help="MiB per transfer (default 16)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if os.environ.get("SMOLVMM_NESTED") != "1" and rerun_nested(Path(__file__), args.out, {}):
        print((args.out / "usernet.json").read_text())
        return 0
    with tempfile.TemporaryDirectory(prefix="smolbench-") as work:
        result = measure(args.runs, args.mib, Path(work))
    (args.out / "usernet.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
