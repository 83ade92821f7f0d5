"""Guest-booting benchmarks, smolvmm beside QEMU microvm: cold boot, save, restore, memory, disk and network.

Needs a /dev/kvm that runs standard guests (on a PVM host, run it through ``tools/nested-kvm``, as
``bench/run_all.py`` does) and root for the TAP device. Writes ``guest.json`` (updated after every
measure) and the bundle it restored, ``restore.smolmachine``, into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import anyio
from common import Console, Monitor, machine_info, pss_kib, qemu_argv, qemu_path, smolvmm_cli, summary, warm_helper

import smolvmm
from smolvmm.images.disk import ext4_image
from smolvmm.images.guest import default_guest

NETNS = "smolbench"
HOST_IP, GUEST_IP, PORT = "10.0.0.1", "10.0.0.2", 5001
DISK_MIB = 64
TCP_MIB = 16  # QEMU's guest sends ~0.6 MiB/s through the one-vCPU nested machine
IO_TIMEOUT = 180.0  # one disk load or nc command (the guest's TCP runs at a few MiB/s nested)
TIMEOUT = 600.0
HELPER_SETTLE = 10.0  # a started helper forks its spare child and copies its memory
STEP_TIMEOUT = 120.0  # a short command or one clone's restore (nested runs hung there once each)
SETTLE_S = 3.0  # let a freshly booted guest go idle before saving it
DISK_LOADS = (
    ("seqread_qd1_mib_s", "read", 1, DISK_MIB, "sequential", 1024),
    ("seqwrite_qd1_mib_s", "write", 1, DISK_MIB, "sequential", 1024),
    ("randread_qd1_iops", "read", 1, 2000, "random", 4),
    ("randread_qd32_iops", "read", 32, 4000, "random", 4),
    ("randwrite_qd1_iops", "write", 1, 2000, "random", 4),
    ("randwrite_qd32_iops", "write", 32, 4000, "random", 4),
)
"""Direct I/O through bench/iops.c: (result key, direction, requests in flight, requests per run,
pattern, KiB per request). Sequential loads are reported in MiB/s, random ones in IOPS."""
BENCH = Path(__file__).resolve().parent


class Bench:
    """One benchmark run: where files go and the results so far (saved after each measure)."""

    def __init__(self, out: Path, work: Path, runs: int, instances: int, python: str) -> None:
        self.out, self.work, self.runs, self.instances = out, work, runs, instances
        self.python = python  # the CLI's interpreter
        self.smolvmm = smolvmm_cli(python)
        self.qemu = qemu_path()
        self.guest = default_guest()
        self.results: dict[str, object] = {
            "machine": machine_info(),
            "runs": runs,
            "qemu": self.qemu,
            "cli_python": "a regular install" if python != sys.executable else "the development venv",
        }
        if self.qemu:
            version = subprocess.run([self.qemu, "--version"], capture_output=True, text=True).stdout
            self.results["qemu_version"] = version.splitlines()[0]

    def measure(self, name: str, fn: Callable[[Bench], dict[str, object]]) -> None:
        """Run one measure; a failure is recorded beside what it had measured and the run goes on."""
        print(f"bench: {name}...", file=sys.stderr, flush=True)
        began = time.monotonic()
        self.results[name] = {}
        try:
            self.results[name] = fn(self)
        except Exception as exc:  # noqa: BLE001 - recorded, the other measures still run
            self.results[name]["error"] = f"{type(exc).__name__}: {exc}"
        print(
            f"bench: {name} took {time.monotonic() - began:.0f} s: {json.dumps(self.results[name])[:400]}",
            file=sys.stderr,
            flush=True,
        )
        self.save()

    def save(self) -> None:
        """Write the results so far: a measure that drives two VMMs saves after the first, so a
        machine that stops meanwhile keeps its figures."""
        partial = self.out / ".guest.json.partial"
        partial.write_text(json.dumps(self.results, indent=1))
        partial.replace(self.out / "guest.json")

    def qemu_console(
        self, monitor: Path, extra: Sequence[str] = (), cmdline: str | None = None, wrap: Sequence[str] = ()
    ) -> Console:
        g = self.guest
        return Console([*wrap, *qemu_argv(self.qemu, g.kernel, g.initrd, cmdline or g.cmdline, monitor, extra)])

    def marker(self) -> bytes:
        return self.guest.ready_marker.encode()


# --- cold boot ---------------------------------------------------------------------------------


def cold_boot(b: Bench) -> dict[str, object]:
    result: dict[str, object] = {}
    smol = []
    for _ in range(b.runs):
        with Console([*b.smolvmm, "boot", "--cpus", "2", "--mem", "256M"]) as vm:
            smol.append(vm.wait_for(b.marker(), TIMEOUT))
    result["smolvmm_s"] = summary(smol)
    if b.qemu:
        qemu = []
        for i in range(b.runs):
            with b.qemu_console(b.work / f"boot{i}.mon") as vm:
                qemu.append(vm.wait_for(b.marker(), TIMEOUT))
        result["qemu_s"] = summary(qemu)
    return result


# --- save --------------------------------------------------------------------------------------


def _size(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"bytes": st.st_size, "allocated": st.st_blocks * 512}


def _keep_first(path: Path, index: int) -> None:
    """Only the first save is kept (restores use it): the scratch directory is a tmpfs in the nested machine."""
    if index:
        path.unlink()


def save(b: Bench) -> dict[str, object]:
    result: dict[str, object] = {}

    phases: list[dict[str, float]] = []

    async def smol_saves() -> list[float]:
        times = []
        async with smolvmm.Machine.boot(smolvmm.MachineConfig(vcpus=2, memory=256 << 20)) as machine:
            await machine.console.wait_for(b.guest.ready_marker, TIMEOUT)
            await anyio.sleep(SETTLE_S)
            for i in range(b.runs):
                began = time.perf_counter()
                await machine.snapshot(b.work / f"save{i}.smolmachine")
                times.append(time.perf_counter() - began)
                phases.append(machine.snapshot_timings.phases)
                _keep_first(b.work / f"save{i}.smolmachine", i)
        return times

    result["smolvmm_s"] = summary(anyio.run(smol_saves, backend="trio"))
    # Each phase's own length (ms), from the cumulative marks of every save.
    names = list(phases[0])
    result["smolvmm_phases_ms"] = {
        name: summary([p[name] - (p[names[i - 1]] if i else 0.0) for p in phases]) for i, name in enumerate(names)
    }
    result["smolvmm_file"] = _size(b.work / "save0.smolmachine")
    if b.qemu:
        times = []
        with b.qemu_console(b.work / "save.mon") as vm:
            vm.wait_for(b.marker(), TIMEOUT)
            time.sleep(SETTLE_S)
            monitor = Monitor(b.work / "save.mon")
            # QEMU caps migration at 32 MiB/s by default; a save to a local file is not meant to be throttled.
            monitor("migrate_set_parameter max-bandwidth 100G")
            for i in range(b.runs):
                began = time.perf_counter()
                monitor("stop")
                monitor(f'migrate "exec:cat > {b.work}/save{i}.qemu"')
                while "Migration status: completed" not in (status := monitor("info migrate")):
                    if "failed" in status:
                        raise RuntimeError(f"QEMU migration failed: {status}")
                    time.sleep(0.002)
                times.append(time.perf_counter() - began)
                _keep_first(b.work / f"save{i}.qemu", i)
                monitor("cont")
            monitor.close()
        result["qemu_s"] = summary(times)
        result["qemu_file"] = _size(b.work / "save0.qemu")
    return result


# --- restore until the guest answers -----------------------------------------------------------

ASK, ANSWER = "echo R$((40+2))R\n", b"R42R"


def smol_restore(b: Bench, env: dict[str, str] | None = None) -> Console:
    vm = Console([*b.smolvmm, "run", "--timings", "--json", str(b.work / "save0.smolmachine")], env=env)
    vm.send(ASK)
    return vm


def qemu_restore(b: Bench, index: int) -> tuple[Console, float]:
    """A QEMU restored from the saved file, continued; returns it and when ``cont`` was acknowledged."""
    mon_path = b.work / f"restore{index}.mon"
    vm = b.qemu_console(mon_path, ["-incoming", f"exec:cat {b.work}/save0.qemu"])
    monitor = Monitor(mon_path)
    while "inmigrate" in monitor("info status"):
        time.sleep(0.001)
    monitor("cont")
    continued = time.perf_counter() - vm.start
    monitor.close()
    vm.send(ASK)
    return vm, continued


def restore(b: Bench, env: dict[str, str] | None = None) -> dict[str, object]:
    result: dict[str, object] = {}
    answers, phases = [], []
    for _ in range(b.runs):
        with smol_restore(b, env) as vm:
            answers.append(vm.wait_for(ANSWER, TIMEOUT))
            vm.send("poweroff -f\n")
            vm.proc.wait(TIMEOUT)
            vm.close()
            lines = [line for line in bytes(vm.out).decode(errors="replace").splitlines() if line.startswith("{")]
            if lines:
                phases.append(json.loads(lines[-1]))
    result["smolvmm_s"] = summary(answers)
    result["smolvmm_timings"] = phases
    if b.qemu:
        answers, continued = [], []
        for i in range(b.runs):
            vm, cont = qemu_restore(b, i)
            with vm:
                answers.append(vm.wait_for(ANSWER, TIMEOUT))
            continued.append(cont)
        result["qemu_s"] = summary(answers)
        result["qemu_cont_s"] = summary(continued)
    shutil.copyfile(b.work / "save0.smolmachine", b.out / "restore.smolmachine")
    return result


def restore_helper(b: Bench) -> dict[str, object]:
    """``restore`` with ``smolvmm helper`` serving, so each ``run`` hands itself to the warm helper
    (QEMU measured again beside it)."""
    with warm_helper(b.smolvmm, b.work, timeout=TIMEOUT, settle=HELPER_SETTLE) as env:
        return restore(b, {**os.environ, **env})


def restore_api(b: Bench) -> dict[str, object]:
    """``Machine.restore`` in a process that has already imported smolvmm (an embedder's pool)."""

    async def once() -> float:
        began = time.perf_counter()
        async with smolvmm.Machine.restore(b.work / "save0.smolmachine") as machine:
            await machine.console.send(ASK.encode())
            await machine.console.wait_for(ANSWER, TIMEOUT)
            answered = time.perf_counter() - began
            await machine.stop()
        return answered

    return {"smolvmm_s": summary([anyio.run(once, backend="trio") for _ in range(b.runs)])}


def python_startup(b: Bench) -> dict[str, object]:
    """Wall time of the interpreter alone, of ``--help``, and of a host-side restore, as processes."""
    commands = {
        "python_c_pass": [b.python, "-c", "pass"],
        "smolvmm_help": [*b.smolvmm, "--help"],
        "prepare_only": [*b.smolvmm, "run", "--prepare-only", "--json", str(b.work / "save0.smolmachine")],
    }
    result: dict[str, object] = {}
    for name, argv in commands.items():
        times = []
        for _ in range(b.runs):
            began = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=STEP_TIMEOUT)
            times.append(time.perf_counter() - began)
        result[f"{name}_s"] = summary(times)
        if name == "prepare_only":
            result["prepare_only_timings"] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- host memory of restored instances ---------------------------------------------------------


def memory(b: Bench) -> dict[str, object]:
    result = b.results["memory"]
    starters: dict[str, Callable[[int], Console]] = {"smolvmm": lambda i: smol_restore(b)}
    if b.qemu:
        starters["qemu"] = lambda i: qemu_restore(b, 100 + i)[0]
    for name, start in starters.items():
        for count in sorted({1, b.instances}):
            vms: list[Console] = []
            try:
                for i in range(count):
                    vms.append(start(i))
                    vms[-1].wait_for(ANSWER, STEP_TIMEOUT)
                time.sleep(1.0)
                if dead := [vm for vm in vms if vm.proc.poll() is not None]:
                    raise RuntimeError(f"a restored {name} exited ({dead[0].proc.returncode}): {dead[0].tail()}")
                pss = [pss_kib(vm.proc.pid) for vm in vms]
                result[f"{name}_{count}_pss_mib"] = round(sum(pss) / 1024, 1)
            finally:
                for vm in vms:
                    vm.close()
    return result


# --- disk and network throughput ---------------------------------------------------------------


def _round_trip(vm: Console, shell: str) -> float:
    """Seconds from typing ``shell`` to its completion marker on the console."""
    began = time.perf_counter()
    vm.command(shell, TIMEOUT)
    return time.perf_counter() - began


def _setns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{name}") as ns:
        if libc.setns(ns.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), "setns")


class Receiver(threading.Thread):
    """A TCP sink in the bench netns for ``count`` connections: MiB/s of each, first to last byte."""

    def __init__(self, size: int, count: int) -> None:
        super().__init__(daemon=True)
        self.size, self.count, self.rates, self.ready, self.error = size, count, [], threading.Event(), None

    def run(self) -> None:
        try:
            _setns(NETNS)
            with socket.create_server((HOST_IP, PORT)) as server:
                server.settimeout(TIMEOUT)
                self.ready.set()
                buf = bytearray(1 << 20)
                for _ in range(self.count):
                    conn, _ = server.accept()
                    with conn:
                        got, first = 0, None
                        while got < self.size and (n := conn.recv_into(buf)):
                            first = first or time.perf_counter()
                            got += n
                        self.rates.append(got / (1 << 20) / (time.perf_counter() - first))
        except Exception as exc:  # noqa: BLE001 - reported by the measure
            self.error = exc
            self.ready.set()


def _settled(vm: Console, marker: bytes, into: dict[str, object], setup: str = "true") -> float:
    """Wait for a booted guest to go idle, run ``setup``, and return (and record in ``into``) the
    median round trip of an idle command: what each timed command's figure is taken less."""
    vm.wait_for(marker, TIMEOUT)
    time.sleep(SETTLE_S)
    vm.command(f"stty cols 500 -echo; {setup}", TIMEOUT)  # no wrapped lines, no echo to wait through
    idle = statistics.median(_round_trip(vm, "true") for _ in range(5))
    into["console_round_trip_s"] = idle
    return idle


def _guest_tcp(vm: Console, marker: bytes, runs: int, into: dict[str, object]) -> None:
    """TCP from a booted guest to the host, into ``into``."""
    _settled(vm, marker, into)
    receiver = Receiver(TCP_MIB << 20, runs)
    receiver.start()
    receiver.ready.wait()
    if receiver.error:
        raise receiver.error
    for _ in range(runs):
        vm.command(f"dd if=/dev/zero bs=1M count={TCP_MIB} 2>/dev/null | nc {HOST_IP} {PORT}", IO_TIMEOUT)
    receiver.join(IO_TIMEOUT)
    if receiver.error:
        raise receiver.error
    into["tcp_mib_s"] = summary(receiver.rates)


@contextlib.contextmanager
def _console_log(vm: Console, path: Path) -> Iterator[None]:
    """Keep the whole guest console in ``path`` (a failure's cause is often far above its tail)."""
    try:
        yield
    finally:
        path.write_bytes(bytes(vm.out))


def _host_io(image: Path) -> dict[str, object]:
    """The host's own sequential 1 MiB reads and writes (with fsync) of a file like the guest's disk."""
    reads, writes = [], []
    for _ in range(3):
        began = time.perf_counter()
        with open(image, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
        reads.append(image.stat().st_size / (1 << 20) / (time.perf_counter() - began))
        block = os.urandom(1 << 20)
        began = time.perf_counter()
        with open(image.with_suffix(".hostw"), "wb", buffering=0) as f:
            for _ in range(DISK_MIB):
                f.write(block)
            os.fsync(f.fileno())
        writes.append(DISK_MIB / (time.perf_counter() - began))
        image.with_suffix(".hostw").unlink()
    return {"read_mib_s": summary(reads), "write_mib_s": summary(writes)}


@contextlib.contextmanager
def _bench_netns() -> Iterator[None]:
    """A fresh namespace with the TAP device ``tap0`` at HOST_IP: each VMM gets its own, so nothing
    one left behind (neighbour entries, sockets) can change the other's figures."""
    for args in (
        ["netns", "add", NETNS],
        ["-n", NETNS, "link", "set", "lo", "up"],
        ["-n", NETNS, "tuntap", "add", "dev", "tap0", "mode", "tap"],
        ["-n", NETNS, "addr", "add", f"{HOST_IP}/24", "dev", "tap0"],
        ["-n", NETNS, "link", "set", "tap0", "up"],
    ):
        subprocess.run(["ip", *args], check=True)
    try:
        yield
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=False)


def tcp(b: Bench) -> dict[str, object]:
    """TCP throughput from the guest to the host over a TAP device, smolvmm then QEMU."""
    result = b.results["tcp"]  # filled as it goes: a guest that fails keeps the other's figures
    cmdline = f"{b.guest.cmdline} smolvmm.ip={GUEST_IP}/24"
    wrap = ["ip", "netns", "exec", NETNS]
    with (
        _bench_netns(),
        Console(
            [
                *wrap,
                *b.smolvmm,
                "boot",
                "--cpus",
                "2",
                "--mem",
                "256M",
                "--net",
                "tap=tap0",
                "--cmdline",
                cmdline,
            ]
        ) as vm,
        _console_log(vm, b.out / "tcp-smolvmm.log"),
    ):
        _guest_tcp(vm, b.marker(), b.runs, result.setdefault("smolvmm", {}))
    b.save()
    if b.qemu:
        extra = [
            "-netdev",
            "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device",
            "virtio-net-device,netdev=n0",
        ]
        with (
            _bench_netns(),
            b.qemu_console(b.work / "tcp.mon", extra, cmdline, wrap) as vm,
            _console_log(vm, b.out / "tcp-qemu.log"),
        ):
            _guest_tcp(vm, b.marker(), b.runs, result.setdefault("qemu", {}))
    return result


def _iops_disk(work: Path) -> Path:
    """An ext4 image holding bench/iops.c built static (the default guest has busybox only)."""
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc not found: apt-get install gcc libc6-dev")
    files = work / "iops-files"
    files.mkdir()
    built = subprocess.run(
        ["gcc", "-O2", "-static", "-o", str(files / "iops"), str(BENCH / "iops.c")], capture_output=True, text=True
    )
    if built.returncode != 0:
        raise RuntimeError(f"building bench/iops.c failed: {built.stderr.strip()[-300:]}")
    return ext4_image(work / "iops.img", files, size_mib=8)


def _guest_disk(vm: Console, marker: bytes, runs: int, into: dict[str, object]) -> None:
    """Each of DISK_LOADS on /dev/vda as the guest's clock saw it (and, under ``KEY_host_timed``,
    timed host-side less an idle command's round trip), into ``into`` as each is known."""
    idle = _settled(vm, marker, into, "mkdir -p /t && mount -t ext4 -o ro /dev/vdb /t")
    for key, direction, depth, count, pattern, kib in DISK_LOADS:
        unit = kib / 1024 if pattern == "sequential" else 1  # MiB or requests
        guest, host = [], []
        for _ in range(runs):
            began = time.perf_counter()
            said = vm.command(f"/t/iops /dev/vda {direction} {depth} {count} {pattern} {kib}", IO_TIMEOUT)
            host.append(count * unit / (time.perf_counter() - began - idle))
            ran = re.search(rf"{count} ios in ([\d.]+) s", said.decode(errors="replace"))
            if ran is None:
                raise RuntimeError(f"iops {direction} {depth} {pattern}: {said.decode(errors='replace')[-300:]}")
            guest.append(count * unit / float(ran.group(1)))
        into[key], into[f"{key}_host_timed"] = summary(guest), summary(host)


def disk(b: Bench) -> dict[str, object]:
    """Sequential 1 MiB and random 4 KiB direct I/O (bench/iops.c), smolvmm then QEMU on copies of one disk."""
    image = b.work / "disk.img"
    with open(image, "wb") as f:
        f.write(os.urandom(DISK_MIB << 20))
    tool = _iops_disk(b.work)
    result = b.results["disk"]
    result["host_file"] = _host_io(image)
    disks = ["--disk", str(image), "--disk", f"{tool},ro"]
    boot = [*b.smolvmm, "boot", "--cpus", "2", "--mem", "256M", *disks]
    with Console(boot) as vm, _console_log(vm, b.out / "disk-smolvmm.log"):
        _guest_disk(vm, b.marker(), b.runs, result.setdefault("smolvmm", {}))
    b.save()
    if b.qemu:
        copy = shutil.copyfile(image, b.work / "disk-qemu.img")
        extra = []
        for index, (path, readonly) in enumerate(((copy, "off"), (tool, "on"))):
            extra += [
                "-drive",
                f"id=d{index},file={path},format=raw,if=none,readonly={readonly}",
                "-device",
                f"virtio-blk-device,drive=d{index}",
            ]
        with b.qemu_console(b.work / "disk.mon", extra) as vm, _console_log(vm, b.out / "disk-qemu.log"):
            _guest_disk(vm, b.marker(), b.runs, result.setdefault("qemu", {}))
    return result


# TCP last: over a plain TAP it froze the nested machine in three runs of three (BENCHMARKS.md,
# 2026-12-06), and a frozen machine ends this script with the measures after it unmeasured.
MEASURES: dict[str, Callable[[Bench], dict[str, object]]] = {
    "cold_boot": cold_boot,
    "save": save,
    "restore": restore,
    "restore_api": restore_api,
    "restore_helper": restore_helper,
    "disk": disk,
    "memory": memory,
    "python_startup": python_startup,
    "tcp": tcp,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for guest.json and the bundle")
    parser.add_argument("--runs", type=int, default=3, help="runs per measure (default 3)")
    parser.add_argument("--instances", type=int, default=10, help="restored instances for the memory measure")
    parser.add_argument(
        "--only", action="append", choices=sorted(MEASURES), help="run only these (restore and memory need save)"
    )
    parser.add_argument(
        "--cli-python",
        default=sys.executable,
        help="the Python the CLI runs on (run_all.py passes bench/common.py's regular_install of this tree)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smolbench-") as work:
        bench = Bench(args.out, Path(work), args.runs, args.instances, args.cli_python)
        for name, fn in MEASURES.items():
            if args.only is None or name in args.only:
                bench.measure(name, fn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
