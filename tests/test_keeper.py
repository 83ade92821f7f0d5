"""The jail's keeper (smolvmm.host.keeper): the process outside the jail that publishes what a jailed
monitor writes, and cleans up after it. Here the "monitor" is this test, writing into the staging
directory as the jail's user would (as root, files are given to ``nobody`` as the jail would make them)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from smolvmm.host.jail import Jail
from smolvmm.host.keeper import Keeper, KeeperError

JAIL = Jail.parse(None) if os.geteuid() == 0 else Jail(os.getuid(), os.getgid())


def staged_file(keeper: Keeper, path: Path, text: str) -> Path:
    staged = Path(keeper.staging[str(path.parent)]) / path.name
    staged.write_text(text)
    os.chown(staged, JAIL.uid, JAIL.gid)
    return staged


def test_a_staged_file_is_published_in_place_as_the_users_and_the_staging_goes_at_the_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o700)  # the jail's user could not write here
    saved, copied, listed = out / "saved.smolmachine", tmp_path / "copied.txt", tmp_path / "entry.json"
    listed.write_text("{}")
    keeper = Keeper([str(saved), str(copied)], JAIL.uid, JAIL.gid, discard=[str(listed)])
    staging = {Path(s) for s in keeper.staging.values()}
    assert set(keeper.staging) == {str(out), str(tmp_path)}
    for directory in staging:
        info = directory.stat()
        assert directory.name.startswith(".smolvmm-jail-") and stat.S_IMODE(info.st_mode) == 0o700
        assert (info.st_uid, info.st_gid) == (JAIL.uid, JAIL.gid)

    staged_file(keeper, saved, "first")
    keeper.publish(str(saved))
    assert saved.read_text() == "first" and saved.stat().st_uid == os.getuid()
    staged_file(keeper, saved, "second")  # saved again (SIGUSR1): replaced atomically
    keeper.publish(str(saved))
    assert saved.read_text() == "second"
    staged_file(keeper, copied, "copied out")
    keeper.publish(str(copied))
    assert copied.read_text() == "copied out"

    keeper.close()
    assert not any(directory.exists() for directory in staging)
    assert not listed.exists()  # what the monitor listed before its jail goes with it
    assert sorted(p.name for p in out.iterdir()) == ["saved.smolmachine"]


def test_the_keeper_publishes_only_its_outputs_and_only_plain_files_of_the_jail(tmp_path: Path) -> None:
    saved = tmp_path / "saved.smolmachine"
    keeper = Keeper([str(saved)], JAIL.uid, JAIL.gid)
    try:
        with pytest.raises(KeeperError, match=r"/etc/passwd: not a file this monitor was to write"):
            keeper.publish("/etc/passwd")
        with pytest.raises(KeeperError, match=r"saved.smolmachine: No such file or directory"):
            keeper.publish(str(saved))
        staged = Path(keeper.staging[str(tmp_path)]) / saved.name
        staged.symlink_to("/etc/shadow")
        with pytest.raises(KeeperError, match=r"not a file of its own"):
            keeper.publish(str(saved))
        assert not saved.exists() and not saved.is_symlink()
        if os.geteuid() == 0:  # a file the jail's user did not make (root's, here) is not its to publish
            staged.unlink()
            staged.write_text("root's")
            with pytest.raises(KeeperError, match=r"not a file of its own"):
                keeper.publish(str(saved))
        staged.unlink(missing_ok=True)
        staged_file(keeper, saved, "fine")
        keeper.publish(str(saved))  # the refusals did not end it
        assert saved.read_text() == "fine"
    finally:
        keeper.close()


def test_a_monitor_that_dies_leaves_no_staging_behind(tmp_path: Path) -> None:
    keeper = Keeper([str(tmp_path / "x.smolmachine")], JAIL.uid, JAIL.gid)
    staging = Path(keeper.staging[str(tmp_path)])
    staged_file(keeper, tmp_path / "x.smolmachine", "half")
    keeper._socket.close()  # as a killed monitor's descriptors close
    assert keeper._process.wait(timeout=60) == 0
    assert not staging.exists() and list(tmp_path.iterdir()) == []


def test_a_request_longer_than_any_path_ends_the_keeper_and_its_staging(tmp_path: Path) -> None:
    keeper = Keeper([str(tmp_path / "x.smolmachine")], JAIL.uid, JAIL.gid)
    keeper._socket.sendall(b"x" * 20_000)
    keeper._socket.shutdown(socket.SHUT_WR)
    assert keeper._process.wait(timeout=60) == 0
    assert list(tmp_path.iterdir()) == []


def test_a_discard_the_monitor_asks_to_keep_stays(tmp_path: Path) -> None:
    log, socket_file = tmp_path / "id.log", tmp_path / "id.control"
    log.write_text("smolvmm: error: why the machine failed\n")
    socket_file.write_text("")
    keeper = Keeper([], JAIL.uid, JAIL.gid, discard=[str(log), str(socket_file)])
    keeper.keep(str(log))
    with pytest.raises(KeeperError, match=r"cannot keep /etc/passwd: not a request for this keeper"):
        keeper.keep("/etc/passwd")
    keeper.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id.log"]
