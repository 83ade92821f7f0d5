"""TCP through user networking and TAP, in one run: guest to host and host to guest, smolvmm with
``--net user`` (its own passt) against QEMU microvm with ``-netdev stream`` connected to a passt
started the same way; and on a TAP device, smolvmm with vhost-net (the host kernel's data path)
and without (``vhost=off``: frames through the monitor) against QEMU with ``vhost=on``.

    python bench/bench_usernet.py --out DIR [--runs 3] [--mib 16]

The default guest (busybox ``nc``), 2 vCPUs, 256 MiB. Needs a /dev/kvm that runs standard guests
and root (a network namespace of its own, as the tests make, so nothing leaves the machine); on a
PVM host it runs itself inside ``tools/nested-kvm``. Writes ``usernet.json`` into ``--out``.
The guest dials the host in both directions (through passt: the gateway address, which passt maps
to the host's loopback). Guest to host: ``dd | nc`` into a host socket that times the bytes from
the first to the last. Host to guest: busybox ``wget`` of a host HTTP server's zeros, counted in
the guest, timed from the host less an idle command's round trip.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from common import Console, machine_info, measured, qemu_argv, qemu_path, summary

from smolvmm.images.guest import default_guest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from network import GATEWAY, private_network  # noqa: E402

SMOLVMM = [sys.executable, "-m", "smolvmm"]
TIMEOUT = 150.0  # one step (a boot, a transfer)
SINK_PORT, SOURCE_PORT = 5001, 5002
TAP, TAP_HOST, TAP_GUEST = "bench0", "10.0.3.1", "10.0.3.2"
VIRTIO_NET = ["-device", "virtio-net-device,netdev=n0"]


class Sink(threading.Thread):
    """A host TCP sink on every address of this namespace: MiB/s of each connection."""

    def __init__(self, size: int) -> None:
        super().__init__(daemon=True)
        self.size, self.rates, self.last = size, [], 0
        self.server = socket.create_server(("0.0.0.0", SINK_PORT))

    def run(self) -> None:
        with contextlib.suppress(OSError):  # the server closed at the end
            while True:
                conn, _ = self.server.accept()
                threading.Thread(target=self._receive, args=(conn,), daemon=True).start()

    def _receive(self, conn: socket.socket) -> None:
        """One connection, on a thread of its own: a stalled one cannot hold up the next machine's."""
        buf = bytearray(1 << 20)
        got, first = 0, 0.0
        with conn, contextlib.suppress(OSError):
            conn.settimeout(TIMEOUT)
            while got < self.size and (n := conn.recv_into(buf)):  # busybox nc waits for our close
                first = first or time.perf_counter()
                got += n
        self.last = got
        if got == self.size:
            self.rates.append(got / (1 << 20) / (time.perf_counter() - first))


def to_host(vm: Console, sink: Sink, address: str, mib: int) -> float:
    before = len(sink.rates)
    vm.command(f"dd if=/dev/zero bs=1M count={mib} 2>/dev/null | nc {address} {SINK_PORT}", TIMEOUT)
    deadline = time.monotonic() + TIMEOUT  # what the guest's TCP still holds once nc has ended
    while len(sink.rates) == before:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the host got {sink.last} of the {mib << 20} bytes the guest sent")
        time.sleep(0.01)
    return sink.rates[-1]


class Source(threading.Thread):
    """A host HTTP server on every address of this namespace that answers any GET with ``size`` zero bytes."""

    def __init__(self, size: int) -> None:
        super().__init__(daemon=True)
        block = bytes(1 << 20)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                for _ in range(size >> 20):
                    self.wfile.write(block)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("0.0.0.0", SOURCE_PORT), Handler)

    def run(self) -> None:
        self.server.serve_forever()


def to_guest(vm: Console, address: str, mib: int) -> float:
    """MiB/s of a download by the guest's busybox wget, timed from the host (the command's round
    trip less an idle one's)."""
    idle = min(_round_trip(vm, "true") for _ in range(3))
    shell = f"wget -q -O - http://{address}:{SOURCE_PORT}/ | wc -c | sed 's/^/GOT /'"
    began = time.perf_counter()
    said = vm.command(shell, TIMEOUT)
    seconds = time.perf_counter() - began - idle
    got = re.findall(rb"GOT +(\d+)", said)
    if not got or int(got[-1]) != mib << 20:
        raise RuntimeError(f"the guest received {got[-1:] or 'nothing'} bytes, not {mib << 20}")
    return mib / seconds


def _round_trip(vm: Console, shell: str) -> float:
    began = time.perf_counter()
    vm.command(shell, TIMEOUT)
    return time.perf_counter() - began


def drive(vm: Console, marker: bytes, host: str, mib: int, sink: Sink) -> dict[str, float | str]:
    """Both directions on one booted guest; a direction that fails is its error, the other still runs."""
    vm.wait_for(marker, TIMEOUT)
    vm.command("stty cols 500 -echo", TIMEOUT)
    rates: dict[str, float | str] = {}
    for name, transfer in (
        ("to_host", lambda: to_host(vm, sink, host, mib)),
        ("to_guest", lambda: to_guest(vm, host, mib)),
    ):
        try:
            rates[name] = transfer()
        except (RuntimeError, TimeoutError) as exc:
            rates[name] = f"{type(exc).__name__}: {exc}"
    return rates


@contextlib.contextmanager
def passt_stream() -> Iterator[int]:
    """A passt serving one end of a socket pair (``--fd``, as smolvmm starts its own); yields the
    other end for QEMU's ``-netdev stream`` (a passt given ``--socket`` binds it in a mount
    namespace of its own here, where QEMU cannot reach it)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    process = subprocess.Popen(
        ["passt", "--foreground", "--quiet", "--fd", str(theirs.fileno()), "-t", "none", "-u", "none"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    try:
        yield ours.fileno()
    finally:
        process.kill()
        process.wait()
        ours.close()


CONFIGURATIONS = ("smolvmm_passt", "smolvmm_tap_vhost", "smolvmm_tap_monitor", "qemu_tap_vhost", "qemu_passt")


def measure(runs: int, mib: int, work: Path, only: Sequence[str] = CONFIGURATIONS) -> dict[str, object]:
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
    Source(mib << 20).start()

    def add(name: str, vm: Console, host: str) -> None:
        """One configuration's rates; a failure is recorded (with the console's tail) and the run goes on."""
        try:
            rates = drive(vm, marker, host, mib, sink)
        except (RuntimeError, TimeoutError) as exc:
            rates = {"boot": f"{type(exc).__name__}: {exc}"}
        for key, value in rates.items():
            if isinstance(value, str):
                result.setdefault("errors", []).append(f"{name} {key}: {value}")  # type: ignore[union-attr]
            else:
                series.setdefault(name, {}).setdefault(key, []).append(value)
        print(f"bench: {name} {rates}", file=sys.stderr, flush=True)

    for run in range(runs):
        if "smolvmm_passt" in only:
            with Console([*boot, "--net", "user"]) as vm:
                add("smolvmm_passt", vm, GATEWAY)
        cmdline = f"{guest.cmdline} smolvmm.ip={TAP_GUEST}/24"
        for name, vhost in (("smolvmm_tap_vhost", "on"), ("smolvmm_tap_monitor", "off")):
            if name in only:
                with Console([*boot, "--net", f"tap={TAP},vhost={vhost}", "--cmdline", cmdline]) as vm:
                    add(name, vm, TAP_HOST)
        if qemu and "qemu_tap_vhost" in only:
            tap = ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=on"]
            with Console(
                qemu_argv(qemu, guest.kernel, guest.initrd, cmdline, work / f"t{run}.mon", [*tap, *VIRTIO_NET])
            ) as vm:
                add("qemu_tap_vhost", vm, TAP_HOST)
        if qemu and "qemu_passt" in only:
            with passt_stream() as fd:
                extra = ["-netdev", f"stream,id=n0,addr.type=fd,addr.str={fd}", *VIRTIO_NET]
                cmdline = f"{guest.cmdline} smolvmm.dhcp=eth0"
                with Console(
                    qemu_argv(qemu, guest.kernel, guest.initrd, cmdline, work / f"q{run}.mon", extra), pass_fds=(fd,)
                ) as vm:
                    add("qemu_passt", vm, GATEWAY)
    sink.server.close()
    for name, rates in series.items():
        result[name] = {f"{key}_mib_s": summary(values) for key, values in rates.items()}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for usernet.json")
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration (default 3)")
    parser.add_argument("--mib", type=int, default=16, help="MiB per transfer (default 16)")
    parser.add_argument("--only", action="append", choices=CONFIGURATIONS, help="measure only these configurations")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    only = args.only or CONFIGURATIONS
    result = measured(
        Path(__file__), args.out, "usernet.json", {}, lambda work: measure(args.runs, args.mib, work, only)
    )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
