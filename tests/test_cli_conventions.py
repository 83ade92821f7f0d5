"""The CLI's conventions, run as a user runs it (a subprocess): version, usage errors before anything
starts, exit statuses, --json on stdout, closed pipes, typos, colour. No guest is needed."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import anyio
import pytest

from smolvmm.cli import output as cli_output

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
VALID = VECTORS / "valid-x86_64-raw.smolmachine"
BAD = VECTORS / "bad-digest-memory.smolmachine"


def smolvmm(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smolvmm", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def test_version() -> None:
    done = smolvmm("--version")
    assert done.returncode == 0 and done.stdout == f"smolvmm {version('smolvmm')}\n"


def test_help_and_the_readme_document_the_same_exit_statuses() -> None:
    done = smolvmm("--help")
    assert done.returncode == 0
    table = done.stdout.split("exit status:")[1]
    for status, meaning in (
        ("0", "success"),
        ("1", "error"),
        ("2", "usage"),
        ("3", "bad bundle"),
        ("4", "crashed"),
        ("141", "stdout closed early"),
        ("128+N", "signal"),
    ):
        assert any(line.split()[0] == status.split("+")[0] or status in line for line in table.splitlines()[1:])
        assert meaning in table
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert re.findall(r"^  \| (\d+|N) \|", readme, re.M) == [line.split()[0] for line in table.splitlines()[1:]]


@pytest.mark.parametrize(
    "args",
    [
        ["boot", "--cpus", "0"],
        ["boot", "--cpus", "-1"],
        ["boot", "--cpus", "two"],
        ["boot", "--mem", "0"],
        ["boot", "--mem", "lots"],
        ["boot", "--mem", "3M"],  # a size, but no machine has 3 MiB of RAM
        ["build", "-o", "x.smolmachine", "--timeout", "0"],
        ["build", "-o", "x.smolmachine", "--cpus", "0"],
        ["build", "-o", "x.smolmachine", "--image", ""],  # not the demo guest, as no --image would be
        ["build", "-o", "x.smolmachine", "-f", ""],
        ["boot", "--bundle", "b.smolmachine", "--cpus", "2"],
        ["pack", "--raw", "--threads", "0", str(VALID), "out.smolmachine"],
        ["pack", "--zstd", "--threads", "-3", str(VALID), "out.smolmachine"],
        ["run", "--copy-in", "/etc/hostname:/x", str(VALID)],  # copies go with a command
        ["run", "--save", "s.smolmachine", str(VALID), "--", "true"],  # --save is the console's
        ["run", "--secret-env", "TOKEN=hunter2", str(VALID), "--", "true"],
        ["run", "--secret-env", "", str(VALID), "--", "true"],
        ["run", "--net", "user,,forward=8080:80", str(VALID)],
        ["run", "--copy-in", "/dev/null:/x", str(VALID), "--", "true"],  # not a regular file
    ],
)
def test_usage_errors_exit_2_before_anything_starts(args: list[str], tmp_path: Path) -> None:
    """Nothing is resolved, downloaded, built or booted: a clean cache gets no guest image."""
    cache = tmp_path / "cache"
    done = smolvmm(*args, cwd=tmp_path, env={**os.environ, "XDG_CACHE_HOME": str(cache)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "error:" in done.stderr and done.stdout == ""
    assert "PVM" not in done.stderr and "hunter2" not in done.stderr  # a value typed by mistake stays unsaid
    assert not (cache / "smolvmm" / "images").exists() and not (cache / "smolvmm" / "debs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"] * cache.exists()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--net", ",,,"], "empty network option in"),
        (["--secret-env", ""], "--secret-env needs the NAME of a variable set here"),
        (["--copy-in", "/dev/null:/x"], "--copy-in /dev/null: not a regular file"),
    ],
)
def test_an_empty_or_odd_value_is_named_as_such(args: list[str], said: str) -> None:
    done = smolvmm("run", *args, str(VALID), "--", "true")
    assert done.returncode == 2 and said in done.stderr, done.stderr


@pytest.mark.parametrize("host", ["missing/out.txt", "."])
def test_a_copy_out_target_that_cannot_be_written_is_refused_before_the_clone_starts(host: str, tmp_path: Path) -> None:
    done = smolvmm("run", str(VALID), "--copy-out", f"/tmp/out.txt:{host}", "--", "true", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"smolvmm: error: --copy-out {host}: "), done.stderr


def test_run_without_arguments_asks_only_for_the_bundle() -> None:
    done = smolvmm("run")
    assert done.returncode == 2 and "the following arguments are required: bundle (" in done.stderr, done.stderr
    assert "CMD" not in done.stderr  # the command is optional


def test_a_missing_bundle_is_one_line_without_the_pvm_note(tmp_path: Path) -> None:
    done = smolvmm("run", str(tmp_path / "gone.smolmachine"))
    assert done.returncode == 3 and done.stderr.count("\n") == 1 and "No such file" in done.stderr, done.stderr


@pytest.mark.parametrize("command", [["inspect"], ["inspect", "--json"], ["verify"], ["verify", "--json"]])
def test_a_reader_that_closes_stdout_early_gets_no_error(command: list[str]) -> None:
    """`smolvmm inspect X | head -1`: the pipe is closed before smolvmm writes, so the write always fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    process = subprocess.Popen(
        [sys.executable, "-m", "smolvmm", *command, str(VALID)], stdout=write_end, stderr=subprocess.PIPE, text=True
    )
    os.close(write_end)
    _, err = process.communicate(timeout=60)
    assert err == "" and process.returncode == 141  # as a tool killed by SIGPIPE ends: 128 + 13


def test_head_sees_the_first_line_only() -> None:
    done = subprocess.run(
        f"{sys.executable} -m smolvmm inspect {VALID} | head -1", shell=True, capture_output=True, text=True, timeout=60
    )
    assert done.stderr == "" and done.stdout.startswith(f"{VALID}: smolmachine") and done.stdout.count("\n") == 1


def test_verify_json_on_a_bad_bundle() -> None:
    done = smolvmm("verify", "--json", str(BAD))
    assert done.returncode == 3  # bad bundle: not 2, which is a usage error
    report = json.loads(done.stdout)
    assert report == {"path": str(BAD), "ok": False, "code": "bad-digest", "error": report["error"]}
    assert "memory_data" in report["error"] and done.stderr.startswith("smolvmm: error: ")


def test_verify_json_on_a_good_bundle() -> None:
    done = smolvmm("verify", "--json", str(VALID))
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"] is True and len(report["digest"]) == 64 and report["sections"] > 5
    assert done.stderr == ""


@pytest.mark.parametrize(("typed", "meant"), [("inpsect", "inspect"), ("verfy", "verify"), ("biuld", "build")])
def test_a_command_typo_is_answered_with_the_command(typed: str, meant: str, tmp_path: Path) -> None:
    done = smolvmm(typed, str(VALID), cwd=tmp_path)
    assert done.returncode == 2 and f"did you mean {meant!r}" in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("word", "status"),
    [
        ("inpsect", 3),
        ("app.smolmachine", 3),
        ("./verfy", 3),
        ("127.0.0.1:9/repo:tag", 1),  # a registry reference: pulled, and nothing listens on port 9
    ],
)
def test_what_may_name_a_bundle_still_means_run(word: str, status: int, tmp_path: Path) -> None:
    (tmp_path / "inpsect").write_bytes(b"not a bundle")  # an existing file is a bundle to run, typo or not
    done = smolvmm(word, cwd=tmp_path)
    assert "did you mean" not in done.stderr
    assert done.returncode == status and done.stderr.count("\n") == 1, done.stderr


def test_pack_errors_name_the_users_paths(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    into_dir = smolvmm("pack", "--raw", str(VALID), str(tmp_path / "adir"))
    assert into_dir.returncode == 2 and f"{tmp_path / 'adir'} is a directory" in into_dir.stderr
    target = tmp_path / "missing" / "out.smolmachine"
    nowhere = smolvmm("pack", "--raw", str(VALID), str(target))
    assert nowhere.returncode == 1 and nowhere.stderr.startswith(f"smolvmm: error: {target}: "), nowhere.stderr
    assert ".repack" not in nowhere.stderr and ".tmp" not in nowhere.stderr
    truncated = VECTORS / "truncated-header.smolmachine"
    bad = smolvmm("pack", "--raw", str(truncated), str(tmp_path / "out.smolmachine"))
    assert bad.returncode == 3 and bad.stderr.startswith(f"smolvmm: error: {truncated}: "), bad.stderr


def _on_a_terminal(args: list[str], env: dict[str, str]) -> bytes:
    """What ``smolvmm ARGS`` writes to a terminal (stdout and stderr both on a pseudo-terminal)."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "smolvmm", *args], stdout=terminal, stderr=terminal, env=env)
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    process.wait(60)
    return seen


def test_colour_only_on_a_terminal_and_never_with_no_color() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"TERM": "xterm"}
    assert b"\x1b[31merror" in _on_a_terminal(["verify", str(BAD)], env)
    assert b"\x1b[" not in _on_a_terminal(["verify", str(BAD)], env | {"NO_COLOR": "1"})
    assert "\x1b[" not in smolvmm("verify", str(BAD), env=env).stderr


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_commands_output_may_go_to_a_regular_file(backend: str, tmp_path: Path) -> None:
    """``run BUNDLE -- CMD > out.txt``: epoll refuses regular files, which never block anyway."""
    target = tmp_path / "out.txt"
    with open(target, "wb") as out:
        anyio.run(cli_output.write_all, out.fileno(), b"x" * 100_000, backend=backend)
    assert target.read_bytes() == b"x" * 100_000
