"""CLI commands that run machines: ``boot``, ``build``, ``run`` and ``demo``; only the public API is used."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path

import anyio

import smolvmm
from smolvmm import ConfigError, DiskConfig, ExitReason, Machine, MachineConfig, NetConfig, parse_size

ESCAPE_KEY = b"\x1d"  # Ctrl-]


def _add_machine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernel", type=Path, help="bzImage to boot (default: the built-in demo guest)")
    parser.add_argument("--initrd", type=Path, help="initramfs to pass to the kernel")
    parser.add_argument("--cmdline", help="kernel command line (default: the demo guest's)")
    parser.add_argument("--cpus", type=int, default=1, help="number of vCPUs (default 1)")
    parser.add_argument("--mem", default="256M", help="guest RAM, e.g. 256M or 1G (default 256M)")
    parser.add_argument("--disk", action="append", default=[], metavar="PATH[,ro][,overlay=PATH]",
                        help="virtio-blk disk; writes go to a copy-on-write overlay (repeatable)")
    parser.add_argument("--net", action="append", default=[], metavar="tap=NAME[,mac=MAC]",
                        help="virtio-net device on an existing TAP device (repeatable)")
    parser.add_argument("--console-socket", type=Path, metavar="PATH",
                        help="a virtio-console port reachable as a Unix socket at PATH")


def _config(args: argparse.Namespace) -> MachineConfig:
    return MachineConfig(
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=args.cmdline,
        vcpus=args.cpus,
        memory=parse_size(args.mem),
        disks=tuple(DiskConfig.parse(spec) for spec in args.disk),
        networks=tuple(NetConfig.parse(spec) for spec in args.net),
        console_socket=args.console_socket,
    )


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    if name in ("boot", "build"):
        _add_machine_flags(parser)
    if name == "boot":
        parser.add_argument("--timings", action="store_true", help="print boot phases as JSON on stderr at exit")


def _warn_about_host() -> None:
    from smolvmm.hostkvm import probe

    host = probe()
    if host.kind == "pvm":
        print("smolvmm: warning: this host's /dev/kvm is PVM (kvm_pvm), which runs standard guest kernels"
              " ~100x too slowly; run under tools/nested-kvm (see README)", file=sys.stderr)


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
        await anyio.wait_readable(0)
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


async def _boot(config: MachineConfig) -> int:
    marker = None if config.kernel else smolvmm.default_guest().ready_marker
    async with Machine.boot(config) as machine:
        return await console_session(machine, marker)


def run(name: str, args: argparse.Namespace) -> int:
    _warn_about_host()
    if name == "boot":
        return anyio.run(_boot, _config(args), backend="trio")
    raise ConfigError(f"unknown command {name}")
