"""What a CLI restore imports: only what a restore uses (how long that takes is bench/bench_imports.py's)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smolvmm import Machine, MachineConfig

pytestmark = pytest.mark.kvm(linux_guest=False)

IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| *(\S+)$", re.MULTILINE)


def _imports(*argv: str) -> set[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(IMPORTED.findall(done.stderr))


@pytest.mark.anyio
async def test_a_cli_restore_imports_only_what_a_restore_uses(tmp_path: Path) -> None:
    bundle = tmp_path / "app.smolmachine"
    async with Machine.boot(MachineConfig(vcpus=1, memory=128 << 20)) as machine:
        await machine.snapshot(bundle)
        await machine.stop()
    loaded = _imports("-m", "smolvmm", "run", "--prepare-only", str(bundle))
    assert {"smolvmm.monitor.restore", "smolvmm.hypervisor.kvm.backend", "smolformat.reader", "anyio"} <= loaded
    # trio is for trio programs (the CLI drives its machine on asyncio); pdb came in through construct;
    # a raw bundle needs neither zstd nor the writer, and nothing is compiled.
    # nor the other architecture's machine, nor importlib.resources (C sources are found beside their modules),
    # nor the cold boot's kernel loader, nor sysconfig (the native modules' suffix comes from importlib)
    host, other_arch = {"x86_64": ("x86_64", "arm64"), "aarch64": ("arm64", "x86_64")}[platform.machine()]
    unwanted = {"trio", "pdb", "zstandard", "smolformat.writer", "cffi.recompiler", "setuptools"}
    unwanted |= {f"smolvmm.arch.{other_arch}.machine", "importlib.resources", f"smolvmm.arch.{host}.boot", "sysconfig"}
    assert loaded & unwanted == set()
