"""CLI commands that run machines: ``boot``, ``build``, ``run`` and ``demo``; only the public API is used."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path

import anyio

import smolvmm
from smolvmm import ConfigError, DiskConfig, ExitReason, Machine, MachineConfig, NetConfig, parse_size

ESCAPE_KEY = b"\x1d"  # Ctrl-]
READY_MARKER_LABEL = "smolvmm.ready-marker"  # the line `build` waited for, kept for `boot --bundle`
# MachineConfig fields as the flags that set them, for error messages.
_FLAGS = {
    "MachineConfig.kernel": "--kernel", "MachineConfig.initrd": "--initrd", "MachineConfig.cmdline": "--cmdline",
    "MachineConfig.vcpus": "--cpus", "MachineConfig.memory": "--mem", "MachineConfig.disks": "--disk",
    "MachineConfig.console_socket": "--console-socket", "MachineConfig.console": "--console",
    "DiskConfig.path": "--disk", "DiskConfig.overlay": "--disk overlay", "DiskConfig.read_only": "--disk ro",
    "NetConfig.tap": "--net tap", "NetConfig.mac": "--net mac",
}


def _add_machine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernel", type=Path, help="bzImage to boot (default: the built-in demo guest)")
    parser.add_argument("--initrd", type=Path, help="initramfs to pass to the kernel")
    parser.add_argument("--cmdline", help="kernel command line (default: the demo guest's)")
    parser.add_argument("--cpus", type=int, help="number of vCPUs (default 1)")
    parser.add_argument("--mem", help="guest RAM, e.g. 256M or 1G (default 256M)")
    parser.add_argument("--disk", action="append", default=[], metavar="PATH[,ro][,overlay=PATH]",
                        help="virtio-blk disk; writes go to a copy-on-write overlay (repeatable)")
    parser.add_argument("--net", action="append", default=[], metavar="tap=NAME[,mac=MAC]",
                        help="virtio-net device on an existing TAP device (repeatable)")
    parser.add_argument("--console-socket", type=Path, metavar="PATH",
                        help="a virtio-console port reachable as a Unix socket at PATH")
    parser.add_argument("--console", choices=["serial", "virtio"], default="serial",
                        help="the guest's console: the 16550 UART (ttyS0, default) or virtio-console (hvc0)")


def _config(args: argparse.Namespace) -> MachineConfig:
    networks = tuple(NetConfig.parse(spec) for spec in args.net)
    if getattr(args, "bundle", None) is not None:
        given = [flag for flag, value in (("--kernel", args.kernel), ("--initrd", args.initrd), ("--cmdline", args.cmdline),
                 ("--cpus", args.cpus), ("--mem", args.mem), ("--disk", args.disk)) if value]
        if given:
            raise ConfigError(f"--bundle brings its own kernel, command line, vCPUs, RAM and disks: drop {', '.join(given)}")
        return MachineConfig.from_bundle(args.bundle, networks=networks, console_socket=args.console_socket)
    try:
        return MachineConfig(
            kernel=args.kernel,
            initrd=args.initrd,
            cmdline=args.cmdline,
            vcpus=args.cpus or 1,
            memory=parse_size(args.mem or "256M"),
            disks=tuple(DiskConfig.parse(spec) for spec in args.disk),
            networks=networks,
            console_socket=args.console_socket,
            console=args.console,
        )
    except ConfigError as exc:  # say which flag, as the user wrote it
        flag = re.sub(r"\w+Config\.\w+(?:\[\d+\]\.path)?", lambda m: _FLAGS.get(m[0].split("[")[0], m[0]), str(exc))
        raise ConfigError(flag) from None


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    if name in ("boot", "build"):
        _add_machine_flags(parser)
        parser.add_argument("--ready-marker", help="console text that says the guest is ready; boot forwards stdin"
                            " only after it (default: the demo guest's, or the one a --bundle was built with)")
    if name == "boot":
        parser.add_argument("--bundle", type=Path, metavar="BUNDLE",
                            help="cold-boot BUNDLE's own kernel, initrd and disks (a bundle built with --bootable)")
    if name == "build":
        parser.add_argument("-o", "--output", type=Path, required=True, help="the .smolmachine file to write")
        parser.add_argument("--bootable", action="store_true",
                            help="also store the kernel and initrd, so the bundle can be cold-booted (boot --bundle)")
        parser.add_argument("--zstd", action="store_true", help="compress RAM and disks (for shipping; `pack --raw` to map)")
        parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the ready marker (default 600)")
    if name == "run":
        parser.add_argument("bundle", type=Path, help="the .smolmachine file to resume, or REGISTRY/REPO:TAG to pull and resume")
        parser.add_argument("--insecure", action="store_true", help="with a REF: allow plain HTTP to a registry that is not on loopback")
        parser.add_argument("--net", action="append", default=[], metavar="tap=NAME[,mac=MAC]",
                            help="TAP device (and optionally a new MAC) for each saved network device")
        parser.add_argument("--console-socket", type=Path, metavar="PATH", help="socket path for a saved console-socket device")
        parser.add_argument("--save", type=Path, metavar="OUT",
                            help="on SIGUSR1, save the running instance to OUT (a new bundle) and carry on")
        parser.add_argument("--prepare-only", action="store_true",
                            help="do every restore step up to the first guest entry, then tear down")
    if name in ("boot", "run"):
        parser.add_argument("--timings", action="store_true", help="print the phases in ms as one JSON line on stderr at exit")


def _warn_about_host() -> None:
    host = smolvmm.probe_host()
    if host.kind == "pvm":
        print(f"smolvmm: warning: {host.explanation} (see README)", file=sys.stderr)


@contextlib.contextmanager
def _raw_terminal() -> Iterator[bool]:
    """Raw mode on a TTY stdin (restored on exit); yields whether stdin is a TTY."""
    if not os.isatty(0):
        yield False
        return
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield True
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


async def _pump_output(machine: Machine, ready: anyio.Event, marker: bytes | None) -> None:
    out = sys.stdout.buffer
    tail = b""
    async for chunk in machine.console:
        out.write(chunk)
        out.flush()
        if marker and not ready.is_set():
            tail = (tail + chunk)[-len(marker) - 4096 :]
            if marker in tail:
                ready.set()


async def _pump_input(machine: Machine, ready: anyio.Event, interactive: bool) -> None:
    await ready.wait()
    while True:
        try:
            await anyio.wait_readable(0)
        except PermissionError:
            pass  # a regular file or /dev/null: epoll refuses it, and reading it never blocks
        data = os.read(0, 4096)
        if not data:
            return  # EOF on stdin: the guest keeps running
        if interactive and ESCAPE_KEY in data:
            await machine.stop()
            return
        await machine.console.send(data)


async def console_session(machine: Machine, ready_marker: str | None) -> int:
    """Connect the machine's console to stdin/stdout until it ends; returns the exit status."""
    ready = anyio.Event()
    with _raw_terminal() as interactive:
        if interactive or not ready_marker:
            ready.set()
        if interactive:
            print("smolvmm: console attached; press Ctrl-] to stop the machine\r", file=sys.stderr)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_pump_input, machine, ready, interactive)
            await _pump_output(machine, ready, ready_marker.encode() if ready_marker else None)
            tg.cancel_scope.cancel()
        end = await machine.wait()
    if end.reason == ExitReason.CRASH:
        print(f"smolvmm: error: the machine crashed: {end.detail}", file=sys.stderr)
        return 1
    return 0


def _print_timings(machine: Machine, enabled: bool) -> None:
    if enabled:
        print(machine.timings.json(), file=sys.stderr)


async def _boot(config: MachineConfig, marker: str | None, timings: bool) -> int:
    async with Machine.boot(config) as machine:
        status = await console_session(machine, marker)
    _print_timings(machine, timings)
    return status


def _boot_marker(args: argparse.Namespace) -> str | None:
    """What ``boot`` waits for before forwarding stdin: the flag's, a bundle's, or the demo guest's."""
    if args.ready_marker is not None:
        return args.ready_marker
    if args.bundle is not None:
        import smolformat

        with smolformat.open_bundle(args.bundle) as bundle:
            labels = bundle.labels
        return labels.get(READY_MARKER_LABEL)
    return None if args.kernel else smolvmm.default_guest().ready_marker


def _progress(text: str) -> None:
    if sys.stderr.isatty():
        print(f"smolvmm: {text}", file=sys.stderr)


async def _build(config: MachineConfig, output: Path, marker: str | None, bootable: bool, zstd: bool, timeout: float) -> int:
    if marker is None:
        if config.kernel is not None:
            raise ConfigError("--ready-marker is needed with --kernel: say what the guest prints when it is ready")
        marker = smolvmm.default_guest().ready_marker
    _progress(f"booting, waiting for {marker!r}")
    async with Machine.boot(config) as machine:
        try:
            await machine.console.wait_for(marker, timeout)
        except TimeoutError:
            raise smolvmm.GuestError(f"the guest did not print {marker!r} within {timeout:g} s") from None
        _progress(f"ready after {machine.timings.phases.get('first_kvm_run', 0) / 1000:.1f} s; saving {output}")
        encoding = "zstd" if zstd else "raw"
        digest = await machine.snapshot(output, encoding=encoding, labels={READY_MARKER_LABEL: marker}, bootable=bootable)
    print(f"{output}: {digest.hex()[:16]}")
    return 0


async def _run(args: argparse.Namespace) -> int:
    from smolvmm.cli_registry import resolve_bundle

    args.bundle = await resolve_bundle(args.bundle, args.insecure)
    networks = tuple(NetConfig.parse(spec) for spec in args.net)
    if args.prepare_only:
        timings = await Machine.prepare_restore(args.bundle, networks=networks, console_socket=args.console_socket)
        print(timings.json(), file=sys.stderr)
        return 0
    async with Machine.restore(args.bundle, networks=networks, console_socket=args.console_socket) as machine:
        async with anyio.create_task_group() as tg:
            if args.save is not None:
                tg.start_soon(_save_on_signal, machine, args.save)
            status = await console_session(machine, None)
            tg.cancel_scope.cancel()
    _print_timings(machine, args.timings)
    return status


async def _save_on_signal(machine: Machine, output: Path) -> None:
    with anyio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            digest = await machine.snapshot(output)
            print(f"\r\nsmolvmm: saved {output} ({digest.hex()[:16]})\r", file=sys.stderr)


def run(name: str, args: argparse.Namespace) -> int:
    if name == "demo":
        from smolvmm.cli_demo import demo

        return demo()
    _warn_about_host()
    if name == "boot":
        return anyio.run(_boot, _config(args), _boot_marker(args), args.timings, backend="trio")
    if name == "build":
        build = (_config(args), args.output, args.ready_marker, args.bootable, args.zstd, args.timeout)
        return anyio.run(_build, *build, backend="trio")
    return anyio.run(_run, args, backend="trio")
