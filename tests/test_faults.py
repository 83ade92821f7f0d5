"""Faults leave nothing broken (issue 13): ``kill -9`` of a ``pack`` at several points never leaves a
partial bundle under the final name, a rerun removes what the killed one left, and a full disk is
one line with nothing left behind. Real processes, a real small tmpfs. The guest-side faults
(build, snapshot, restore) are in test_faults_guest.py."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundles import contents, digest, kill_when, leftovers

from smolformat import open_bundle, samples, write_bundle
from smolformat.tempnames import owned_prefix, remove_stale

RAM = 96 << 20


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw bundle of 96 MiB of guest-like RAM: packing it takes long enough to be killed midway."""
    work = tmp_path_factory.mktemp("faults")
    device_config, _ = samples.devices(1)
    big = dataclasses.replace(
        contents(work),
        config=samples.machine_config("x86_64", [(0, RAM)], device_config, vcpus=2),
        memory=[samples.realistic_memory(RAM, seed=3)],
    )
    path = work / "source.smolmachine"
    write_bundle(path, big, memory_encoding="raw")
    return path


def pack(source: Path, target: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "smolvmm", "pack", "--zstd", str(source), str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_a_killed_pack_never_leaves_a_partial_bundle_and_a_rerun_cleans_up(source: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference.smolmachine"
    assert pack(source, reference).wait() == 0
    before = digest(source)
    target = tmp_path / "out.smolmachine"
    full = reference.stat().st_size
    killed = 0
    for point in (1, full // 4, full // 2, full * 9 // 10):  # from the first byte to nearly done
        if kill_when(pack(source, target), tmp_path, target.name, point):
            killed += 1
            assert not target.exists()  # never a partial file under the final name
            assert leftovers(tmp_path, target.name)  # what a kill -9 leaves: only a temporary file
    assert killed >= 3  # the pack was really killed midway, at least at the first three points
    done = pack(source, target)
    assert done.wait() == 0, done.stderr.read()
    assert leftovers(tmp_path, target.name) == []  # the rerun removed what the killed ones left
    assert digest(target) == digest(reference) and digest(source) == before
    with open_bundle(target) as bundle:
        bundle.verify()


def test_a_full_disk_during_pack_is_one_line_and_leaves_nothing(source: Path, tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is missing")
    small = tmp_path / "small"
    small.mkdir()
    namespace = ["unshare", "--mount", "--propagation", "private"] if os.geteuid() == 0 else ["unshare", "-rm"]
    script = (
        'mount -t tmpfs -o size=4m tmpfs "$1" || exit 99; '
        '"$2" -m smolvmm pack --raw "$3" "$1/out.smolmachine"; status=$?; '
        'ls -A "$1"; exit $status'
    )
    done = subprocess.run(
        [*namespace, "sh", "-c", script, "sh", str(small), sys.executable, str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "No space left on device" in done.stderr, done.stderr
    assert f"{small}/out.smolmachine" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""  # `ls -A` of the tmpfs: no bundle, no temporary file


def test_only_the_temporary_names_of_processes_that_ended_are_removed(tmp_path: Path) -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)
    (tmp_path / f".app.smolmachine.{dead}.x1.tmp").write_bytes(b"partial")
    (tmp_path / f"smolvmm-snapshot.{dead}.abc").mkdir()
    (tmp_path / f"smolvmm-snapshot.{dead}.abc" / "disk0.img").write_bytes(b"flat")
    mine = tmp_path / f"{owned_prefix('.app.smolmachine')}x2.tmp"
    mine.write_bytes(b"being written")
    others = [tmp_path / name for name in (".app.smolmachine", ".app.smolmachine.notapid.tmp", "app.smolmachine")]
    for path in others:
        path.write_bytes(b"not ours to remove")
    assert [p.name for p in remove_stale(tmp_path, ".app.smolmachine")] == [f".app.smolmachine.{dead}.x1.tmp"]
    assert [p.name for p in remove_stale(tmp_path, "smolvmm-snapshot")] == [f"smolvmm-snapshot.{dead}.abc"]
    assert mine.exists() and all(path.exists() for path in others)
    assert remove_stale(tmp_path / "missing", "x") == []
