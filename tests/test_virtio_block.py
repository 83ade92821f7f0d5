"""virtio-blk over a copy-on-write overlay, driven by the guest-playing test driver."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from virtio_driver import RING_FEATURES, Driver, running

from smolvmm.devices.virtio.block import (
    F_RO,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    VirtioBlock,
    parse_request,
)
from smolvmm.devices.virtio.cow import CLUSTER_SIZE, CowDisk
from smolvmm.devices.virtio.mmio import STATUS_DRIVER_OK, STATUS_NEEDS_RESET
from smolvmm.devices.virtio.queue import DescriptorChain, QueueError
from smolvmm.devices.virtio.rng import VirtioRng
from smolvmm.errors import BundleError, ImageError

DISK_SIZE = 1 << 20


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(bytes(range(256)) * (DISK_SIZE // 256))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def request(
    driver: Driver, type_: int, sector: int = 0, data: bytes = b"", read: int = 0, indirect: bool = False
) -> tuple[int, bytes, int]:
    """Submit one block request; returns (status, bytes read, used length)."""
    header = driver.alloc(16, struct.pack("<IIQ", type_, 0, sector))
    buffers = [(header, 16, False)]
    if data:
        buffers.append((driver.alloc(len(data), data), len(data), False))
    if read:
        target = driver.alloc(read)
        buffers.append((target, read, True))
    status = driver.alloc(1, b"\xff")
    buffers.append((status, 1, True))
    head = driver.submit(0, buffers, indirect=indirect)
    [(used_head, used_len)] = await driver.wait_used(0)
    assert used_head == head
    return driver.memory.read(status, 1)[0], driver.memory.read(target, read) if read else b"", used_len


@pytest.mark.anyio
async def test_read_comes_from_base(base: Path) -> None:
    driver = Driver(VirtioBlock(base))
    driver.start(RING_FEATURES)
    async with running(driver):
        status, data, used = await request(driver, T_IN, 2, read=1024)
    assert (status, used) == (S_OK, 1025)
    assert data == base.read_bytes()[1024:2048]


@pytest.mark.anyio
async def test_writes_land_in_overlay_and_base_never_changes(base: Path) -> None:
    before = sha256(base)
    driver = Driver(VirtioBlock(base))
    driver.start(RING_FEATURES)
    async with running(driver):
        assert (await request(driver, T_OUT, 3, data=b"\xaa" * 512))[0] == S_OK
        assert (await request(driver, T_OUT, 16, data=b"\xbb" * 2 * CLUSTER_SIZE, indirect=True))[0] == S_OK
        _, cluster0, _ = await request(driver, T_IN, 0, read=CLUSTER_SIZE)
        _, whole, _ = await request(driver, T_IN, 0, read=4 * CLUSTER_SIZE)
    expected = bytearray(base.read_bytes()[: 4 * CLUSTER_SIZE])
    expected[1536:2048] = b"\xaa" * 512  # the partial write was merged with the copied-up cluster
    expected[8192:16384] = b"\xbb" * 8192
    assert cluster0 == expected[:CLUSTER_SIZE]
    assert whole == expected
    assert sha256(base) == before
    driver.transport.close()


@pytest.mark.anyio
async def test_overlay_is_reused_by_a_second_run(base: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "disk.overlay"
    first = Driver(VirtioBlock(base, overlay=overlay))
    first.start(RING_FEATURES)
    async with running(first):
        await request(first, T_OUT, 100, data=b"persist!" * 64)
    first.transport.close()
    second = Driver(VirtioBlock(base, overlay=overlay))
    second.start(RING_FEATURES)
    async with running(second):
        _, data, _ = await request(second, T_IN, 100, read=512)
        _, untouched, _ = await request(second, T_IN, 0, read=512)
    assert data == b"persist!" * 64
    assert untouched == base.read_bytes()[:512]


def test_flush_is_the_durability_point(base: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "crash.overlay"
    disk = CowDisk(base, overlay, read_only=False)
    disk.write_from(0, [memoryview(b"\x11" * 512)])
    disk.flush()
    disk.write_from(CLUSTER_SIZE, [memoryview(b"\x22" * 512)])
    # A copy of the overlay file taken now is what a restart after a crash would find.
    copy = tmp_path / "after-crash.overlay"
    copy.write_bytes(overlay.read_bytes())
    crashed = CowDisk(base, copy, read_only=True)
    seen = bytearray(2 * CLUSTER_SIZE)
    crashed.read_into(0, [memoryview(seen)])
    assert seen[:512] == b"\x11" * 512
    assert seen[CLUSTER_SIZE:] == base.read_bytes()[CLUSTER_SIZE : 2 * CLUSTER_SIZE]
    crashed.close()
    disk.close()


def test_overlay_has_one_writer(base: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "busy.overlay"
    first = CowDisk(base, overlay, read_only=False)
    with pytest.raises(ImageError, match="in use"):
        CowDisk(base, overlay, read_only=False)
    first.close()
    CowDisk(base, overlay, read_only=False).close()


def test_overlay_of_another_base_is_refused(base: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "o"
    CowDisk(base, overlay, read_only=False).close()
    other = tmp_path / "other.img"
    other.write_bytes(bytes(DISK_SIZE))
    with pytest.raises(ImageError, match="different base"):
        CowDisk(other, overlay, read_only=False)


@pytest.mark.anyio
async def test_read_only_disk_fails_writes(base: Path) -> None:
    before = sha256(base)
    driver = Driver(VirtioBlock(base, read_only=True))
    assert driver.offered() >> F_RO & 1
    driver.start(RING_FEATURES | 1 << F_RO)
    async with running(driver):
        status, _, used = await request(driver, T_OUT, 0, data=b"\0" * 512)
        _, data, _ = await request(driver, T_IN, 0, read=512)
    assert (status, used) == (S_IOERR, 1)
    assert data == base.read_bytes()[:512]
    assert sha256(base) == before


@pytest.mark.anyio
async def test_get_id_flush_bad_requests(base: Path) -> None:
    driver = Driver(VirtioBlock(base, serial="smol-disk-0"))
    driver.start(RING_FEATURES)
    async with running(driver):
        status, ident, used = await request(driver, T_GET_ID, read=20)
        assert (status, used) == (S_OK, 21)
        assert ident == b"smol-disk-0".ljust(20, b"\0")
        assert (await request(driver, T_FLUSH))[0] == S_OK
        assert (await request(driver, T_IN, DISK_SIZE // 512, read=512))[0] == S_IOERR
        assert (await request(driver, T_IN, 0, read=100))[0] == S_IOERR
        assert (await request(driver, 99))[0] == S_UNSUPP


def test_config_space(base: Path) -> None:
    driver = Driver(VirtioBlock(base))
    assert driver.transport.mmio_read(0x100, 8) == DISK_SIZE // 512
    assert driver.transport.mmio_read(0x100 + 20, 4) == 512


def test_export_folds_overlay_into_sparse_image(base: Path, tmp_path: Path) -> None:
    sparse_base = tmp_path / "sparse.img"
    with open(sparse_base, "wb") as f:
        f.truncate(64 << 20)
    block = VirtioBlock(sparse_base)
    block._disk.write_from(5 << 20, [memoryview(b"\x5a" * 1000 + b"\0" * 24)])
    flat = tmp_path / "flat.img"
    block.export(flat)
    block.close()
    data = flat.read_bytes()
    assert len(data) == 64 << 20
    assert data[5 << 20 : (5 << 20) + 1000] == b"\x5a" * 1000
    assert data.count(0) == len(data) - 1000
    assert os.stat(flat).st_blocks * 512 <= 2 << 20


@pytest.mark.anyio
async def test_bad_chain_needs_reset_without_disturbing_another_device(base: Path) -> None:
    block = Driver(VirtioBlock(base))
    rng = Driver(VirtioRng())
    block.start(RING_FEATURES)
    rng.start(RING_FEATURES)
    async with running(block, rng):
        header = block.alloc(16, struct.pack("<IIQ", T_IN, 0, 0))
        block.submit(0, [(header, 16, False)])  # no status byte anywhere
        with pytest.raises(TimeoutError):
            await block.wait_used(0, timeout=0.2)
        assert block.read(0x070) & STATUS_NEEDS_RESET
        assert block.read(0x060) & 2
        for _ in range(3):
            head = rng.submit(0, [(rng.alloc(16), 16, True)])
            assert await rng.wait_used(0) == [(head, 16)]
        block.start(RING_FEATURES)  # a reset brings it back
        assert (await request(block, T_IN, 0, read=512))[0] == S_OK


class StuckFlush:
    """Patches CowDisk.flush to hang, like an fdatasync on a stalled disk, until ``release``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered, self.gate = threading.Event(), threading.Event()
        monkeypatch.setattr(CowDisk, "flush", self._flush)

    def _flush(self) -> None:
        self.entered.set()
        assert self.gate.wait(10)

    async def wait_entered(self) -> None:
        with anyio.fail_after(3):
            while not self.entered.is_set():
                await anyio.sleep(0.001)


def submit_flush(driver: Driver) -> tuple[int, int]:
    """Post a FLUSH request without waiting; returns its head and the address of its status."""
    status = driver.alloc(1, b"\xff")
    header = driver.alloc(16, struct.pack("<IIQ", T_FLUSH, 0, 0))
    return driver.submit(0, [(header, 16, False), (status, 1, True)]), status


@pytest.mark.anyio
async def test_a_stuck_flush_holds_up_only_its_own_device(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flush = StuckFlush(monkeypatch)
    block, rng = Driver(VirtioBlock(base)), Driver(VirtioRng())
    block.start(RING_FEATURES)
    rng.start(RING_FEATURES)
    async with running(block, rng):
        head, status = submit_flush(block)
        await flush.wait_entered()
        for _ in range(3):  # the event loop and the other device carry on
            rng_head = rng.submit(0, [(rng.alloc(16), 16, True)])
            assert await rng.wait_used(0) == [(rng_head, 16)]
        assert block.read(0x070) & STATUS_DRIVER_OK  # registers answer: no lock is held over I/O
        assert block.take_used(0) == []
        flush.gate.set()
        assert await block.wait_used(0) == [(head, 1)]
    assert block.memory.read(status, 1)[0] == S_OK


@pytest.mark.anyio
async def test_stopping_or_resetting_waits_for_the_request_in_flight(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flush = StuckFlush(monkeypatch)
    driver = Driver(VirtioBlock(base))
    driver.start(RING_FEATURES)
    async with anyio.create_task_group() as tg:
        tg.start_soon(driver.transport.run)
        submit_flush(driver)
        await flush.wait_entered()
        tg.cancel_scope.cancel()  # a stop, or a snapshot's quiesce
        threading.Timer(0.1, flush.gate.set).start()
    assert flush.gate.is_set()
    queue = driver.transport.save_state().queues[0]
    assert queue.next_avail == queue.next_used == driver.used_idx(0) == 1

    flush.entered.clear()
    flush.gate.clear()
    async with running(driver):
        submit_flush(driver)
        await flush.wait_entered()
        # §2.4: the driver's reset (a vCPU's register write) returns after the request in flight,
        # whose completion is then dropped: the driver has forgotten the ring.
        reset = threading.Thread(target=driver.write, args=(0x070, 0))
        reset.start()
        reset.join(0.1)
        assert reset.is_alive()
        flush.gate.set()
        reset.join(3)
        assert not reset.is_alive()
    assert driver.used_idx(0) == 1 and driver.read(0x070) == 0


def test_restore_onto_another_disk_is_refused(base: Path, tmp_path: Path) -> None:
    driver = Driver(VirtioBlock(base))
    driver.start(RING_FEATURES)
    state = driver.transport.save_state()
    smaller = tmp_path / "small.img"
    smaller.write_bytes(bytes(DISK_SIZE // 2))
    with pytest.raises(BundleError, match="does not match"):
        Driver(VirtioBlock(smaller), driver.memory).transport.restore_state(state)
    with pytest.raises(BundleError, match="does not match"):
        Driver(VirtioBlock(base, read_only=True), driver.memory).transport.restore_state(state)


views = st.lists(st.binary(max_size=40).map(lambda b: memoryview(bytearray(b))), max_size=4).map(tuple)


@settings(max_examples=500, deadline=None)
@given(readable=views, writable=views)
def test_any_chain_parses_to_a_request_or_queue_error(readable, writable) -> None:
    try:
        request = parse_request(DescriptorChain(0, readable, writable))
    except QueueError:
        assert not any(len(v) for v in writable)
        return
    assert len(request.status) == 1
    assert sum(map(len, request.data)) <= sum(map(len, readable + writable))


@pytest.mark.parametrize("seekable", [True, False])
def test_export_to_a_stream_keeps_the_trailing_hole(tmp_path: Path, seekable: bool) -> None:
    class Stream(io.BytesIO):
        def seekable(self) -> bool:
            return seekable

    sparse = tmp_path / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(3 << 20)
    disk = CowDisk(sparse, None, read_only=False)
    disk.write_from(512, [memoryview(b"\x7f" * 512)])
    out = Stream()
    out.write(b"prefix")
    disk.export(out)
    disk.close()
    assert out.getvalue() == b"prefix" + bytes(512) + b"\x7f" * 512 + bytes((3 << 20) - 1024)
