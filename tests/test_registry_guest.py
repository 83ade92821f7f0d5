"""``smolvmm run REGISTRY/REPO:TAG`` on real KVM, and two saves of one running guest through a
registry: the registry runs where pytest runs (inside tools/nested-kvm on PVM hosts, whose loopback
is its own)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from guests import GUEST_TIMEOUT, shell
from registry_server import registry_server

import smolvmm
from smolvmm.images.cache import cache_root
from smolvmm.registry.store import BlobStore

pytestmark = [pytest.mark.kvm]


def test_run_by_reference_resumes_the_pushed_machine(bundle: Path, tmp_path: Path) -> None:
    with registry_server(tmp_path / "registry") as registry:
        ref = f"{registry.address}/machines/app:v1"
        pushed = subprocess.run(
            [sys.executable, "-m", "smolvmm", "push", str(bundle), ref], capture_output=True, text=True, timeout=600
        )
        assert pushed.returncode == 0, pushed.stderr
        digest = pushed.stdout.strip().rpartition("@")[2]
        ran = subprocess.run(
            [sys.executable, "-m", "smolvmm", "run", ref],
            input=b"echo restored-$((6*7))\npoweroff -f\n",
            capture_output=True,
            timeout=GUEST_TIMEOUT,
        )
        assert ran.returncode == 0, ran.stderr.decode(errors="replace")
        assert b"restored-42" in ran.stdout
        stored = cache_root() / "oci" / "bundles" / (digest.removeprefix("sha256:") + ".smolmachine")
        assert stored.read_bytes() == bundle.read_bytes()


@pytest.mark.anyio
async def test_a_pulled_guest_restores_and_its_two_saves_go_up_and_down_as_patches(
    bundle: Path, tmp_path: Path, anyio_backend: str
) -> None:
    with registry_server(tmp_path / "registry") as registry:
        ref = f"{registry.address}/machines/app:v1"
        await smolvmm.push(bundle, ref)
        await smolvmm.pull(ref)  # into the local store, as `smolvmm run REF` does
        pulled = await smolvmm.pull(ref, tmp_path / "pulled.smolmachine")
        assert pulled.transfer.moved < pulled.transfer.total / 100  # every blob is in the store already
        async with smolvmm.Machine.restore(pulled) as machine:
            assert await shell(machine, "cat /mnt/hello.txt") == "hello from the base image"
            await machine.snapshot(tmp_path / "first.smolmachine")
            await anyio.sleep(5)  # the guest runs on between two saves
            await machine.snapshot(tmp_path / "second.smolmachine")

        second = tmp_path / "second.smolmachine"
        await smolvmm.push(tmp_path / "first.smolmachine", f"{registry.address}/machines/gens:one")
        pushed = await smolvmm.push(second, f"{registry.address}/machines/gens:two")
        assert pushed.transfer.moved < second.stat().st_size / 10, pushed.transfer
        pull_store = BlobStore(tmp_path / "pull-store")
        await smolvmm.pull(f"{registry.address}/machines/gens:one", tmp_path / "one.smolmachine", store=pull_store)
        pulled = await smolvmm.pull(
            f"{registry.address}/machines/gens:two", tmp_path / "two.smolmachine", store=pull_store
        )
        assert pulled.transfer.moved < second.stat().st_size / 10, pulled.transfer
        assert pulled.path.read_bytes() == second.read_bytes()
