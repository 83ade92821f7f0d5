"""Files that are not regular files, named as a command's input or output: a FIFO (which blocks a
reader until a writer comes), an endless or huge key, a device as the output. Each is one line and
an exit status, never a hang, never memory without bound, and nothing it names is replaced."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_conventions import VALID, smolvmm

import smolformat
from smolformat import amend
from smolformat.files import new_file_mode, read_regular
from smolformat.layout import SectionKind
from smolformat.payloads import WorkingSet


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "{fifo}"],
        ["verify", "{fifo}"],
        ["pack", "--zstd", "{fifo}", "{out}"],
        ["run", "--prepare-only", "{fifo}"],
    ],
)
def test_a_fifo_as_the_bundle_is_a_bad_bundle_at_once(fifo: Path, tmp_path: Path, command: list[str]) -> None:
    done = smolvmm(*(part.format(fifo=fifo, out=tmp_path / "out.smolmachine") for part in command))
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(f"{fifo}: not a regular file")
    assert not (tmp_path / "out.smolmachine").exists()


def test_a_fifo_as_the_output_is_refused_and_kept(fifo: Path, tmp_path: Path) -> None:
    for command in (
        ["pack", "--raw", str(VALID), str(fifo)],
        ["sign", "--key", str(tmp_path / "k"), "-o", str(fifo), str(VALID)],
    ):
        if command[0] == "sign" and not (tmp_path / "k").exists():
            assert smolvmm("keygen", str(tmp_path / "k")).returncode == 0
        done = smolvmm(*command)
        assert done.returncode == 1, done.stderr
        assert f"{fifo}: it exists and is not a regular file" in done.stderr
        assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "k", "k.pub"]  # no temporary file left


def test_pull_refuses_a_device_as_its_output_before_it_transfers(fifo: Path) -> None:
    # 127.0.0.1:9 (discard) answers nothing: the output is refused before any connection
    done = smolvmm("pull", "127.0.0.1:9/team/app:v1", "-o", str(fifo))
    assert done.returncode == 1 and "it exists and is not a regular file" in done.stderr, done.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_keys_are_read_only_from_small_regular_files(fifo: Path, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"-" * (1 << 20))
    for key, said in (
        (fifo, "not a regular file"),
        (big, "larger than 65536 bytes"),
        (Path("/dev/zero"), "not a regular file"),
    ):
        done = smolvmm("sign", "--key", str(key), "-o", str(tmp_path / "signed.smolmachine"), str(VALID))
        assert done.returncode == 2 and said in done.stderr, done.stderr
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "zero.pub").symlink_to("/dev/zero")
    done = smolvmm("verify", "--trusted-keys", str(trusted), str(VALID))
    assert done.returncode == 2 and "cannot read trusted key" in done.stderr and "not a regular file" in done.stderr
    with pytest.raises(OSError, match="not a regular file"):
        read_regular(fifo, 10)


def test_a_signature_written_to_another_filesystem_is_copied_through_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(*_args: object) -> int:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    source = tmp_path / "source.smolmachine"
    shutil.copyfile(VALID, source)
    monkeypatch.setattr(os, "copy_file_range", cross_device)
    amend.replace_section(source, tmp_path / "copy.smolmachine", SectionKind.WORKING_SET, WorkingSet.build([]))
    with smolformat.open_bundle(tmp_path / "copy.smolmachine") as bundle:
        bundle.verify()


def test_a_runtime_directory_that_cannot_be_one_is_one_line(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("not a directory")
    done = smolvmm("ps", env={**os.environ, "XDG_RUNTIME_DIR": str(file)})
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"smolvmm: error: cannot make the runtime directory {file}/smolvmm: Not a directory; set XDG_RUNTIME_DIR"
    ]


def test_a_new_file_gets_the_mode_open_would_give_it_not_mkstemps() -> None:
    """Bundles written, pulled and downloaded are shared as other files are: 0666 less the umask."""
    before = os.umask(0o027)
    try:
        assert new_file_mode() == 0o640
        os.umask(0o002)
        assert new_file_mode() == 0o664
    finally:
        os.umask(before)


def test_a_written_bundle_is_readable_by_others_as_the_umask_allows(tmp_path: Path) -> None:
    packed = tmp_path / "b.smolmachine"
    result = subprocess.run(
        ["sh", "-c", 'umask 027 && exec "$0" -m smolvmm pack --zstd "$1" "$2"', sys.executable, VALID, packed],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(packed.stat().st_mode) == 0o640
