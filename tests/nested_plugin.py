"""Where ``@pytest.mark.kvm`` tests run: directly on hardware KVM, inside tools/nested-kvm on PVM.

On a PVM host the selected kvm tests run in one nested pytest the first time one of them is due;
each outer kvm item then reports its nested counterpart's outcome, so every test counts once.
With no usable /dev/kvm they skip, or fail when CI is set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from smolvmm.errors import SmolvmmError
from smolvmm.hostkvm import probe
from smolvmm.images.guest import PREBUILT_ENV, default_guest

RESULTS_ENV = "SMOLVMM_NESTED_RESULTS"
NESTED_TIMEOUT = 2400
_TOOL = Path(__file__).resolve().parent.parent / "tools" / "nested-kvm"


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
        self.results: dict[str, dict[str, str]] = {}
        self.nodeids: list[str] = []
        self.ran = False
        self.harness_error = ""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        kvm = [index for index, item in enumerate(items) if item.get_closest_marker("kvm")]
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

    @staticmethod
    def _skip_all(items: list[pytest.Item], indexes: list[int], reason: str) -> None:
        for index in indexes:
            items[index].add_marker(pytest.mark.skip(reason=reason))

    def outcome(self, nodeid: str) -> tuple[str, str]:
        """(outcome, text) of ``nodeid`` in the nested run, running it on first use."""
        if not self.ran:
            self.ran = True
            capture = self.config.pluginmanager.getplugin("capturemanager")
            with capture.global_and_fixture_disabled():
                self._run_nested()
        if nodeid in self.results:
            result = self.results[nodeid]
            if result["outcome"] == "failed":
                return "failed", f"(inside tools/nested-kvm)\n{result['text']}"
            return result["outcome"], result["text"]
        return "failed", self.harness_error or "the nested pytest run did not report this test"

    def _run_nested(self) -> None:
        writer = self.config.get_terminal_writer()
        writer.line()
        writer.sep("-", f"{len(self.nodeids)} kvm tests inside tools/nested-kvm ({self.host.explanation})")
        try:
            guest = default_guest()
        except SmolvmmError as exc:
            self.harness_error = f"building the default guest image on the host failed: {exc}"
            return
        out = Path(tempfile.mkdtemp(prefix="smolvmm-kvm-tests-"))
        results = out / "results.json"
        env = {**os.environ, PREBUILT_ENV: str(guest.kernel.parent), RESULTS_ENV: str(results)}
        command = [str(_TOOL), "--out", str(out), "--timeout", str(NESTED_TIMEOUT),
                   sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *self.nodeids]
        process = subprocess.Popen(command, cwd=self.config.rootpath, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        tail: list[str] = []
        for line in process.stdout:
            writer.write(line, flush=True)
            tail = (tail + [line.rstrip()])[-15:]
        status = process.wait()
        writer.sep("-", f"nested pytest exit status {status}")
        if results.exists():
            self.results = json.loads(results.read_text())
        shutil.rmtree(out, ignore_errors=True)
        layer = "the nested machine failed" if status == 125 else f"nested pytest exited with status {status}"
        self.harness_error = f"{layer}; its last output:\n" + "\n".join(tail)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Inside the nested machine: record each test's outcome for the outer run."""
        if not (self.inside and os.environ.get(RESULTS_ENV)):
            return
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

    def pytest_sessionfinish(self) -> None:
        path = os.environ.get(RESULTS_ENV)
        if self.inside and path:
            Path(path).write_text(json.dumps(self.results))
