"""Where ``@pytest.mark.kvm`` tests run: directly on hardware KVM, inside tools/nested-kvm on PVM.

On a PVM host the selected kvm tests run in nested pytests, started in the background once
collection ends and waited for when the first of them is due, their output printed then; each outer
kvm item reports its nested counterpart's outcome, so every test counts once. The first run is
``machines_wanted()`` nested machines side by side (each emulates its one vCPU on one host core),
each taking the next test no other has taken, so the kvm tests take about half the time on two
cores. What a module's kvm tests need built on the host (``prepare_on_host``: a kernel compiled,
an image made) is built meanwhile; those tests run last and wait for it.
When the nested machine freezes (tools/nested-kvm exits 124) or fails (125), the tests without an
outcome, the one running at the time included, run in a fresh nested machine (once the other
tests have ended, so that it has the host to itself; in machines side by side when there are
enough tests); so does a test the machine made fail: one
that failed after the machine stalled while it ran (its heartbeat paused, and the watchdog woke it:
a test's own time bounds run on the stalled machine's clock), or one whose guest kernel said it read
a used ring entry no device wrote (``BROKEN_RING``). A test so interrupted in two machines fails, or in
three when each time its guest read a ring wrong (``may_run_again``). The terminal summary
lists every such retry, and the evidence of each machine failure is kept in a log file.
With no usable /dev/kvm they skip, or fail when CI is set.
Tests marked ``kvm(linux_guest=False)`` need /dev/kvm but no Linux guest getting far (the monitor's
own work: KVM ioctls, restore up to the first guest entry): they run on the host's own /dev/kvm of
any kind, and skip (or fail when CI is set) only where there is none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from guests import BROKEN_RING

from smolvmm.errors import SmolvmmError
from smolvmm.host.kvmprobe import probe
from smolvmm.images.guest import PREBUILT_ENV, default_guest
from smolvmm.nested import HARNESS_FAILURE, NESTED_FROZE
from smolvmm.nested.watchdog import PAUSE_PREFIX, pauses

RESULTS_ENV = "SMOLVMM_NESTED_RESULTS"
CLAIMS_ENV = "SMOLVMM_NESTED_CLAIMS"
"""Inside a nested machine that shares its tests with others: the directory where each takes a test."""
MACHINES_ENV = "SMOLVMM_NESTED_MACHINES"
"""How many nested machines the first run uses side by side (default: one per host CPU, at most two)."""
SLOWEST = 15
NESTED_TIMEOUT = 2400
"""The nested pytest's overall bound (host clock), well above the per-test timeout (pyproject: 900 s)."""
RING_FAULT = "failed as its guest read a virtio ring wrong"
MAX_RUNS = 8
"""Nested machines one session may use: the first and up to seven fresh ones after machines froze
(QEMU 7.2's emulation freezes a machine now and then, on some hosts every few minutes:
BENCHMARKS.md, "The nested machine"). Each fresh machine runs only the tests still without an outcome."""
NESTED_BUDGET = 3600
"""Seconds (host clock) all the nested machines of a session may take together: a fresh machine starts
only with at least MIN_RUN of it left, and its timeout ends with it (CI's limit is 90 minutes)."""
MIN_RUN = 300
_TOOL = Path(__file__).resolve().parent.parent / "tools" / "nested-kvm"
_ACTIVITY_ENV = "SMOLVMM_NESTED_ACTIVITY"

Results = dict[str, dict[str, str]]


@dataclass
class NestedRun:
    """One nested pytest (or machines side by side, ``merged``): the tests it ran, those that
    finished, those running when it ended, how it ended."""

    number: int
    nodeids: list[str]
    status: int = 0
    results: Results = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    paused: dict[str, float] = field(default_factory=dict)
    """Seconds the machine stalled (and was woken) while each test ran."""
    failure: str = ""
    """Why the tests without an outcome have none (empty when every test finished)."""
    evidence: Path | None = None
    output: list[str] = field(default_factory=list)
    """What its nested pytest and the harness printed, with a rule before and after."""
    parts: list[NestedRun] = field(default_factory=list)
    """The machines side by side that made this run (``merged``); empty for one machine."""

    @property
    def machines(self) -> list[NestedRun]:
        """Each machine of the run: its parts, or the run itself."""
        return self.parts or [self]

    def machine_of(self, nodeid: str) -> NestedRun:
        """The machine that ran ``nodeid`` or was running it when it ended (else the run itself)."""
        ran = [machine for machine in self.machines if nodeid in machine.running or nodeid in machine.results]
        return ran[0] if ran else self

    def where(self) -> str:
        """Where the run's tests ran, for the summary."""
        numbers = [str(machine.number) for machine in self.machines]
        if len(numbers) == 1:
            return f"a fresh nested machine (run {numbers[0]})"
        return f"{len(numbers)} fresh nested machines side by side (runs {', '.join(numbers[:-1])} and {numbers[-1]})"

    @property
    def machine_failed(self) -> bool:
        return self.status in (NESTED_FROZE, HARNESS_FAILURE)

    @property
    def unfinished(self) -> list[str]:
        return [nodeid for nodeid in self.nodeids if nodeid not in self.results or nodeid in self.running]

    def fault(self, nodeid: str) -> str:
        """How the machine made ``nodeid`` fail, or "" if it did not: it stalled while the test ran,
        or a guest's kernel read its virtio ring wrong (``BROKEN_RING``)."""
        result = self.results.get(nodeid, {})
        if result.get("outcome") != "failed":
            return ""
        if nodeid in self.paused:
            return f"failed after the machine stalled {self.paused[nodeid]:.0f} s while it ran"
        if BROKEN_RING.search(result.get("text", "")):
            return RING_FAULT
        return ""

    def interrupted(self, nodeid: str) -> bool:
        """The machine stopped while ``nodeid`` ran, or made it fail."""
        return (self.machine_failed and nodeid in self.running) or bool(self.fault(nodeid))

    def interruption(self, nodeid: str) -> str:
        """How the machine interrupted ``nodeid``, for the summary line."""
        return self.fault(nodeid) or "running when the machine stopped"

    def cause(self) -> str:
        """The harness's one line on how the machine ended (or the nested pytest's exit status)."""
        return self.failure.splitlines()[0] if self.failure else f"nested pytest exited with status {self.status}"


def next_tests(runs: list[NestedRun], budget_left: float = NESTED_BUDGET) -> list[str]:
    """What a fresh machine runs after ``runs``: the tests without an outcome yet (after a machine
    failure) and those the machine made fail (``NestedRun.fault``) that ``may_run_again``; nothing
    once MAX_RUNS machines ran or less than MIN_RUN seconds of the budget are left."""
    last = runs[-1]
    if len(runs) >= MAX_RUNS or budget_left < MIN_RUN:
        return []
    again = set(last.unfinished if last.machine_failed else []) | set(filter(last.fault, last.nodeids))
    return [nodeid for nodeid in last.nodeids if nodeid in again and may_run_again(runs, nodeid)]


def may_run_again(runs: list[NestedRun], nodeid: str) -> bool:
    """Whether ``nodeid``, interrupted in the last of ``runs``, gets a fresh machine: after one
    interruption, or two that were both a broken ring (the emulation breaks one at random, per ring
    operation, so a test that moves a lot of data meets it often; a test that stops or stalls every
    machine it runs in does not get a third)."""
    interruptions = [run.fault(nodeid) for run in runs if run.interrupted(nodeid)]
    return len(interruptions) < (3 if set(interruptions) == {RING_FAULT} else 2)


def _result(run: NestedRun, nodeid: str) -> dict[str, str]:
    """``nodeid``'s result in ``run``; a failure says whether the machine stalled meanwhile."""
    result = run.results[nodeid]
    if result["outcome"] == "failed" and nodeid in run.paused:
        note = f"\n(the nested machine stalled {run.paused[nodeid]:.0f} s while this test ran, and was woken)"
        return {**result, "text": result["text"] + note}
    return result


def combine(runs: list[NestedRun]) -> tuple[Results, list[str]]:
    """Each test's outcome over the nested runs (the first, then retries in fresh machines), and the
    summary lines that say what was retried."""
    first = runs[0]
    results = {nodeid: _result(first, nodeid) for nodeid in first.results}
    for nodeid in first.unfinished:
        results[nodeid] = {"outcome": "failed", "text": first.failure}
    lines: list[str] = []
    for position, (before, retry) in enumerate(zip(runs, runs[1:])):
        later = {nodeid for run in runs[position + 2 :] for nodeid in run.nodeids}
        for machine in before.machines:
            if machine.machine_failed:
                during = "" if machine.running else " (between tests)"
                lines.append(f"nested run {machine.number}{during}: {_ended(machine)}")
            elif stalled := {nodeid in machine.paused for nodeid in retry.nodeids if machine.fault(nodeid)}:
                what = {True: "the nested machine stalled, and was woken,", False: "a guest read a virtio ring wrong"}
                happened = " and ".join(what[kind] for kind in sorted(stalled, reverse=True))
                lines.append(f"nested run {machine.number}: {happened} while tests ran")
        faulted = any(map(before.fault, retry.nodeids))
        which = {
            (True, False): " without an outcome",
            (False, True): " that the machine made fail",
            (True, True): ", without an outcome or made to fail by the machine,",
        }[before.machine_failed, faulted]
        lines.append(f"  {len(retry.nodeids)} kvm tests{which} ran again in {retry.where()}:")
        for nodeid in retry.nodeids:
            there, again = before.machine_of(nodeid), retry.machine_of(nodeid)
            result = _result(retry, nodeid) if nodeid in retry.results else {"outcome": "failed", "text": again.failure}
            froze = before.interrupted(nodeid)
            if fault := before.fault(nodeid):
                first_time = f"in nested run {there.number}, this test {fault}:\n{before.results[nodeid]['text']}"
            else:
                first_time = f"this test was running when nested run {there.number} ended: {there.failure}"
            if froze and nodeid in retry.running and nodeid not in retry.results:
                verdict = f"failed twice (the nested machine stopped while it ran, again: {again.cause()})"
                result = {
                    "outcome": "failed",
                    "text": f"{first_time}\n\nand on the retry in a fresh machine: {again.failure}",
                }
            elif froze and result["outcome"] == "failed" and nodeid in retry.results:
                attempts = sum(nodeid in run.results or run.interrupted(nodeid) for run in runs[: position + 2])
                times = _TIMES.get(attempts, f"{attempts} times")
                verdict = "failed again, and ran a third time" if nodeid in later else f"failed {times}"
                result = {
                    "outcome": "failed",
                    "text": f"{first_time}\n\nand on the retry in a fresh machine:\n{result['text']}",
                }
            else:
                verdict = (
                    f"{result['outcome']} on the retry" if nodeid in retry.results else "no outcome on the retry either"
                )
            lines.append(f"  {nodeid}{f' ({before.interruption(nodeid)})' if froze else ''}: {verdict}")
            results[nodeid] = result
    if len(runs) > 1 and runs[-1].unfinished:
        for machine in runs[-1].machines:
            if machine.machine_failed:
                lines.append(f"nested run {machine.number}: {_ended(machine)}; not retried again")
    return results, lines


_TIMES = {2: "twice", 3: "three times"}


def _ended(machine: NestedRun) -> str:
    """How a machine that failed ended, and where its evidence is."""
    return machine.cause() + (f" (evidence: {machine.evidence})" if machine.evidence else "")


def merged(machines: list[NestedRun]) -> NestedRun:
    """Machines that ran the same tests side by side (each taking the next test no other had taken)
    as one run: every outcome, and how the machines that failed ended, under the number of the first
    that failed (or else made a test fail, ``NestedRun.fault``)."""
    if len(machines) == 1:
        return machines[0]
    failed = [machine for machine in machines if machine.machine_failed]
    faulted = [machine for machine in machines if any(map(machine.fault, machine.results))]
    ended = failed or faulted or machines
    run = NestedRun(
        ended[0].number,
        machines[0].nodeids,
        ended[0].status if failed else max(machine.status for machine in machines),
        {nodeid: result for machine in machines for nodeid, result in machine.results.items()},
        {nodeid for machine in failed for nodeid in machine.running},
        {nodeid: seconds for machine in machines for nodeid, seconds in machine.paused.items()},
        parts=machines,
    )
    if run.unfinished:
        others = "".join(f"\n(and nested run {machine.number}: {machine.cause()})" for machine in ended[1:])
        run.failure, run.evidence = ended[0].failure + others, ended[0].evidence
    return run


def machines_wanted() -> int:
    """Nested machines for the first run: $SMOLVMM_NESTED_MACHINES, else one per host CPU (each
    emulates its one vCPU on one host thread), at most two."""
    value = os.environ.get(MACHINES_ENV, str(min(2, os.cpu_count() or 1)))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{MACHINES_ENV}={value!r} is not a number of machines (1, 2, ...)")
    return int(value)


def claim(claims: Path, nodeid: str) -> bool:
    """Take ``nodeid`` for this machine, unless another machine sharing ``claims`` took it first
    (mkdir is atomic on the host's file system, which every machine reaches over 9p)."""
    try:
        (claims / hashlib.sha256(nodeid.encode()).hexdigest()[:32]).mkdir()
    except FileExistsError:
        return False
    return True


HOST_WORK_ENV = "SMOLVMM_NESTED_HOST_WORK"
HOST_WORK_WAIT = 800
"""Seconds a nested test waits for its module's ``prepare_on_host`` work (below the per-test 900 s)."""
_HOST_WORK: list[threading.Thread] = []
_HOST_WORK_ENV: dict[str, str] = {}
_HOST_WORK_FAILED: dict[str, str] = {}  # module -> why its work failed
_HOST_WORK_MODULES: set[str] = set()


def prepare_on_host(work: Callable[[], dict[str, str]]) -> None:
    """Build, where apt and the cache are writable, what a module's kvm tests need inside
    tools/nested-kvm (which sees the cache read-only): called at the module's import. On a PVM host
    ``work`` starts in a thread at once, while the nested machine starts on the other kvm tests (the
    module's come last); the environment it returns reaches the nested run through a file its first
    test waits for. Inside the nested machine it marks the module as one that waits; on hardware
    KVM the tests build what they need themselves."""
    module = work.__module__
    _HOST_WORK_MODULES.add(module)
    if os.environ.get("SMOLVMM_NESTED") == "1" or probe().kind != "pvm":
        return

    def run() -> None:
        try:
            _HOST_WORK_ENV.update(work())
        except Exception as exc:  # noqa: BLE001 - the module's nested tests then fail with this text
            _HOST_WORK_FAILED[module] = f"{module}.{work.__name__}: {exc}"

    thread = threading.Thread(target=run, name=f"prepare {module}", daemon=True)
    thread.start()
    _HOST_WORK.append(thread)


def publish_host_work(path: Path) -> list[str]:
    """Wait for every ``prepare_on_host`` work, then write what it returned to ``path`` (atomically,
    for the nested tests); the failures, one line each."""
    for thread in _HOST_WORK:
        thread.join()
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"env": _HOST_WORK_ENV, "failed": _HOST_WORK_FAILED}))
    partial.replace(path)
    return [f"preparing kvm tests on the host failed: {failure}\n" for failure in _HOST_WORK_FAILED.values()]


def await_host_work(module: str, wait: float = HOST_WORK_WAIT) -> None:
    """Inside the nested machine: return once the host's work is published (its environment then
    set here), or fail the test in one line: the work failed, or was not done after ``wait`` s."""
    path = Path(os.environ[HOST_WORK_ENV])
    deadline = time.monotonic() + wait
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"what this test needs was not built on the host after {wait:.0f} s", pytrace=False)
        time.sleep(0.5)
    published = json.loads(path.read_text())
    os.environ.update(published["env"])
    if module in published["failed"]:
        pytest.fail(f"preparing this test on the host failed: {published['failed'][module]}", pytrace=False)


def _host_work(directory: Path) -> Path:
    """The file ``publish_host_work`` writes for the nested runs under ``directory``, in a directory
    of its own that each nested machine mounts."""
    return directory / "host-work" / "env.json"


def _module_name(nodeid: str) -> str:
    """The module a test's node id is in, as imported (tests/ is on the import path)."""
    return Path(nodeid.partition("::")[0]).stem


def runs_linux_guests(item: pytest.Item) -> bool:
    """A ``kvm`` test needs a /dev/kvm that runs standard Linux guests (on PVM: the nested machine)."""
    marker = item.get_closest_marker("kvm")
    return marker is not None and marker.kwargs.get("linux_guest", True)


def runs_on_any_kvm(item: pytest.Item) -> bool:
    """A ``kvm(linux_guest=False)`` test needs /dev/kvm but no Linux guest getting far: it runs on
    this host's own /dev/kvm, PVM's included."""
    marker = item.get_closest_marker("kvm")
    return marker is not None and not marker.kwargs.get("linux_guest", True)


def _rule(title: str) -> str:
    """A line of dashes with ``title`` in the middle, as pytest's separators."""
    return f" {title} ".center(80, "-") + "\n"


class NestedFailure(Exception):
    """A kvm test failed inside the nested machine (or the machine failed); the text says how."""


class DelegatedItem(pytest.Item):
    """Stands in for a kvm test on a PVM host: its outcome is the nested run's outcome."""

    def __init__(self, *, plugin: NestedKvm, original: pytest.Item, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plugin = plugin
        self._reportinfo = original.reportinfo()
        self.own_markers = list(original.own_markers)
        # The first delegated item runs the whole nested pytest, which has its own time limit
        # and applies the per-test timeout inside: no per-test timeout out here.
        self.add_marker(pytest.mark.timeout(0))
        self.keywords.update(original.keywords)

    def runtest(self) -> None:
        outcome, text = self.plugin.outcome(self.nodeid)
        if outcome == "skipped":
            # reported at the test's own location rather than this line
            raise pytest.skip.Exception(text, _use_item_location=True)
        if outcome == "xfailed":
            pytest.xfail(text)
        if outcome != "passed":
            raise NestedFailure(text)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, NestedFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> Any:
        return self._reportinfo


class NestedKvm:
    """The plugin: decides per host where kvm-marked tests run."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.host = probe()
        self.inside = os.environ.get("SMOLVMM_NESTED") == "1"
        self.results: Results = {}
        self.running: str | None = None
        self.nodeids: list[str] = []
        self.ran = False
        self.harness_error = ""
        self.retries: list[str] = []
        # each kvm test's setup, call and teardown, as the nested machine timed them
        self.seconds: dict[str, float] = {}
        self.background: threading.Thread | None = None
        self.host_tests_done = threading.Event()  # set when the first kvm test is due: the others have run
        self.processes: list[subprocess.Popen[str]] = []  # the nested runs' tools/nested-kvm
        self.output: list[str] = []  # what the background run printed, shown when its first test is reported

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        kvm = [index for index, item in enumerate(items) if runs_linux_guests(item)]
        if not kvm or self.host.kind == "hardware":
            return
        if self.inside or (self.host.kind == "none" and os.environ.get("CI")):
            self.ran, self.harness_error = True, f"kvm tests cannot run: {self.host.explanation}"
        elif self.host.kind == "none":
            self._skip_all(items, kvm, self.host.explanation)
            return
        elif shutil.which("qemu-system-x86_64") is None and not os.environ.get("CI"):
            self._skip_all(items, kvm, f"{self.host.explanation}, which needs QEMU: apt-get install qemu-system-x86")
            return
        for index in kvm:
            original = items[index]
            items[index] = DelegatedItem.from_parent(
                original.parent, name=original.name, plugin=self, original=original
            )
            self.nodeids.append(original.nodeid)
        # The tests that wait for work on the host run last in the nested machine.
        self.nodeids.sort(key=lambda nodeid: _module_name(nodeid) in _HOST_WORK_MODULES)
        # The outer kvm items come last: the host's own tests run while the nested run goes on.
        items[:] = [i for i in items if not isinstance(i, DelegatedItem)] + [
            i for i in items if isinstance(i, DelegatedItem)
        ]

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """A ``kvm(linux_guest=False)`` test runs here on any /dev/kvm; with none it skips (fails in CI).
        Inside the nested machine, a test whose module prepares on the host waits for that work."""
        module = _module_name(item.nodeid)
        if self.inside and module in _HOST_WORK_MODULES and HOST_WORK_ENV in os.environ:
            await_host_work(module)
        if runs_on_any_kvm(item) and self.host.kind == "none":
            if os.environ.get("CI"):
                pytest.fail(f"kvm tests cannot run: {self.host.explanation}", pytrace=False)
            pytest.skip(self.host.explanation)

    @staticmethod
    def _skip_all(items: list[pytest.Item], indexes: list[int], reason: str) -> None:
        for index in indexes:
            items[index].add_marker(pytest.mark.skip(reason=reason))

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Start the nested run in the background (see the module)."""
        if not self.nodeids or self.ran or session.config.option.collectonly:
            return
        self.ran = True
        try:
            guest = default_guest()
        except SmolvmmError as exc:
            self.harness_error = f"building the default guest image on the host failed: {exc}"
            return
        self.config.get_terminal_writer().line(
            f"{len(self.nodeids)} kvm tests run inside tools/nested-kvm in the background; their output follows"
            " when the first of them is reported"
        )
        # Made here: pytest's basetemp is not safe to create from two threads at once.
        factory = getattr(self.config, "_tmp_path_factory", None)
        directory = factory.mktemp("nested-kvm") if factory else Path(tempfile.mkdtemp(prefix="smolvmm-nested-kvm-"))
        self.background = threading.Thread(
            target=self._run_all, args=(guest.kernel.parent, directory), name="nested kvm tests", daemon=True
        )
        self.background.start()

    def outcome(self, nodeid: str) -> tuple[str, str]:
        """(outcome, text) of ``nodeid`` in the nested run, once the run has ended."""
        if self.background is not None:
            self.host_tests_done.set()
            self.background.join()
            self.background = None
            capture = self.config.pluginmanager.getplugin("capturemanager")
            with capture.global_and_fixture_disabled():
                writer = self.config.get_terminal_writer()
                writer.line()
                for line in self.output:
                    writer.write(line, flush=True)
        if nodeid in self.results:
            result = self.results[nodeid]
            if result["outcome"] == "failed":
                return "failed", f"(inside tools/nested-kvm)\n{result['text']}"
            return result["outcome"], result["text"]
        return "failed", self.harness_error or "the nested pytest run did not report this test"

    def _run_all(self, prebuilt: Path, directory: Path) -> None:
        """The nested run, and after a machine that froze, failed or stalled, the tests it interrupted
        in a fresh one (see ``next_tests``), at most MAX_RUNS machines in all."""
        try:
            _host_work(directory).parent.mkdir()
            failures: list[str] = []
            publisher = threading.Thread(
                target=lambda: failures.extend(publish_host_work(_host_work(directory))),
                name="publish host work",
                daemon=True,
            )
            publisher.start()
            deadline = time.monotonic() + NESTED_BUDGET
            wanted = machines_wanted()
            runs = [self._run_side_by_side(self.nodeids, 1, wanted, prebuilt, directory, NESTED_TIMEOUT)]
            publisher.join()
            self.output.extend(failures)
            if next_tests(runs):
                # A retry waits for the tests beside it to end: in fresh-clone run 11 a test failed
                # because both machines it ran in froze, each while those tests loaded the host.
                self.host_tests_done.wait()
            while retry := next_tests(runs, deadline - time.monotonic()):
                timeout = min(NESTED_TIMEOUT, deadline - time.monotonic())
                first = max(machine.number for machine in runs[-1].machines) + 1
                runs.append(self._run_side_by_side(retry, first, wanted, prebuilt, directory, timeout))
            self.results, self.retries = combine(runs)
        except Exception as exc:  # noqa: BLE001 - every kvm test then fails with this text
            self.harness_error = f"the nested run failed on the host: {type(exc).__name__}: {exc}"

    def _run_side_by_side(
        self, nodeids: list[str], first: int, wanted: int, prebuilt: Path, directory: Path, timeout: float
    ) -> NestedRun:
        """``nodeids`` in fresh nested machines at once, numbered from ``first``, each taking the next
        test no other has taken (``claim``), so that a machine that freezes leaves the others the
        rest; as one run (``merged``). ``wanted`` machines, but at most one per two tests: a machine
        takes two as it starts (its first, and the next one, for pytest's teardown)."""
        machines = min(wanted, (len(nodeids) + 1) // 2)
        claims = directory / f"claims-{first}" if machines > 1 else None
        if claims is not None:
            claims.mkdir()
        runs = [NestedRun(number, nodeids) for number in range(first, first + machines)]
        why = self.host.explanation if first == 1 else "a retry in a fresh nested machine"
        errors: list[Exception] = []

        def run_one(run: NestedRun) -> None:
            what = f"machine {run.number - first + 1} of {machines}; " if machines > 1 else ""
            try:
                self._run_nested(run, what + why, prebuilt, directory, timeout, claims)
            except Exception as exc:  # noqa: BLE001 - raised again once every machine has ended
                errors.append(exc)

        threads = [threading.Thread(target=run_one, args=(run,), name=f"nested machine {run.number}") for run in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        for run in runs:
            self.output.extend(run.output)
        return merged(runs)

    def _run_nested(
        self, run: NestedRun, what: str, prebuilt: Path, directory: Path, timeout: float, claims: Path | None = None
    ) -> NestedRun:
        """``run`` in a fresh nested machine (``what`` it is, for the output); with ``claims``, a
        machine beside others, running only the tests it takes."""
        run.output.append(_rule(f"{len(run.nodeids)} kvm tests inside tools/nested-kvm ({what})"))
        out = directory / f"run-{run.number}"
        out.mkdir()
        results = out / "results.json"
        evidence = directory / f"run-{run.number}-evidence.log"
        env = {
            **os.environ,
            PREBUILT_ENV: str(prebuilt),
            RESULTS_ENV: str(results),
            HOST_WORK_ENV: str(_host_work(directory)),
        }
        shared = []
        if claims is not None:
            shared, env[CLAIMS_ENV] = ["--out", str(claims)], str(claims)
        command = [
            str(_TOOL),
            "--out",
            str(out),
            "--out",
            str(_host_work(directory).parent),
            *shared,
            "--timeout",
            str(max(int(timeout), 1)),
            "--evidence",
            str(evidence),
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            # The nested machine's files live in its RAM: a passed test's files go as it ends
            # (a cold-cache run filled it with every test's bundles and overlays).
            "-o",
            "tmp_path_retention_policy=failed",
            *run.nodeids,
        ]
        process = subprocess.Popen(
            command, cwd=self.config.rootpath, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.processes.append(process)
        assert process.stdout is not None
        first = len(run.output)
        run.output.extend(process.stdout)
        run.status = process.wait()
        printed = [line.rstrip() for line in run.output[first:]]
        run.paused = {nodeid: s for nodeid, s in pauses(printed).items() if nodeid in run.nodeids}
        tail = printed[-80:]
        run.output.append(_rule(f"nested pytest exit status {run.status}"))
        if results.exists():
            recorded = json.loads(results.read_text())
            run.results, run.running = recorded["results"], set(filter(None, [recorded["running"]]))
            self.seconds.update(recorded["seconds"])
        if not run.unfinished:
            return run
        run.evidence = evidence if evidence.exists() else None
        # The harness's own report (it may follow a test's progress dots on one line) ends the output.
        harness = [index for index, line in enumerate(tail) if "nested-kvm: " in line and PAUSE_PREFIX not in line]
        if harness:
            run.failure = "\n".join(tail[harness[-1] :]).rpartition("nested-kvm: ")[2]
        else:
            run.failure = f"nested pytest exited with status {run.status}; its last output:\n" + "\n".join(tail[-15:])
        return run

    def pytest_unconfigure(self) -> None:
        """A session ending early (-x, Ctrl-C) ends the background nested run with it."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                process.wait()

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """Every retry of kvm tests in a fresh nested machine, never hidden; the slowest kvm tests."""
        if self.retries:
            terminalreporter.write_sep("=", "kvm tests retried in a fresh nested machine")
            for line in self.retries:
                terminalreporter.write_line(line)
        if self.seconds:
            slowest = sorted(self.seconds.items(), key=lambda item: -item[1])[:SLOWEST]
            terminalreporter.write_sep("=", f"slowest {len(slowest)} kvm tests inside the nested machine")
            for nodeid, seconds in slowest:
                terminalreporter.write_line(f"{seconds:8.1f}s {nodeid}")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool | None:
        """Inside a nested machine sharing its tests with others: run the tests this machine takes
        (``claim``), in order, taking the next one as a test starts (pytest tears a test's fixtures
        down knowing which test comes next)."""
        claims = os.environ.get(CLAIMS_ENV)
        if not (self.inside and claims) or session.config.option.collectonly:
            return None
        if session.testsfailed:
            raise session.Interrupted(f"{session.testsfailed} errors during collection")
        taken = (item for item in session.items if claim(Path(claims), item.nodeid))
        item = next(taken, None)
        while item is not None:
            following = next(taken, None)
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=following)
            if session.shouldfail:
                raise session.Failed(session.shouldfail)
            if session.shouldstop:
                raise session.Interrupted(session.shouldstop)
            item = following
        return True

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        """Inside the nested machine: say which test runs (the harness names it if the machine freezes)."""
        if not self.inside:
            return
        if os.environ.get(_ACTIVITY_ENV):
            with contextlib.suppress(OSError):
                Path(os.environ[_ACTIVITY_ENV]).write_text(nodeid + "\n")
        self.running = nodeid
        self._save()

    def pytest_runtest_logfinish(self) -> None:
        if self.inside:
            self.running = None
            self._save()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Inside the nested machine: record each test's outcome for the outer run."""
        if not self.inside:
            return
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration
        recorded = self.results.get(report.nodeid)
        if recorded and recorded["outcome"] == "failed":
            return
        if report.failed:
            phase = "" if report.when == "call" else f" (in {report.when})"
            self.results[report.nodeid] = {"outcome": "failed", "text": report.longreprtext + phase}
        elif report.skipped and hasattr(report, "wasxfail"):
            self.results[report.nodeid] = {"outcome": "xfailed", "text": report.wasxfail}
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            reason = reason.removeprefix("Skipped: ")
            self.results[report.nodeid] = {"outcome": "skipped", "text": reason}
        elif report.when == "call":
            self.results[report.nodeid] = {"outcome": "passed", "text": ""}

    def _save(self) -> None:
        """Write the outcomes so far and the test running to $SMOLVMM_NESTED_RESULTS (atomically)."""
        path = os.environ.get(RESULTS_ENV)
        if path:
            partial = Path(f"{path}.partial")
            partial.write_text(json.dumps({"results": self.results, "running": self.running, "seconds": self.seconds}))
            partial.replace(path)
