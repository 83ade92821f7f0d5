"""``python -m smolvmm inspect|verify|pack`` on real bundles: one line on failure, never a traceback."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bundles import contents

import smolformat
from smolformat import write_bundle
from smolvmm.cli.dispatch import main

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
VALID = VECTORS / "valid-x86_64-raw.smolmachine"


def test_inspect_json_lists_machine_and_sections(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", str(VALID)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["arch"] == "x86_64" and summary["vcpus"] == 1 and summary["memory_encoding"] == "raw"
    assert {s["kind"] for s in summary["sections"]} >= {"config", "vcpu_state", "memory_data", "disk_data"}
    assert "virtio-blk" in {d["kind"] for d in summary["devices"]}


def test_inspect_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(VALID)]) == 0
    out = capsys.readouterr().out
    assert "x86_64, 1 vCPUs" in out and "memory_data" in out and "raw_pages" in out


def test_verify_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(VALID)]) == 0
    assert ": ok (" in capsys.readouterr().out


@pytest.mark.parametrize("vector", ["bad-digest-memory", "smolpack", "truncated-header", "empty"])
def test_verify_names_the_problem_in_one_line(vector: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(VECTORS / f"{vector}.smolmachine")]) == 3  # bad bundle, not a usage error (2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("smolvmm: error: ")


def test_verify_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tmp_path / "nope.smolmachine")]) == 3
    assert "No such file" in capsys.readouterr().err


def test_smolpack_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    main(["verify", str(VECTORS / "smolpack.smolmachine")])
    assert "SMOLPACK disk pack" in capsys.readouterr().err


def _held(path: Path) -> dict[str, Any]:
    """Everything a bundle holds, decoded: what a lossless pack keeps (only encodings may change)."""
    with smolformat.open_bundle(path) as bundle:
        ram = bytearray(sum(region.size for region in bundle.config.ram))
        bundle.read_memory_into([memoryview(ram)])
        disks = []
        for index in range(bundle.disk_count):
            disk = bytearray(bundle.disk(index).size)
            bundle.disk(index).read_into(disk)
            disks.append(bytes(disk))
        return {
            "config": bundle.config,
            "metadata": bundle.metadata,
            "vcpus": bundle.vcpus,
            "vm_state": bundle.vm_state,
            "devices": bundle.devices,
            "ram": bytes(ram),
            "disks": disks,
            "kernel": bundle.kernel,
            "initrd": bundle.initrd,
            "unknown": [
                (s.kind, s.flags, s.encoding, s.index, s.logical_length, data) for s, data in bundle.unknown_sections()
            ],
        }


def test_pack_round_trip_through_the_module_entry_point(tmp_path: Path) -> None:
    zstd, raw, direct = tmp_path / "z.smolmachine", tmp_path / "r.smolmachine", tmp_path / "d.smolmachine"
    for args in (
        ["pack", "--zstd", str(VALID), str(zstd)],
        ["pack", "--raw", str(zstd), str(raw)],
        ["pack", "--raw", str(VALID), str(direct)],
        ["verify", str(raw)],
    ):
        done = subprocess.run([sys.executable, "-m", "smolvmm", *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    # The vector leaves every zero page out; the default writer stores short zero gaps, so compare
    # what the bundle holds, and that the same input always gives the same bytes.
    assert raw.read_bytes() == direct.read_bytes()
    assert _held(raw) == _held(VALID) and any(_held(VALID)["ram"])
    # --smallest stores what the vector's writer did (every zero page out, every repeat once).
    smallest = tmp_path / "s.smolmachine"
    assert main(["pack", "--raw", "--smallest", str(zstd), str(smallest)]) == 0
    assert smallest.read_bytes() == VALID.read_bytes() and smallest.stat().st_size < raw.stat().st_size


@pytest.mark.parametrize(
    "source",
    [
        "valid-x86_64-raw",
        "valid-x86_64-zstd",
        "valid-arm64-raw",
        "valid-unknown-optional-section",
        "valid-minor-version",
    ],
)
def test_pack_keeps_every_section(tmp_path: Path, source: str) -> None:
    given, zstd, raw = VECTORS / f"{source}.smolmachine", tmp_path / "z.smolmachine", tmp_path / "r.smolmachine"
    assert main(["pack", "--zstd", str(given), str(zstd)]) == 0
    assert main(["pack", "--raw", str(zstd), str(raw)]) == 0
    held = _held(given)
    assert _held(zstd) == held and _held(raw) == held
    assert held["kernel"] and held["disks"] and held["metadata"]
    assert bool(held["unknown"]) == (source == "valid-unknown-optional-section")


def test_pack_needs_an_encoding(tmp_path: Path) -> None:
    shutil.copy(VALID, tmp_path / "in.smolmachine")
    with pytest.raises(SystemExit):
        main(["pack", str(tmp_path / "in.smolmachine"), str(tmp_path / "out.smolmachine")])


def test_pack_onto_a_full_disk_fails_in_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """A file-size limit stands in for a full disk: writes past 2 MiB fail (EFBIG), in the middle
    of writing RAM that is still mapped."""
    source = tmp_path / "source.smolmachine"
    write_bundle(source, contents(tmp_path), memory_encoding="zstd")

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))

    target = tmp_path / "out" / "packed.smolmachine"
    target.parent.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "smolvmm", "pack", "--raw", str(source), str(target)],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"smolvmm: error: {target}: File too large"), done.stderr
    assert list(target.parent.iterdir()) == []


def test_build_keeps_no_bundle_of_a_demo_guest_whose_agent_did_not_answer(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from smolvmm import AgentError, Console
    from smolvmm.cli.machine import _check_agent_saved
    from smolvmm.monitor.timings import Timings

    console = Console(len)
    console.write_output(b"[   25.557469] virtio_console virtio0: output:id 0 is not a head!\r\n$ ")
    path = tmp_path / "app.smolmachine"
    path.write_bytes(b"saved")
    answered = SimpleNamespace(console=console, snapshot_timings=Timings())
    _check_agent_saved(path, answered)  # type: ignore[arg-type]
    assert path.exists()
    silent = SimpleNamespace(console=console, snapshot_timings=Timings())
    silent.snapshot_timings.note("agent", "no answer: the bundle's restores will not sync it or run commands")
    with pytest.raises(AgentError) as refused:
        _check_agent_saved(path, silent)  # type: ignore[arg-type]
    assert str(refused.value) == (
        f"the guest agent did not answer before the save: {path} not kept;"
        " the guest's kernel said: virtio_console virtio0: output:id 0 is not a head!"
    )
    assert not path.exists()
