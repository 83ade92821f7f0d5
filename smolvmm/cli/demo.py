"""``python -m smolvmm demo``: build the demo guest's bundle once, then resume it.

On a PVM host the demo runs inside the nested KVM machine (tools/nested-kvm), saying so.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import anyio

import smolvmm
from smolvmm.cli.machine import listed, report_timings, serve, wait_ready

DEMO_SCRIPT = (
    'echo; echo "hello from a resumed smolvmm guest: $(nproc) vCPUs, kernel $(uname -r)"; '
    "cat /proc/uptime; poweroff -f\n"
)


def demo_bundle() -> str:
    """Where the demo bundle lives: beside the default guest image it was built from."""
    from smolvmm.images.guest import default_guest

    guest = default_guest()
    return os.path.join(os.path.dirname(guest.kernel), "demo.smolmachine")


async def _ensure_bundle(path: str) -> None:
    if os.path.exists(path):
        import smolformat

        try:
            smolformat.open_bundle(path).close()
            return
        except smolformat.FormatError as exc:  # e.g. made by an older smolvmm: build it again
            print(f"smolvmm demo: rebuilding the demo bundle ({exc})", file=sys.stderr)
    from smolvmm.images.guest import default_guest

    print("smolvmm demo: building the demo bundle (boots the demo guest once)", file=sys.stderr)
    async with smolvmm.Machine.boot(smolvmm.MachineConfig(vcpus=2)) as machine:
        await wait_ready(machine, default_guest().ready_marker, 600)
        await machine.snapshot(path)


async def _run(path: str, script: bytes | None) -> int:
    with listed("run", f"the demo ({path})") as machine_id:
        async with smolvmm.Machine.restore(path) as machine:
            if script is not None:
                await machine.console.send(script)
            status = await serve(machine, machine_id, None)
    report_timings(machine.timings, as_json=False)
    return status


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """``demo`` takes no arguments."""


def run(name: str, args: argparse.Namespace) -> int:
    """Build the demo bundle if needed, then resume it."""
    return demo()


def demo() -> int:
    from smolvmm.cli.machine import BACKEND
    from smolvmm.host.kvmprobe import probe

    path = demo_bundle()  # builds the demo guest image here, before any nested machine needs it
    if probe().kind == "pvm" and os.environ.get("SMOLVMM_NESTED") != "1":
        print("smolvmm demo: this host's /dev/kvm is PVM; running the demo inside tools/nested-kvm", file=sys.stderr)
        nested = [sys.executable, "-m", "smolvmm.nested", "--out", os.path.dirname(path)]
        return subprocess.call([*nested, sys.executable, "-m", "smolvmm", "demo"])
    anyio.run(_ensure_bundle, path, backend=BACKEND)
    print(f"smolvmm demo: resuming {path}", file=sys.stderr)
    interactive = os.isatty(0)
    return anyio.run(_run, path, None if interactive else DEMO_SCRIPT.encode(), backend=BACKEND)
