"""tools/nested-kvm from the host: exit status, separate live streams, --out write-back, nested KVM,
the watchdog that finds a frozen nested machine, and the test plugin's retry after one.

Each call boots the nested machine (seconds under TCG), so the checks share few boots.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import anyio
import pytest
from guests import bounded, shell, shell_answers
from nested_plugin import (
    BROKEN_RING,
    MACHINES_ENV,
    MAX_RUNS,
    MIN_RUN,
    NESTED_BUDGET,
    NESTED_TIMEOUT,
    RESULTS_ENV,
    NestedRun,
    claim,
    combine,
    machines_wanted,
    merged,
    next_tests,
)

from smolvmm import ExecResult, GuestTimeout, OutputLimitError
from smolvmm.host.kvmprobe import probe
from smolvmm.nested.harness import (
    APPEND_ENV,
    NESTED_FROZE,
    QEMU_ARGS_ENV,
    Job,
    JobStream,
    MachineSettings,
    forwarded_env,
    job_script,
    machine_settings,
    qemu_command,
)
from smolvmm.nested.image import END_OF_STREAM
from smolvmm.nested.watchdog import PAUSE_LINE, POKE_AFTER, WATCHDOG_ENV, Heartbeat, pauses, watchdog_bound

TOOL = Path(__file__).resolve().parent.parent / "tools" / "nested-kvm"
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None and not os.environ.get("CI"),
    reason="needs qemu-system-x86_64 (apt-get install qemu-system-x86)",
)


def nested(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TOOL), *args], capture_output=True, text=True, timeout=600)


@needs_qemu
def test_command_runs_with_kvm_streams_and_write_back(tmp_path: Path) -> None:
    smoke = Path(__file__).resolve().parent / "kvm_smoke_guest.py"
    script = (
        f"echo to-stdout; echo to-stderr >&2; ls -l /dev/kvm; grep -m1 -o -E 'svm|vmx' /proc/cpuinfo;"
        f" python -c 'import smolvmm, os; print(os.environ[\"SMOLVMM_NESTED\"])';"
        f" pwd; python {smoke}; test -c /dev/net/tun && echo tun;"
        f" ip netns add probe && ip netns exec probe ip -o link show lo | grep -c lo;"
        f" touch /tmp/scratch && echo scratch;"
        f" awk '/nohz_mode/ {{print \"nohz_mode\", $3; exit}}' /proc/timer_list;"
        f" echo written-inside > {tmp_path}/back; exit 7"
    )
    result = nested("--out", str(tmp_path), "sh", "-c", script)
    assert result.returncode == 7, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "to-stdout"
    assert lines[1].startswith("crw") and lines[1].endswith("/dev/kvm")
    assert lines[2:9] == ["svm", "1", os.getcwd(), "guest wrote 'ok' to port 0x3f8", "tun", "1", "scratch"]
    assert lines[9:] == ["nohz_mode 0"]  # the inner kernel's tick never stops: see qemu_command
    assert result.stderr == "to-stderr\n"
    assert (tmp_path / "back").read_text() == "written-inside\n"


@needs_qemu
def test_failing_command_status_comes_back_after_all_of_its_output() -> None:
    # The output ends the moment the job does: the machine powers off only once the host has it all.
    script = "import sys; sys.stdout.write('x' * (1 << 20) + 'end'); sys.stderr.write('y' * 99999); sys.exit(3)"
    result = nested("python", "-c", script)
    assert result.returncode == 3
    assert (len(result.stdout), result.stdout[-4:], result.stderr) == ((1 << 20) + 3, "xend", "y" * 99999)


@pytest.mark.parametrize("cuts", [[], [1], [5, 6, 7], list(range(1, 40))])
def test_a_port_stream_ends_at_its_mark_however_the_bytes_arrive(cuts: list[int]) -> None:
    wire = b"job\x1eoutput" + END_OF_STREAM + b"never the job's"
    stream, seen, previous = JobStream(), b"", 0
    for cut in [*cuts, len(wire)]:
        seen += stream.feed(wire[previous:cut])
        previous = cut
    assert (seen, stream.ended, stream.held) == (b"job\x1eoutput", True, b"")
    unended = JobStream()
    assert unended.feed(b"cut short" + END_OF_STREAM[:5]) == b"cut short" and unended.held == END_OF_STREAM[:5]


def qemu_pids(marker: str | None = None) -> set[int]:
    """Processes running the nested machine's QEMU whose command line holds ``marker``; without
    one, every nested machine's but those of a plugin's nested run (the suite's own runs beside
    these tests; their QEMU's environment names the run's results file)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
            if not cmdline.startswith(b"qemu-system-") or (marker or "smolvmm-nested-").encode() not in cmdline:
                continue
            if marker or f"{RESULTS_ENV}=".encode() not in (entry / "environ").read_bytes():
                pids.add(int(entry.name))
        except OSError:
            pass
    return pids


@needs_qemu
def test_no_qemu_outlives_a_timeout_or_a_killed_harness() -> None:
    before = qemu_pids()
    result = nested("--timeout", "8", "sleep", "600")
    assert result.returncode == 125 and "timed out after 8 s" in result.stderr
    assert qemu_pids() - before == set()

    harness = subprocess.Popen([str(TOOL), "sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not qemu_pids() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pids() - before, "the nested machine never started"
    harness.kill()
    harness.wait()
    deadline = time.monotonic() + 10
    while qemu_pids() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pids() - before == set()


def test_job_script_quotes_and_forwards_a_sane_environment(tmp_path: Path) -> None:
    env = {"PATH": "/bin", "PYTHONPATH": "/x", "SMOLVMM_X": "1", "SECRET_TOKEN": "no", "LC_ALL": "C"}
    assert forwarded_env(env) == {
        "PATH": "/bin",
        "PYTHONPATH": "/x",
        "SMOLVMM_X": "1",
        "LC_ALL": "C",
        "SMOLVMM_NESTED": "1",
        "SMOLVMM_NESTED_ACTIVITY": "/run/smolvmm/activity",
    }
    script = job_script(Job(["printf", "%s\n", "a b", "it's"], cwd=tmp_path, env=env))
    result = subprocess.run(["sh", "-c", script.replace("exec ", "env; exec ")], capture_output=True, text=True)
    assert result.stdout.endswith("a b\nit's\n")
    assert "SMOLVMM_NESTED=1" in result.stdout and "SECRET_TOKEN" not in result.stdout


KVM_TEST = "import pytest\n\n@pytest.mark.kvm\ndef test_needs_kvm():\n    pass\n\ndef test_plain():\n    pass\n"


def run_plugin(tmp_path: Path, host: str | None, tests: str = KVM_TEST, **env: str) -> subprocess.CompletedProcess[str]:
    """pytest on ``tests`` (one kvm test and one plain test), on a host that ``probe`` calls ``host``
    (None: this one)."""
    fake = f"nested_plugin.probe = lambda: HostKvm({host!r}, 'the host says {host}')\n" if host else ""
    (tmp_path / "conftest.py").write_text(
        "import nested_plugin\nfrom nested_plugin import NestedKvm\nfrom smolvmm.host.kvmprobe import HostKvm\n"
        f"{fake}\n"
        "def pytest_configure(config):\n"
        "    config.addinivalue_line('markers', 'kvm: needs KVM')\n"
        "    config.pluginmanager.register(NestedKvm(config))\n"
    )
    (tmp_path / "test_inner.py").write_text(tests)
    environment = {key: value for key, value in os.environ.items() if key not in ("CI", "SMOLVMM_NESTED")}
    environment.update(PYTHONPATH=str(Path(__file__).resolve().parent), **env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfs", str(tmp_path)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
    )


def test_kvm_tests_fail_loudly_inside_a_machine_without_hardware_kvm(tmp_path: Path) -> None:
    result = run_plugin(tmp_path, None, SMOLVMM_NESTED="1")
    if probe().kind == "hardware":
        assert result.returncode == 0, result.stdout
    else:
        assert result.returncode == 1 and "1 failed, 1 passed" in result.stdout, result.stdout
        assert "kvm tests cannot run" in result.stdout


def test_without_kvm_kvm_tests_skip_with_the_reason(tmp_path: Path) -> None:
    result = run_plugin(tmp_path, "none")
    assert result.returncode == 0 and "1 passed, 1 skipped" in result.stdout, result.stdout
    assert "the host says none" in result.stdout


def test_without_kvm_in_ci_kvm_tests_fail(tmp_path: Path) -> None:
    result = run_plugin(tmp_path, "none", CI="true")
    assert result.returncode == 1 and "1 failed, 1 passed" in result.stdout, result.stdout
    assert "kvm tests cannot run: the host says none" in result.stdout


def test_on_hardware_kvm_kvm_tests_run_directly(tmp_path: Path) -> None:
    result = run_plugin(tmp_path, "hardware", CI="true")
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout
    assert "nested" not in result.stdout


ANY_KVM_TEST = KVM_TEST.replace("@pytest.mark.kvm", "@pytest.mark.kvm(linux_guest=False)")


@pytest.mark.parametrize("host", ["pvm", "hardware"])
def test_a_test_needing_only_kvm_runs_on_the_hosts_own_kvm_of_any_kind(tmp_path: Path, host: str) -> None:
    result = run_plugin(tmp_path, host, ANY_KVM_TEST, CI="true")
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout
    assert "nested" not in result.stdout


def test_a_test_needing_only_kvm_skips_without_kvm_and_fails_in_ci(tmp_path: Path) -> None:
    result = run_plugin(tmp_path, "none", ANY_KVM_TEST)
    assert result.returncode == 0 and "1 passed, 1 skipped" in result.stdout, result.stdout
    assert "the host says none" in result.stdout
    result = run_plugin(tmp_path, "none", ANY_KVM_TEST, CI="true")
    assert result.returncode == 1 and "1 passed, 1 error" in result.stdout, result.stdout
    assert "kvm tests cannot run: the host says none" in result.stdout


def stop_qemu(marker: str) -> int:
    """SIGSTOP the one nested QEMU whose command line holds ``marker``: the machine freezes, as QEMU 7.2's can."""
    (pid,) = qemu_pids(marker)
    os.kill(pid, signal.SIGSTOP)
    return pid


@needs_qemu
def test_a_frozen_machine_is_found_killed_and_reported_with_its_activity(tmp_path: Path) -> None:
    env = {**os.environ, WATCHDOG_ENV: "10", "TMPDIR": str(tmp_path)}  # TMPDIR: this test's QEMU holds tmp_path
    script = 'echo step-42 > "$SMOLVMM_NESTED_ACTIVITY"; sleep 3; echo started; sleep 600'
    harness = subprocess.Popen(
        [str(TOOL), "--evidence", str(tmp_path / "evidence.log"), "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert harness.stdout is not None and harness.stdout.readline() == "started\n"
        qemu = stop_qemu(str(tmp_path))
        _, stderr = harness.communicate(timeout=10 + 60)
    finally:
        harness.kill()
    assert harness.returncode == NESTED_FROZE, stderr
    line = stderr.splitlines()[0]
    silent = re.fullmatch(
        r"nested-kvm: the nested machine froze, not the command: no heartbeat for (\d+) s "
        r"\(SMOLVMM_NESTED_WATCHDOG=10\); QEMU stopped \(state T; .*\); it was running: step-42",
        line,
    )
    assert silent and 10 <= int(silent[1]) < 30, line
    assert re.search(rf"^{qemu} qemu-system-x86 state=T ", stderr, re.MULTILINE), stderr
    assert f"--- all the evidence: {tmp_path / 'evidence.log'} ---" in stderr
    evidence = (tmp_path / "evidence.log").read_text()
    assert "State:\tT (stopped)" in evidence and "the job's last activity: step-42" in evidence
    # a stopped QEMU was poked after 5 s of silence (and every 5 s after, with a register dump), and no beat followed
    assert re.search(
        r"^pokes of the silent machine: .* 1 time\(s\); .* with 'info registers' 1 time\(s\), a beat following 0,"
        r" with 'a byte on the heartbeat port' \d+ time\(s\), a beat following 0$",
        evidence,
        re.M,
    )
    assert (
        "--- QEMU monitor: info registers, now ---" in evidence
        and "--- nested console (last 200 lines) ---" in evidence
    )
    assert qemu_pids(str(tmp_path)) == set()


def test_the_watchdog_bound_comes_from_the_environment() -> None:
    assert watchdog_bound({}) == 60
    assert watchdog_bound({WATCHDOG_ENV: "12.5"}) == 12.5
    for bad in ("0", "-3", "soon", "inf", "nan"):
        with pytest.raises(ValueError, match="SMOLVMM_NESTED_WATCHDOG must be a number of seconds > 0"):
            watchdog_bound({WATCHDOG_ENV: bad})
    result = subprocess.run([str(TOOL), "true"], capture_output=True, text=True, env={**os.environ, WATCHDOG_ENV: "x"})
    assert (
        result.returncode == 2 and "SMOLVMM_NESTED_WATCHDOG must be a number of seconds > 0, not 'x'" in result.stderr
    )


def test_extra_kernel_arguments_and_qemu_options_come_from_the_environment(tmp_path: Path) -> None:
    assert machine_settings({}) == MachineSettings()
    settings = machine_settings({APPEND_ENV: " idle=poll  nohz=off ", QEMU_ARGS_ENV: "-icount 'shift=auto,sleep=on'"})
    assert settings == MachineSettings("idle=poll  nohz=off", ("-icount", "shift=auto,sleep=on"))
    argv = qemu_command(tmp_path / "k", tmp_path / "i", tmp_path, [], settings)
    cmdline = argv[argv.index("-append") + 1]
    assert " idle=poll  nohz=off smolvmm.job=" in cmdline and "softlockup_panic=1" in cmdline
    assert argv[-2:] == ["-icount", "shift=auto,sleep=on"] and argv[argv.index("-accel") + 1] == "tcg"
    # an -accel of one's own replaces the harness's (QEMU would treat a second one as an unused fallback)
    argv = qemu_command(
        tmp_path / "k", tmp_path / "i", tmp_path, [], machine_settings({QEMU_ARGS_ENV: "-accel tcg,thread=single"})
    )
    assert [arg for arg in argv if arg.startswith("tcg")] == ["tcg,thread=single"]
    assert qemu_command(tmp_path / "k", tmp_path / "i", tmp_path, []) == qemu_command(
        tmp_path / "k", tmp_path / "i", tmp_path, [], machine_settings({})
    )
    with pytest.raises(ValueError, match="SMOLVMM_NESTED_QEMU_ARGS cannot be split into arguments"):
        machine_settings({QEMU_ARGS_ENV: "-name 'unbalanced"})
    with pytest.raises(ValueError, match="SMOLVMM_NESTED_APPEND holds a control character"):
        machine_settings({APPEND_ENV: "quiet\ninit=/bin/sh"})
    result = subprocess.run([str(TOOL), "true"], capture_output=True, text=True, env={**os.environ, QEMU_ARGS_ENV: "'"})
    assert result.returncode == 2 and "SMOLVMM_NESTED_QEMU_ARGS cannot be split" in result.stderr
    assert "Traceback" not in result.stderr


def test_heartbeats_are_counted_by_line_with_the_last_activity() -> None:
    heartbeat = Heartbeat(60, os.getpid())
    heartbeat.feed(b"beat \nbeat tests/a.py::")
    assert (heartbeat.beats, heartbeat.activity) == (1, "")
    heartbeat.feed(b"test_x\nnoise\nbeat tests/a.py::test_y\n")
    assert (heartbeat.beats, heartbeat.activity) == (3, "tests/a.py::test_y")
    heartbeat.feed(b"x" * 100_000)
    heartbeat.feed(b"\nbeat " + b"y" * 10_000 + b"\n")
    assert heartbeat.beats == 4 and heartbeat.activity == "y" * 4091 and not heartbeat.frozen()


def test_a_silent_machine_is_poked_and_a_beat_after_the_poke_counts_as_woken(tmp_path: Path) -> None:
    heartbeat = Heartbeat(60, os.getpid())
    ours, machines = socket.socketpair()
    assert not heartbeat.needs_poke()  # before the first beat: the boot, not a silence
    heartbeat.feed(b"beat a\n")
    heartbeat.last -= POKE_AFTER  # a silence as long as the poke threshold
    assert heartbeat.needs_poke()
    heartbeat.poke(tmp_path / "no-monitor", ours)  # no QEMU listening: the poke must not fail
    # the first poke records the machine as it is while frozen (kept for the evidence until the next beat)
    assert heartbeat.silent_registers.startswith("5 s without a heartbeat:\n(the monitor did not answer")
    assert not heartbeat.needs_poke() and heartbeat.poke_summary() == (
        "the heartbeat paused 5 s or more 1 time(s); the machine was poked with 'info registers' 1 time(s),"
        " a beat following 0, with 'a byte on the heartbeat port' 0 time(s), a beat following 0"
    )
    heartbeat._poked_at -= POKE_AFTER  # still silent: the next poke sends a byte into the machine
    assert heartbeat.needs_poke()
    heartbeat.poke(tmp_path / "no-monitor", ours)
    assert machines.recv(16) == b"\n"
    heartbeat.feed(b"beat a\n")
    assert heartbeat.silent_registers == ""
    assert heartbeat.pokes == {"info registers": 1, "a byte on the heartbeat port": 1}
    assert heartbeat.woken == {"info registers": 0, "a byte on the heartbeat port": 1}
    heartbeat.feed(b"beat a\n")
    assert heartbeat.woken["a byte on the heartbeat port"] == 1  # only the first beat after a poke
    heartbeat.last -= POKE_AFTER  # a new silence starts with the registers again
    machines.close()
    heartbeat.poke(tmp_path / "no-monitor", ours)
    heartbeat._poked_at -= POKE_AFTER
    heartbeat.poke(tmp_path / "no-monitor", ours)  # the machine's end has gone: no error either
    heartbeat.feed(b"beat a\n")
    assert heartbeat.woken == {"info registers": 0, "a byte on the heartbeat port": 2}
    ours.close()
    # each silence a beat ended is reported with what the job was doing, for the plugin to read back
    assert [(activity, round(seconds)) for activity, seconds in heartbeat.paused] == [("a", 5), ("a", 5)]
    lines = heartbeat.pause_lines()
    assert lines[0] == "nested-kvm: the heartbeat paused 5 s while the job ran: a"
    printed = ["tests/x.py ..F" + lines[0], "noise", lines[1], PAUSE_LINE.format(seconds=7, activity="t::b")]
    assert pauses(printed) == {"a": 10.0, "t::b": 7.0}


def ran(
    number: int,
    nodeids: list[str],
    status: int,
    results: dict[str, str],
    running: str | None = None,
    paused: dict[str, float] | None = None,
) -> NestedRun:
    outcomes = {n: {"outcome": o, "text": f"{n} {o}"} for n, o in results.items()}
    run = NestedRun(number, nodeids, status, outcomes, {running} if running else set())
    run.paused = paused or {}
    if run.unfinished:
        run.failure = f"the machine of run {number} froze\nconsole..."
        run.evidence = Path(f"/out/run-{number}-evidence.log")
    return run


def test_a_retry_reports_the_frozen_test_and_reruns_the_rest() -> None:
    tests = ["t::a", "t::b", "t::c"]
    first = ran(1, tests, NESTED_FROZE, {"t::a": "passed"}, running="t::b")
    assert first.unfinished == ["t::b", "t::c"]
    assert next_tests([first]) == ["t::b", "t::c"]
    results, lines = combine([first, ran(2, ["t::b", "t::c"], 0, {"t::b": "passed", "t::c": "failed"})])
    assert [results[n]["outcome"] for n in tests] == ["passed", "passed", "failed"]
    assert lines == [
        "nested run 1: the machine of run 1 froze (evidence: /out/run-1-evidence.log)",
        "  2 kvm tests without an outcome ran again in a fresh nested machine (run 2):",
        "  t::b (running when the machine stopped): passed on the retry",
        "  t::c: failed on the retry",
    ]
    results, lines = combine([first, ran(2, ["t::b", "t::c"], 1, {"t::b": "failed", "t::c": "passed"})])
    assert lines[2] == "  t::b (running when the machine stopped): failed twice"
    assert results["t::b"]["outcome"] == "failed" and results["t::b"]["text"].startswith(
        "this test was running when nested run 1 ended: the machine of run 1 froze\nconsole..."
    )
    assert results["t::b"]["text"].endswith("and on the retry in a fresh machine:\nt::b failed")


def test_a_test_that_stops_the_machine_twice_fails() -> None:
    first = ran(1, ["t::a", "t::b"], NESTED_FROZE, {}, running="t::a")
    second = ran(2, ["t::a", "t::b"], NESTED_FROZE, {}, running="t::a")
    assert next_tests([first, second]) == ["t::b"]  # t::a stopped two machines: it is not run a third time
    results, lines = combine([first, second])
    assert results["t::a"]["outcome"] == results["t::b"]["outcome"] == "failed"
    assert (
        lines[2] == "  t::a (running when the machine stopped): failed twice (the nested machine stopped while it ran, "
        "again: the machine of run 2 froze)"
    )
    assert lines[3:] == [
        "  t::b: no outcome on the retry either",
        "nested run 2: the machine of run 2 froze (evidence: /out/run-2-evidence.log); not retried again",
    ]
    third = ran(3, ["t::b"], 0, {"t::b": "passed"})
    results, lines = combine([first, second, third])
    assert results["t::a"]["outcome"] == "failed" and results["t::b"]["outcome"] == "passed"
    assert lines[4:] == [
        "nested run 2: the machine of run 2 froze (evidence: /out/run-2-evidence.log)",
        "  1 kvm tests without an outcome ran again in a fresh nested machine (run 3):",
        "  t::b: passed on the retry",
    ]
    assert combine([first]) == ({n: {"outcome": "failed", "text": first.failure} for n in ("t::a", "t::b")}, [])


def test_a_test_that_failed_after_the_machine_stalled_runs_again_in_a_fresh_one() -> None:
    tests = ["t::a", "t::b", "t::c", "t::d"]
    outcomes = {"t::a": "passed", "t::b": "failed", "t::c": "failed", "t::d": "passed"}
    # the machine stalled (and was woken) during t::b, t::d and between tests; only t::b failed after it
    first = ran(1, tests, 1, outcomes, paused={"t::b": 12.0, "t::d": 6.0})
    assert next_tests([first]) == ["t::b"]  # t::c failed in a machine that ran on: its failure stands
    assert next_tests([first], budget_left=MIN_RUN - 1) == []
    results, lines = combine([first, ran(2, ["t::b"], 0, {"t::b": "passed"})])
    assert [results[n]["outcome"] for n in tests] == ["passed", "passed", "failed", "passed"]
    assert lines == [
        "nested run 1: the nested machine stalled, and was woken, while tests ran",
        "  1 kvm tests that the machine made fail ran again in a fresh nested machine (run 2):",
        "  t::b (failed after the machine stalled 12 s while it ran): passed on the retry",
    ]
    second = ran(2, ["t::b"], 1, {"t::b": "failed"}, paused={"t::b": 8.0})
    assert next_tests([first, second]) == []  # interrupted in two machines: it fails
    results, lines = combine([first, second])
    assert lines[-1] == "  t::b (failed after the machine stalled 12 s while it ran): failed twice"
    assert results["t::b"]["text"] == (
        "in nested run 1, this test failed after the machine stalled 12 s while it ran:\nt::b failed\n\n"
        "and on the retry in a fresh machine:\n"
        "t::b failed\n(the nested machine stalled 8 s while this test ran, and was woken)"
    )
    # with no retry left, the failure still says the machine stalled
    assert combine([first])[0]["t::b"]["text"].endswith(
        "(the nested machine stalled 12 s while this test ran, and was woken)"
    )
    # a machine that froze later in the same run: both kinds run again, in the run's order
    frozen = ran(1, tests, NESTED_FROZE, {n: outcomes[n] for n in tests[:3]}, running="t::d", paused={"t::b": 12.0})
    assert next_tests([frozen]) == ["t::b", "t::d"]
    results, lines = combine([frozen, ran(2, ["t::b", "t::d"], 0, {"t::b": "passed", "t::d": "passed"})])
    assert lines[1:] == [
        "  2 kvm tests, without an outcome or made to fail by the machine, ran again in a fresh nested machine (run 2):",
        "  t::b (failed after the machine stalled 12 s while it ran): passed on the retry",
        "  t::d (running when the machine stopped): passed on the retry",
    ]


def test_a_test_whose_guest_read_its_ring_wrong_runs_again_in_a_fresh_machine() -> None:
    broken = "no end after 360 s, at: 1 MiB of output; the guest kernels said: ['[   11.665893] virtio_console virtio0: output:id 0 is not a head!']"
    first = ran(1, ["t::a", "t::b", "t::c"], 1, {"t::a": "failed", "t::b": "failed", "t::c": "passed"})
    first.results["t::b"]["text"] = broken
    assert next_tests([first]) == ["t::b"]  # t::a's failure is its own
    assert BROKEN_RING.search("[ 9.1] virtio_net virtio2: output.0:id 5 is not a head!")  # any device's queue
    results, lines = combine([first, ran(2, ["t::b"], 0, {"t::b": "passed"})])
    assert [results[n]["outcome"] for n in ("t::a", "t::b", "t::c")] == ["failed", "passed", "passed"]
    assert lines == [
        "nested run 1: a guest read a virtio ring wrong while tests ran",
        "  1 kvm tests that the machine made fail ran again in a fresh nested machine (run 2):",
        "  t::b (failed as its guest read a virtio ring wrong): passed on the retry",
    ]
    second = ran(2, ["t::b"], 1, {"t::b": "failed"})
    second.results["t::b"]["text"] = broken.replace("output:id 0 is not a head!", "input:id 300 out of range")
    assert next_tests([first, second]) == ["t::b"]  # a ring broken twice: a third machine
    results, lines = combine([first, second])
    assert lines[-1] == "  t::b (failed as its guest read a virtio ring wrong): failed twice"
    assert results["t::b"]["text"].startswith(
        f"in nested run 1, this test failed as its guest read a virtio ring wrong:\n{broken}"
    )
    third = ran(3, ["t::b"], 0, {"t::b": "passed"})
    results, lines = combine([first, second, third])
    assert results["t::b"]["outcome"] == "passed"
    assert lines[2:] == [
        "  t::b (failed as its guest read a virtio ring wrong): failed again, and ran a third time",
        "nested run 2: a guest read a virtio ring wrong while tests ran",
        "  1 kvm tests that the machine made fail ran again in a fresh nested machine (run 3):",
        "  t::b (failed as its guest read a virtio ring wrong): passed on the retry",
    ]
    third = ran(3, ["t::b"], 1, {"t::b": "failed"})
    third.results["t::b"]["text"] = broken
    assert next_tests([first, second, third]) == []  # three times: it fails, saying so
    results, lines = combine([first, second, third])
    assert results["t::b"]["outcome"] == "failed"
    assert lines[-1] == "  t::b (failed as its guest read a virtio ring wrong): failed three times"
    # a ring broken after a stall in the machine before: two interruptions of two kinds are the limit
    stalled = ran(2, ["t::b"], 1, {"t::b": "failed"}, paused={"t::b": 8.0})
    assert next_tests([first, stalled]) == []
    # a stall and a ring in one run: both said
    both = ran(1, ["t::a", "t::b"], 1, {"t::a": "failed", "t::b": "failed"}, paused={"t::a": 9.0})
    both.results["t::b"]["text"] = broken
    lines = combine([both, ran(2, ["t::a", "t::b"], 0, {"t::a": "passed", "t::b": "passed"})])[1]
    assert (
        lines[0]
        == "nested run 1: the nested machine stalled, and was woken, and a guest read a virtio ring wrong while tests ran"
    )


class ShellConsole:
    """A guest console whose shell answers every command with ``said`` (for ``bounded``)."""

    def __init__(self, said: str) -> None:
        self.said, self.sent, self.printed = said, b"", b""

    async def send(self, data: bytes) -> None:
        self.sent += data

    def recent(self) -> bytes:
        return self.printed

    async def wait_for(self, pattern: object, timeout: float) -> bytes:
        token = b"".join(re.findall(rb"BEGIN-(\w+)''(\w+)", self.sent)[-1])
        return b"BEGIN-%s\r\n%s\r\nEND-%s\r\n" % (token, self.said.encode(), token)


@pytest.mark.anyio
async def test_a_bounded_test_names_its_step_and_what_the_guest_kernel_said(anyio_backend: str) -> None:
    said = "[   11.665893] virtio_console virtio0: output:id 0 is not a head!"
    machine = type("Machine", (), {"console": ShellConsole(said)})()
    with pytest.raises(pytest.fail.Exception) as failed:
        async with bounded(machine, seconds=0.05) as step:  # type: ignore[arg-type]
            step.now = "1 MiB of output"
            await anyio.sleep(10)
    assert str(failed.value).startswith("no end after 0.05 s, at: 1 MiB of output; the guest kernels said: [")
    assert BROKEN_RING.search(str(failed.value))  # so the plugin runs it again in a fresh machine
    assert b"dmesg" in machine.console.sent
    with pytest.raises(pytest.fail.Exception) as failed:
        async with bounded(machine, seconds=60) as step:  # type: ignore[arg-type]
            step.now = "GET / through a forward"
            with anyio.fail_after(0.05):  # the test's own, shorter wait
                await anyio.sleep(10)
    assert str(failed.value).startswith("a wait of its own ran out, at: GET / through a forward; the guest kernels")
    assert BROKEN_RING.search(str(failed.value))
    async with bounded(seconds=5) as step:  # within its bound, nothing happens
        await anyio.sleep(0)


@pytest.mark.anyio
async def test_a_ring_the_guest_says_is_broken_ends_a_bounded_test_at_once(anyio_backend: str) -> None:
    said = "[   25.557469] virtio_console virtio0: output:id 0 is not a head!"
    console = ShellConsole(said)
    printed = [
        b"",
        b"[   25.1] smolvmm: guest ready\r\n",
        b"[   25.1] smolvmm: guest ready\r\n" + said.encode() + b"\r\n",
    ]
    console.recent = lambda: printed.pop(0) if len(printed) > 1 else printed[0]  # type: ignore[method-assign]
    machine = type("Machine", (), {"console": console})()
    with pytest.raises(pytest.fail.Exception) as failed, anyio.fail_after(30):
        async with bounded(machine, seconds=600) as step:  # type: ignore[arg-type]
            step.now = "1 MiB of output"
            await anyio.sleep(600)
    assert str(failed.value) == (
        f"a guest found a virtio ring broken, at: 1 MiB of output; the guest kernels said: [{said[15:]!r}]"
    )
    assert BROKEN_RING.search(str(failed.value))  # so the plugin runs it again in a fresh machine
    printed[:] = [said.encode()]
    with pytest.raises(pytest.fail.Exception) as failed, anyio.fail_after(30):
        async with bounded(machine, seconds=600) as step:  # type: ignore[arg-type]
            step.now = "the output limit"
            try:  # a call the watcher's cancel tore down half-way ends in an error of its own
                await anyio.sleep(600)
            except anyio.get_cancelled_exc_class():
                raise OutputLimitError("the command wrote more than 65536 bytes to stdout") from None
    assert str(failed.value).startswith("a guest found a virtio ring broken, at: the output limit;")
    healthy = type("Machine", (), {"console": ShellConsole(said)})()
    with pytest.raises(AssertionError, match="the test's own"):  # not wrapped in an exception group
        async with bounded(healthy, seconds=5):  # type: ignore[arg-type]
            raise AssertionError("the test's own failure")


class SilentConsole:
    """A guest console whose shell never answers (its output queue broken)."""

    async def send(self, data: bytes) -> None:
        pass

    async def wait_for(self, pattern: object, timeout: float) -> bytes:
        raise GuestTimeout("no answer")


@pytest.mark.anyio
async def test_a_shell_that_stops_answering_fails_with_what_the_kernel_told_the_agent(anyio_backend: str) -> None:
    said = "[    9.120001] virtio_console virtio0: output:id 0 is not a head!"
    commands: list[str] = []

    async def exec(command: str, timeout: float) -> ExecResult:
        commands.append(command)
        return ExecResult(0, said.encode() + b"\n", b"")

    machine = type("Machine", (), {"console": SilentConsole(), "exec": staticmethod(exec)})()
    with pytest.raises(GuestTimeout) as failed:
        await shell_answers(machine, tries=2, each=0.01)  # type: ignore[arg-type]
    assert str(failed.value) == f"the guest's shell did not answer within 0.02 s; its kernel said: {said}"
    assert BROKEN_RING.search(str(failed.value))  # so the plugin runs it again in a fresh machine
    assert commands == ["dmesg | grep virtio | tail -3"]
    # any shell command that never ends says the same (its console broke after the shell answered)
    with pytest.raises(GuestTimeout) as failed:
        await shell(machine, "cat /mnt/after", timeout=0.01)  # type: ignore[arg-type]
    assert str(failed.value) == f"no answer; the guest's kernel said: {said}"
    assert len(commands) == 2


def test_freezes_of_different_tests_each_get_a_fresh_machine_up_to_a_bound() -> None:
    tests = [f"t::{n}" for n in range(MAX_RUNS + 1)]
    runs = [ran(1, tests, NESTED_FROZE, {}, running=tests[0])]
    while retry := next_tests(runs):
        number = len(runs) + 1  # each machine passes the test that stopped the last one, then stops on the next
        runs.append(ran(number, retry, NESTED_FROZE, {retry[0]: "passed"}, running=retry[1]))
    assert len(runs) == MAX_RUNS
    results, lines = combine(runs)
    assert [results[t]["outcome"] for t in tests[: MAX_RUNS - 1]] == ["passed"] * (MAX_RUNS - 1)
    assert lines[-1].endswith("; not retried again") and results[tests[-1]]["outcome"] == "failed"


def test_no_fresh_machine_starts_without_time_left_for_it() -> None:
    first = ran(1, ["t::a", "t::b"], NESTED_FROZE, {"t::a": "passed"}, running="t::b")
    assert next_tests([first], budget_left=MIN_RUN) == ["t::b"]
    assert next_tests([first], budget_left=MIN_RUN - 1) == []
    assert NESTED_TIMEOUT + MIN_RUN <= NESTED_BUDGET  # a first machine that runs to its timeout leaves room for a retry


def test_machines_side_by_side_are_one_run_whose_frozen_machine_leaves_its_tests_to_a_retry() -> None:
    tests = ["t::a", "t::b", "t::c", "t::d", "t::e"]
    first = ran(1, tests, 0, {"t::a": "passed", "t::b": "failed", "t::e": "passed"})
    second = ran(2, tests, NESTED_FROZE, {}, running="t::c")  # it had taken t::d next
    run = merged([first, second])
    assert (run.number, run.status, run.unfinished) == (2, NESTED_FROZE, ["t::c", "t::d"])
    assert run.failure == second.failure and run.evidence == second.evidence
    assert next_tests([run]) == ["t::c", "t::d"]
    results, lines = combine([run, ran(3, ["t::c", "t::d"], 0, {"t::c": "passed", "t::d": "passed"})])
    assert {n: r["outcome"] for n, r in results.items()} == dict(
        zip(tests, ["passed", "failed", "passed", "passed", "passed"])
    )
    assert lines[0] == "nested run 2: the machine of run 2 froze (evidence: /out/run-2-evidence.log)"
    healthy = merged([first, ran(2, tests, 0, {"t::c": "passed", "t::d": "passed"})])
    assert (healthy.status, healthy.unfinished, healthy.failure) == (0, [], "")
    stalled = ran(2, tests, 1, {"t::c": "failed", "t::d": "passed"}, paused={"t::c": 12.0})
    assert merged([first, stalled]).number == 2  # the machine that made a test fail names the run
    both = merged([ran(1, tests, NESTED_FROZE, {}, running="t::a"), ran(2, tests, NESTED_FROZE, {}, running="t::c")])
    assert both.running == {"t::a", "t::c"} and both.failure.endswith(
        "\n(and nested run 2: the machine of run 2 froze)"
    )


def test_after_both_machines_froze_each_is_named_and_the_retry_runs_side_by_side_too() -> None:
    tests = ["t::a", "t::b", "t::c", "t::d", "t::e", "t::f"]
    # each machine stopped in its second test, having taken the next
    first = ran(1, tests, NESTED_FROZE, {"t::e": "passed"}, running="t::a")  # it took t::b next
    second = ran(2, tests, NESTED_FROZE, {"t::f": "passed"}, running="t::c")  # and this one t::d
    both = merged([first, second])
    assert next_tests([both]) == ["t::a", "t::b", "t::c", "t::d"]
    # the retry's two machines: run 3 passes t::a and t::b; run 4 passes t::d, and stops in t::c again
    again = tests[:4]
    retry = merged(
        [
            ran(3, again, 0, {"t::a": "passed", "t::b": "passed"}),
            ran(4, again, NESTED_FROZE, {"t::d": "passed"}, running="t::c"),
        ]
    )
    results, lines = combine([both, retry])
    assert lines == [
        "nested run 1: the machine of run 1 froze (evidence: /out/run-1-evidence.log)",
        "nested run 2: the machine of run 2 froze (evidence: /out/run-2-evidence.log)",
        "  4 kvm tests without an outcome ran again in 2 fresh nested machines side by side (runs 3 and 4):",
        "  t::a (running when the machine stopped): passed on the retry",
        "  t::b: passed on the retry",
        "  t::c (running when the machine stopped): failed twice (the nested machine stopped while it ran, "
        "again: the machine of run 4 froze)",
        "  t::d: passed on the retry",
        "nested run 4: the machine of run 4 froze (evidence: /out/run-4-evidence.log); not retried again",
    ]
    assert results["t::c"]["text"] == (
        "this test was running when nested run 2 ended: the machine of run 2 froze\nconsole...\n\n"
        "and on the retry in a fresh machine: the machine of run 4 froze\nconsole..."
    )
    assert [results[n]["outcome"] for n in tests] == ["passed", "passed", "failed", "passed", "passed", "passed"]


def test_a_test_is_taken_by_one_machine_only(tmp_path: Path) -> None:
    assert claim(tmp_path, "tests/t.py::test_x[trio]") and not claim(tmp_path, "tests/t.py::test_x[trio]")
    assert claim(tmp_path, "tests/t.py::test_x[asyncio]")


def test_the_number_of_machines_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MACHINES_ENV, raising=False)
    assert machines_wanted() == min(2, os.cpu_count() or 1)
    monkeypatch.setenv(MACHINES_ENV, "3")
    assert machines_wanted() == 3
    monkeypatch.setenv(MACHINES_ENV, "0")
    with pytest.raises(ValueError, match="SMOLVMM_NESTED_MACHINES='0' is not a number of machines"):
        machines_wanted()


FAKED_PVM_CONFTEST = (
    "import os\nimport nested_plugin\nfrom nested_plugin import NestedKvm\nfrom smolvmm.host.kvmprobe import HostKvm\n\n"
    "if os.environ.get('SMOLVMM_NESTED') != '1':\n"
    "    nested_plugin.probe = lambda: HostKvm('pvm', 'the host says pvm')\n\n"
    "def pytest_configure(config):\n"
    "    config.addinivalue_line('markers', 'kvm: needs KVM')\n"
    "    config.pluginmanager.register(NestedKvm(config))\n"
)
"""A conftest that makes the outer pytest see a PVM host (and the nested one its real KVM)."""


SIDE_BY_SIDE_TESTS = (
    "import os, time\nfrom pathlib import Path\nimport pytest\n\n"
    "@pytest.mark.kvm\ndef test_a():\n"
    "    claims = Path(os.environ['SMOLVMM_NESTED_CLAIMS'])\n"
    "    for _ in range(600):  # until the other machine has taken test_c and test_d\n"
    "        if len(list(claims.iterdir())) >= 4:\n"
    "            return\n"
    "        time.sleep(0.5)\n"
    "    raise AssertionError('the other machine took no test')\n\n"
    "@pytest.mark.kvm\ndef test_b():\n    pass\n\n"
    "@pytest.mark.kvm\ndef test_c():\n    time.sleep(10)  # the outer test stops this machine meanwhile\n\n"
    "@pytest.mark.kvm\ndef test_d():\n    pass\n\n"
    "@pytest.mark.kvm\ndef test_e():\n    pass\n"
)
"""Five kvm tests for two machines: the first takes test_a and test_b (the next one as a test starts),
and test_a waits for the second to take test_c and test_d; the first then runs test_b and test_e."""


@needs_qemu
def test_two_machines_share_the_tests_and_after_a_freeze_the_plugin_reruns_those_without_an_outcome(
    tmp_path: Path,
) -> None:
    """Two nested machines side by side on a (faked) PVM host; the one running test_c is stopped
    (SIGSTOP): the other runs on to the end, and test_c and the test its machine had taken next run
    again in a fresh machine (one: a machine takes two tests as it starts)."""
    (tmp_path / "conftest.py").write_text(FAKED_PVM_CONFTEST)
    (tmp_path / "test_inner.py").write_text(SIDE_BY_SIDE_TESTS)
    environment = {key: value for key, value in os.environ.items() if key not in ("CI", "SMOLVMM_NESTED")}
    environment.update(PYTHONPATH=str(Path(__file__).resolve().parent), **{WATCHDOG_ENV: "10", MACHINES_ENV: "2"})
    base = tmp_path / "base"
    outer = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfs", f"--basetemp={base}", "test_inner.py"],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    runs = [base / "nested-kvm0" / f"run-{number}" for number in (1, 2)]
    try:
        while not (frozen := [run for run in runs if running(run) == "test_inner.py::test_c"]):
            assert outer.poll() is None, outer.communicate()[0]
            time.sleep(0.2)
        time.sleep(4)  # a heartbeat (one a second) carries the test's name out before the machine stops
        stop_qemu(str(frozen[0]))
        output, _ = outer.communicate(timeout=600)
    finally:
        outer.kill()
    assert outer.returncode == 0 and "5 passed" in output, output
    (other,) = set(runs) - set(frozen)
    ran_there = json.loads((other / "results.json").read_text())["results"]
    assert sorted(ran_there) == ["test_inner.py::test_a", "test_inner.py::test_b", "test_inner.py::test_e"]
    number = frozen[0].name.removeprefix("run-")
    evidence = base / "nested-kvm0" / f"run-{number}-evidence.log"
    summary = output[output.index("kvm tests retried in a fresh nested machine") :]
    assert re.search(
        rf"\nnested run {number}: the nested machine froze, not the command: no heartbeat for \d+ s "
        r"\(SMOLVMM_NESTED_WATCHDOG=10\); QEMU stopped .*; it was running: test_inner.py::test_c "
        rf"\(evidence: {re.escape(str(evidence))}\)\n",
        summary,
    ), summary
    assert (
        "\n  2 kvm tests without an outcome ran again in a fresh nested machine (run 3):\n"
        "  test_inner.py::test_c (running when the machine stopped): passed on the retry\n"
        "  test_inner.py::test_d: passed on the retry\n" in summary
    ), summary
    assert "test_inner.py::test_c" in evidence.read_text()


def running(run: Path) -> str | None:
    """The test a nested machine's pytest says it is running (None before it starts one)."""
    results = run / "results.json"
    return json.loads(results.read_text())["running"] if results.exists() else None


@needs_qemu
def test_work_prepared_on_the_host_overlaps_the_nested_run_and_reaches_its_module(tmp_path: Path) -> None:
    """A module's ``prepare_on_host`` work finishes only after another module's kvm test has passed
    in the nested machine: the nested run must start before the work ends and run the waiting
    module last; the work's environment reaches that module, and a failed work fails its module."""
    (tmp_path / "conftest.py").write_text(FAKED_PVM_CONFTEST)
    (tmp_path / "test_a_built.py").write_text(
        "import json, os, time\nfrom pathlib import Path\nimport pytest\nfrom nested_plugin import prepare_on_host\n\n"
        "def built():\n"
        "    results = Path(os.environ['BASE']) / 'nested-kvm0' / 'run-1' / 'results.json'\n"
        "    for _ in range(600):\n"
        "        if results.exists() and 'test_z_other.py::test_first' in json.loads(results.read_text())['results']:\n"
        "            return {'SMOLVMM_TEST_BUILT': 'yes'}\n"
        "        time.sleep(0.5)\n"
        "    raise RuntimeError('the nested run did not start before the work ended')\n\n"
        "prepare_on_host(built)\n\n"
        "@pytest.mark.kvm\ndef test_sees_it():\n    assert os.environ['SMOLVMM_TEST_BUILT'] == 'yes'\n"
    )
    (tmp_path / "test_b_broken.py").write_text(
        "import pytest\nfrom nested_plugin import prepare_on_host\n\n"
        "def broken():\n    raise OSError('no space left on device')\n\n"
        "prepare_on_host(broken)\n\n"
        "@pytest.mark.kvm\ndef test_needs_it():\n    pass\n"
    )
    (tmp_path / "test_z_other.py").write_text("import pytest\n\n@pytest.mark.kvm\ndef test_first():\n    pass\n")
    base = tmp_path / "base"
    environment = {key: value for key, value in os.environ.items() if key not in ("CI", "SMOLVMM_NESTED")}
    environment.update(PYTHONPATH=str(Path(__file__).resolve().parent), BASE=str(base), **{MACHINES_ENV: "1"})
    outer = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rf", f"--basetemp={base}"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "1 failed, 2 passed" in outer.stdout, outer.stdout
    assert "FAILED test_b_broken.py::test_needs_it" in outer.stdout, outer.stdout
    assert "preparing this test on the host failed: test_b_broken.broken: no space left on device" in outer.stdout, (
        outer.stdout
    )
    assert "preparing kvm tests on the host failed: test_b_broken.broken: no space left on device" in outer.stdout


def test_each_kvm_test_times_out_inside_before_the_nested_run_does() -> None:
    """A hung test fails by itself (pytest-timeout inside), leaving time for the rest of the nested run."""
    options = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    per_test = options["tool"]["pytest"]["ini_options"]["timeout"]
    assert 0 < 2 * per_test < NESTED_TIMEOUT
