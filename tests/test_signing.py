"""Signed bundles: keygen, sign, verify --trusted-keys, pack keeps a signature, and the trust
policy of a restore (refusals are checked natively: they happen before anything is created)."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from functools import partial
from pathlib import Path

import anyio
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from guests import GUEST_TIMEOUT

import smolformat
from smolformat.crafting import parse_frame
from smolformat.layout import SectionKind
from smolformat.signature import signed_message
from smolvmm import BundleError, ConfigError, Machine
from smolvmm.cli.dispatch import main

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())["vectors"]
UNSIGNED = VECTORS / "valid-x86_64-raw.smolmachine"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """A key pair in ``trusted/`` (me, me.pub) and another in ``other/`` (you, you.pub)."""
    for folder, name in (("trusted", "me"), ("other", "you")):
        (tmp_path / folder).mkdir()
        assert main(["keygen", str(tmp_path / folder / name)]) == 0
    return tmp_path / "trusted", tmp_path / "other"


@pytest.fixture
def signed(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    path = tmp_path / "app.smolmachine"
    shutil.copy(UNSIGNED, path)
    assert main(["sign", "--key", str(keys[0] / "me"), str(path)]) == 0
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("smolvmm: error: "), err
    return err


def test_keygen_writes_pem_keys_and_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", str(tmp_path / "k")]) == 0
    assert "ed25519:" in capsys.readouterr().out
    private, public = (tmp_path / "k").read_text(), (tmp_path / "k.pub").read_text()
    assert private.startswith("-----BEGIN PRIVATE KEY-----") and public.startswith("-----BEGIN PUBLIC KEY-----")
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert main(["keygen", str(tmp_path / "k")]) == 2
    assert "exists" in _one_line_error(capsys)
    assert (tmp_path / "k").read_text() == private
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "k.pub"]  # no temporary file left


def test_sign_then_verify_and_pack_keeps_the_signature(
    signed: Path, keys: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", "--trusted-keys", str(keys[0]), str(signed)]) == 0
    assert "signed by me.pub" in capsys.readouterr().out
    assert main(["verify", str(signed)]) == 0
    assert "1 signature(s) not checked" in capsys.readouterr().out
    assert main(["inspect", "--json", str(signed)]) == 0
    (record,) = json.loads(capsys.readouterr().out)["signatures"]
    assert record["algorithm"] == 1 and (keys[0] / "me.pub").exists() and len(record["public_key"]) == 64
    assert not list(tmp_path.glob(".*.tmp"))
    zstd, raw = tmp_path / "z.smolmachine", tmp_path / "r.smolmachine"
    assert main(["pack", "--zstd", str(signed), str(zstd)]) == 0
    assert main(["pack", "--raw", "--smallest", str(zstd), str(raw)]) == 0
    capsys.readouterr()
    for packed in (zstd, raw):
        assert main(["verify", "--trusted-keys", str(keys[0]), str(packed)]) == 0
        assert "signed by me.pub" in capsys.readouterr().out
    with smolformat.open_bundle(zstd) as bundle:
        assert bundle.memory_encoding == "zstd" and len(bundle.signatures) == 1


def test_a_second_signer_is_added_and_resigning_replaces(signed: Path, keys: tuple[Path, Path]) -> None:
    assert main(["sign", "--key", str(keys[1] / "you"), str(signed)]) == 0
    assert main(["sign", "--key", str(keys[0] / "me"), str(signed)]) == 0
    with smolformat.open_bundle(signed) as bundle:
        assert len(bundle.signatures) == 2
        bundle.verify()  # the old signature's bytes became zero padding
    for folder in keys:
        assert main(["verify", "--trusted-keys", str(folder), str(signed)]) == 0


def test_another_key_and_an_unsigned_bundle_are_refused(
    signed: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", "--trusted-keys", str(keys[1]), str(signed)]) == 3
    assert "signed only by keys that are not trusted here (ed25519:" in _one_line_error(capsys)
    assert main(["verify", "--trusted-keys", str(keys[0]), str(UNSIGNED)]) == 3
    assert "is not signed" in _one_line_error(capsys)


def test_signing_into_a_missing_directory_names_the_output(
    keys: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "missing" / "out.smolmachine"
    assert main(["sign", "--key", str(keys[0] / "me"), "-o", str(output), str(UNSIGNED)]) == 1  # not a bad bundle
    assert f"cannot write {output}: No such file or directory" in _one_line_error(capsys)


def _sections(path: Path) -> list[dict]:
    return parse_frame(path.read_bytes())[1]


@pytest.mark.parametrize("resealed", [False, True], ids=["flipped", "flipped-and-resealed"])
def test_one_flipped_byte_in_any_section_is_refused(
    signed: Path, keys: tuple[Path, Path], tmp_path: Path, resealed: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """Flipped alone, a byte breaks a digest; flipped with its digest re-sealed (spec §4, §3), it
    breaks the signature, or the structure. Either way the bundle is refused in one line."""
    from smolformat.crafting import reseal, section_digest
    from smolformat.layout import SectionEntry

    data = signed.read_bytes()
    header, entries = parse_frame(data)
    for number, entry in enumerate(entries):
        at = entry["offset"] + entry["length"] // 2
        changed = bytearray(data)
        changed[at] ^= 0x20
        if resealed:
            entry = {
                **entry,
                "digest": section_digest(bytes(changed[entry["offset"] : entry["offset"] + entry["length"]])),
            }
            where = header["table_offset"] + number * header["entry_size"]
            changed[where : where + 72] = SectionEntry.build(entry)
            changed = bytearray(reseal(bytes(changed)))
        path = tmp_path / f"changed-{number}.smolmachine"
        path.write_bytes(bytes(changed))
        assert main(["verify", "--trusted-keys", str(keys[0]), str(path)]) == 3, SectionKind(entry["kind"]).name
        _one_line_error(capsys)
    assert len(entries) == 11


def test_the_signature_vectors_check_out() -> None:
    vectors = [v for v in MANIFEST if "signature" in v]
    assert {v["file"] for v in vectors} >= {"signed-x86_64-raw.smolmachine", "signed-x86_64-zstd.smolmachine"}
    for vector in vectors:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(vector["signature"]["public_key"]))
        with smolformat.open_bundle(VECTORS / vector["file"]) as bundle:
            (record,) = bundle.signatures
            assert record.public_key.hex() == vector["signature"]["public_key"]
            try:
                key.verify(record.signature, signed_message(bundle))
                valid = True
            except InvalidSignature:
                valid = False
        assert valid == vector["signature"]["valid"], vector["file"]


def test_a_restore_checks_the_signature_before_anything_else(signed: Path, keys: tuple[Path, Path]) -> None:
    with pytest.raises(BundleError, match=r"is not signed, and a signature by a trusted key is required$"):
        anyio.run(lambda: Machine.prepare_restore(UNSIGNED, trusted_keys=keys[0]))
    with pytest.raises(BundleError, match="signed only by keys that are not trusted here"):
        anyio.run(lambda: Machine.prepare_restore(signed, trusted_keys=keys[1]))
    # A good signature lets the restore go on, to the next check (this sample's devices are not ours).
    with pytest.raises(BundleError, match="acpi-pm#0: this monitor has no such pio device"):
        anyio.run(lambda: Machine.prepare_restore(signed, trusted_keys=keys[0]))
    with pytest.raises(ConfigError, match=r"no trusted keys \(\*\.pub files\) in "):
        anyio.run(lambda: Machine.prepare_restore(signed, trusted_keys=signed.parent))


def test_a_restore_refuses_a_flipped_byte_in_any_section_of_a_signed_bundle(
    signed: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """Also in a section a restore never reads (the kernel): the signature covers every one."""
    data = signed.read_bytes()
    kinds = set()
    for number, entry in enumerate(_sections(signed)):
        changed = bytearray(data)
        changed[entry["offset"] + entry["length"] // 2] ^= 0x20
        path = tmp_path / f"changed-{number}.smolmachine"
        path.write_bytes(bytes(changed))
        with pytest.raises(BundleError) as refused:
            anyio.run(partial(Machine.prepare_restore, path, trusted_keys=keys[0]))
        assert "no such pio device" not in str(refused.value), SectionKind(entry["kind"]).name
        kinds.add(SectionKind(entry["kind"]))
    assert SectionKind.KERNEL in kinds


def test_run_require_signature_refuses_an_unsigned_bundle_in_one_line(keys: tuple[Path, Path]) -> None:
    for flags, message, status in (
        (["--require-signature"], "--require-signature needs --trusted-keys DIR", 2),
        (["--require-signature", "--trusted-keys", str(keys[0])], "is not signed", 3),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "smolvmm", "run", *flags, str(UNSIGNED)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == status and result.stdout == "" and "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("smolvmm: error: ")]
        assert len(errors) == 1 and message in errors[0], result.stderr  # (PVM hosts add a warning line)


@pytest.mark.kvm
def test_run_require_signature_restores_a_signed_bundle(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    assert main(["keygen", str(tmp_path / "keys" / "builder")]) == 0
    signed = tmp_path / "signed.smolmachine"
    assert main(["sign", "--key", str(tmp_path / "keys" / "builder"), "-o", str(signed), str(bundle)]) == 0
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "smolvmm",
            "run",
            "--require-signature",
            "--trusted-keys",
            str(tmp_path / "keys"),
            "--timings",
            str(signed),
        ],
        input=b"echo signed-$((6*7))\npoweroff -f\n",
        capture_output=True,
        timeout=GUEST_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"signed-42" in result.stdout and b'{"phases_ms": {"signature": ' in result.stderr


def test_a_signed_bundle_gets_no_working_set_after_the_fact(signed: Path) -> None:
    before = signed.read_bytes()
    with pytest.raises(smolformat.FormatError, match="record its working set before signing"):
        smolformat.set_working_set(signed, [{"address": 0, "pages": 1}])
    assert signed.read_bytes() == before  # the signature covers the working set: it would no longer verify
