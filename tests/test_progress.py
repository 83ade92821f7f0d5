"""smolvmm.progress and smolformat's progress callbacks, natively: what a sink is told, and that
it follows the caller into worker threads on both anyio backends."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from bundles import contents

from smolformat import verify_bundle, write_bundle
from smolvmm import progress, report_progress


class Recorder:
    """A sink that keeps what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def __call__(self, description: str, total: int | None) -> Recorder:
        self.events.append(("open", (description, total)))
        return self

    def update(self, done: int) -> None:
        self.events.append(("update", done))

    def status(self, text: str) -> None:
        self.events.append(("status", text))

    def close(self) -> None:
        self.events.append(("close", None))


def test_without_a_sink_tasks_report_nothing() -> None:
    with progress.task("quiet work", 10) as task:
        task.update(5)
        task.status("halfway")  # nobody listens: nothing happens, nothing fails


def test_a_sink_sees_each_task_open_update_and_close() -> None:
    recorder = Recorder()
    with report_progress(recorder), progress.task("work", 100) as task:
        task.update(40)
        task.status("step two")
    assert recorder.events == [("open", ("work", 100)), ("update", 40), ("status", "step two"), ("close", None)]
    with progress.task("after the block") as task:  # the sink is gone with its block
        task.update(1)
    assert len(recorder.events) == 4


@pytest.mark.anyio
async def test_the_sink_follows_into_worker_threads(anyio_backend: str) -> None:
    recorder = Recorder()

    def work() -> None:
        with progress.task("in a thread") as task:
            task.update(7)

    with report_progress(recorder):
        await anyio.to_thread.run_sync(work)
    assert recorder.events == [("open", ("in a thread", None)), ("update", 7), ("close", None)]


def test_write_and_verify_report_bytes(tmp_path: Path) -> None:
    written: list[int] = []
    path = tmp_path / "m.smolmachine"
    write_bundle(path, contents(tmp_path), memory_encoding="raw", progress=written.append)
    assert written == sorted(written) and 0 < written[-1] < path.stat().st_size
    checked: list[tuple[int, int]] = []
    verify_bundle(path, lambda done, total: checked.append((done, total)))
    assert [done for done, _ in checked] == sorted(done for done, _ in checked)
    assert checked[-1][0] == checked[-1][1] and len({total for _, total in checked}) == 1
