"""virtio-blk's C request loop against its Python path: for the same rings, the same guest memory,
used ring, device status and disk afterwards, whether the requests are sound or hostile."""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_driver import HEAP_START, RING_FEATURES, Driver, running, serve_until_settled

from smolvmm.devices.virtio import block
from smolvmm.devices.virtio.blk_native import native_module
from smolvmm.devices.virtio.block import MAX_DATA, S_IOERR, T_FLUSH, T_GET_ID, T_IN, T_OUT, VirtioBlock
from smolvmm.devices.virtio.mmio import STATUS_NEEDS_RESET
from smolvmm.devices.virtio.queue import Queue
from smolvmm.devices.virtio.session import STOPPED, Session
from smolvmm.host.memory import GuestMemory

DISK_SIZE = 1 << 20
QUEUE = 64
Setup = Callable[[Driver], int]  # posts chains on queue 0, returns how many


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("native") / "base.img"
    path.write_bytes(bytes(range(251)) * (DISK_SIZE // 251) + bytes(DISK_SIZE % 251))
    return path


def test_the_request_loop_is_built_here() -> None:
    # tools/setup builds it (gcc and the Python headers are there); without it the rest compares
    # the Python path with itself.
    assert native_module() is not None


def serve(base: Path, work: Path, setup: Setup, native: bool) -> tuple[object, ...]:
    """Run a fresh device over ``base`` on the chains ``setup`` posts; what the guest and disk show."""
    with pytest.MonkeyPatch.context() as patch:
        if not native:
            patch.setattr(block, "native_module", lambda: None)
        device = VirtioBlock(base)
        driver = Driver(device)
        driver.start(RING_FEATURES, size=QUEUE)
        serve_until_settled(driver, setup(driver), timeout=5)
        image = work / f"export-{native}.img"
        device.export(image)
        seen = (
            bool(driver.read(0x070) & STATUS_NEEDS_RESET),
            driver.take_used(0),
            # the buffers; the rings' avail_event changes with when the device thread last looked
            hashlib.sha256(driver.memory.region_view(0)[HEAP_START:]).hexdigest(),
            hashlib.sha256(image.read_bytes()).hexdigest(),
        )
        driver.transport.close()
        return seen


def alike(base: Path, work: Path, setup: Setup) -> None:
    assert serve(base, work, setup, native=True) == serve(base, work, setup, native=False)


requests = st.lists(
    st.tuples(
        st.sampled_from([T_IN, T_OUT, T_FLUSH, T_GET_ID, 3]),
        st.integers(0, DISK_SIZE // 512 + 2)
        | st.integers(DISK_SIZE // 512 - 20, DISK_SIZE // 512)
        | st.integers(0, 2**64 - 1),
        st.lists(st.sampled_from([512, 1024, 4096, 8192]) | st.integers(0, 5000), max_size=4),
        st.integers(0, 16),  # where the header is split in two descriptors (0: not split)
        st.booleans(),  # the status byte is the last byte of the last data buffer
        st.booleans(),  # through an indirect table
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chains=requests, fill=st.integers(0, 255))
def test_sound_requests_end_alike(base: Path, tmp_path: Path, chains, fill: int) -> None:
    """Reads, writes (copy-up of partial clusters included), bounds, FLUSH and GET_ID in any mix."""

    def setup(driver: Driver) -> int:
        for n, (type_, sector, lengths, split, status_in_data, indirect) in enumerate(chains):
            header = driver.alloc(16, struct.pack("<IIQ", type_, 0, sector))
            buffers = [(header, split, False), (header + split, 16 - split, False)] if split else [(header, 16, False)]
            writable = type_ in (T_IN, T_GET_ID)
            for i, length in enumerate(lengths):
                extra = 1 if status_in_data and writable and i + 1 == len(lengths) else 0
                data = bytes([(fill + n + i) & 0xFF]) * length
                buffers.append((driver.alloc(length + extra, data), length + extra, writable))
            if not (status_in_data and writable and lengths):
                buffers.append((driver.alloc(1, b"\xff"), 1, True))
            driver.submit(0, buffers, indirect=indirect, kick=False)
        driver.kick(0)
        return len(chains)

    alike(base, tmp_path, setup)


descriptors = st.tuples(
    st.integers(HEAP_START, HEAP_START + 0x10000) | st.integers(0, 2**64 - 1),
    st.integers(0, 0x2000) | st.integers(0, 2**32 - 1),
    st.sampled_from([0, 1, 2, 3, 4]) | st.integers(0, 0xFFFF),
    st.integers(0, QUEUE + 1),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    table=st.lists(descriptors, min_size=QUEUE, max_size=QUEUE),
    heads=st.lists(st.integers(0, QUEUE + 1), min_size=1, max_size=8),
    header=st.tuples(st.sampled_from([T_IN, T_OUT, 3]), st.integers(0, 2100) | st.integers(0, 2**64 - 1)),
)
def test_hostile_rings_end_alike(base: Path, tmp_path: Path, table, heads, header) -> None:
    """Arbitrary descriptor tables: the same requests served, or the same ring found malformed."""

    def setup(driver: Driver) -> int:
        for gpa in range(HEAP_START, HEAP_START + 0x10000, 0x1000):
            driver.memory.write(gpa, struct.pack("<IIQ", header[0], 0, header[1]))
        for i, (gpa, length, flags, nxt) in enumerate(table):
            driver.memory.write(driver.desc_addr(0) + 16 * i, struct.pack("<QIHH", gpa, length, flags, nxt))
        for head in heads:
            driver.publish(0, head)
        driver.kick(0)
        return len(heads)

    alike(base, tmp_path, setup)


def _started(base: Path, native: bool, monkeypatch: pytest.MonkeyPatch) -> Driver:
    """A driver that has started a device over ``base`` served on the C path or the Python one."""
    if not native:
        monkeypatch.setattr(block, "native_module", lambda: None)
    driver = Driver(VirtioBlock(base))
    driver.start(RING_FEATURES, size=QUEUE)
    return driver


def _request(driver: Driver, type_: int = T_IN, kick: bool = True) -> None:
    """Post a request on sector 1: a 512-byte read, or a FLUSH."""
    header = driver.alloc(16, struct.pack("<IIQ", type_, 0, 1))
    data = [(driver.alloc(512), 512, True)] if type_ == T_IN else []
    driver.submit(0, [(header, 16, False), *data, (driver.alloc(1, b"\xff"), 1, True)], kick=kick)


@pytest.mark.anyio
@pytest.mark.parametrize("native", [True, False])
async def test_interrupts_wait_for_used_event_across_a_flush(
    base: Path, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EVENT_IDX (§2.7.10) on either path: no interrupt until the used index passes used_event,
    with a FLUSH (served in Python) between the reads; then one interrupt, its status bit set."""
    driver = _started(base, native, monkeypatch)
    driver.memory.write_u16(driver.avail_addr(0) + 4 + 2 * QUEUE, 4)  # used_event: after the 5th

    async with running(driver):
        for type_ in (T_IN, T_FLUSH, T_IN):
            _request(driver, type_)
            await driver.wait_used(0)
        assert driver.interrupts() == 0
        assert driver.memory.read_u16(driver.used_addr(0) + 4 + 8 * QUEUE) == 3  # avail_event
        for _ in range(2):
            _request(driver)
            await driver.wait_used(0)
        assert driver.interrupts() == 1
        assert driver.read(0x060) == 1  # InterruptStatus: a used buffer
    driver.transport.close()


@pytest.mark.anyio
@pytest.mark.parametrize("native", [True, False])
async def test_a_queue_the_driver_stopped_is_not_served(
    base: Path, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QueueReady 0 after DRIVER_OK (§4.2.2.2): a request made available afterwards stays in the ring."""
    driver = _started(base, native, monkeypatch)
    async with running(driver):
        _request(driver)
        await driver.wait_used(0)
        driver.write(0x030, 0)  # QueueSel
        driver.write(0x044, 0)  # QueueReady
        _request(driver)
        await anyio.sleep(0.5)  # what serving it takes is a few milliseconds
        assert driver.used_idx(0) == 1
    driver.transport.close()


@pytest.mark.anyio
@pytest.mark.parametrize("native", [True, False])
async def test_a_malformed_ring_raises_no_interrupt_the_driver_held_back(
    base: Path, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an interrupt, with used_event far ahead (§2.7.10): a good request, then a head beyond
    the queue. The device needs a reset (a configuration change interrupt) and raises nothing else."""
    driver = _started(base, native, monkeypatch)
    async with running(driver):
        _request(driver)
        await driver.wait_used(0)
        assert driver.interrupts() == 1 and driver.read(0x060) == 1
        driver.write(0x064, 1)  # InterruptACK
        driver.memory.write_u16(driver.avail_addr(0) + 4 + 2 * QUEUE, 100)  # used_event
        _request(driver, kick=False)
        driver.publish(0, QUEUE + 7)
        driver.kick(0)
        with anyio.fail_after(3):
            while not driver.read(0x070) & STATUS_NEEDS_RESET:
                await anyio.sleep(0.001)
    assert driver.read(0x060) == 2  # the configuration change alone
    driver.transport.close()


@pytest.mark.parametrize("native", [True, False])
def test_a_request_longer_than_seg_max_times_size_max_fails(tmp_path: Path, native: bool) -> None:
    """Buffers naming the same guest pages again and again add up to more than any driver sends
    (and than a used element's 32 bits): the request fails, the disk untouched."""
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(2 * MAX_DATA)
    with pytest.MonkeyPatch.context() as patch:
        if not native:
            patch.setattr(block, "native_module", lambda: None)
        driver = Driver(VirtioBlock(big))
        driver.start(RING_FEATURES, size=QUEUE)
        page = driver.alloc(8 << 20)
        pieces = MAX_DATA // (8 << 20) + 1
        for type_, writable in ((T_IN, True), (T_OUT, False)):
            header = driver.alloc(16, struct.pack("<IIQ", type_, 0, 0))
            status = driver.alloc(1, b"\xff")
            buffers = [(header, 16, False), *[(page, 8 << 20, writable)] * pieces, (status, 1, True)]
            driver.submit(0, buffers, indirect=True, kick=False)
        driver.kick(0)
        serve_until_settled(driver, 2)
        assert driver.take_used(0) == [(0, 1), (1, 1)]
        assert driver.memory.read(status, 1)[0] == S_IOERR
        driver.transport.close()


class StalledLoop:
    """A ``session.NativeLoop`` whose request never completes until it is cancelled."""

    def __init__(self) -> None:
        self.running, self.cancelled = threading.Event(), threading.Event()
        self.finished = 0

    def start(self, queue: Queue, notify_fd: int, stop_fd: int) -> None:
        pass

    def serve(self) -> tuple[int, bool]:
        self.running.set()
        assert self.cancelled.wait(10)
        return STOPPED, True

    def finish(self, queue: Queue) -> None:
        self.finished += 1

    def cancel(self) -> None:
        self.cancelled.set()

    def pause(self) -> None:
        pass


def test_a_reset_stops_the_loop_in_flight_and_leaves_the_queue_to_the_reset() -> None:
    memory, queue, lock = GuestMemory.anonymous([(0, 1 << 20)]), Queue(16), threading.Lock()
    queue.ready = True
    interrupts: list[int] = []
    session = Session(memory, [queue], [-1], lock, lambda: interrupts.append(1))
    loop = StalledLoop()
    served: list[int] = []
    worker = threading.Thread(target=lambda: served.append(session.serve_natively(0, loop, -1)))
    worker.start()
    assert loop.running.wait(10)
    with lock:  # as the transport does on the driver's reset, from a vCPU thread
        session.close()
    worker.join(10)
    assert loop.cancelled.is_set() and not worker.is_alive()
    # the positions were not handed back, and no interrupt follows a reset
    assert (served, loop.finished, interrupts) == ([STOPPED], 0, [])
    memory.close()
