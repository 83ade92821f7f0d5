"""The virtio-mmio transport, version 2 (virtio 1.x §4.2.2), around one VirtioDevice.

Wiring (done by the monitor): map ``MMIO_SIZE`` bytes at some base, register ``irq_fd`` as a
KVM irqfd on the device's GSI, register each ``notify_fds[i]`` as a KVM ioeventfd at
``base + QUEUE_NOTIFY_OFFSET`` (4 bytes) with datamatch ``i``, and start ``run()`` in the
machine's task group. Registers are served synchronously from vCPU threads; the data plane runs
in ``run()``. Both sides share state under one ``threading.Lock``, but for InterruptStatus, a
``SharedWord`` the hypervisor may serve itself (``interrupt_words``): a guest takes two register
exits per interrupt, its read and its acknowledgement.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from smolvmm.devices.virtio.device import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, VirtioDevice, bit
from smolvmm.devices.virtio.queue import Queue, QueueError, QueueState
from smolvmm.devices.virtio.session import Session, drain_eventfd
from smolvmm.errors import BundleError
from smolvmm.host.memory import GuestMemory
from smolvmm.host.words import SharedWord

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

MMIO_SIZE = 0x1000
QUEUE_NOTIFY_OFFSET = 0x050
INTERRUPT_STATUS_OFFSET = 0x060
INTERRUPT_ACK_OFFSET = 0x064
CONFIG_OFFSET = 0x100
MAGIC = 0x74726976  # "virt"
VENDOR_ID = 0x4C4F4D53  # "SMOL"

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80
_STATUS_ALL = 0xCF

INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2

_EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MmioState:
    """Saved transport state; ``device`` is the device type's own state (or None)."""

    device_id: int
    status: int
    device_features: int
    driver_features: int
    device_features_sel: int
    driver_features_sel: int
    queue_sel: int
    interrupt_status: int
    config_generation: int
    queues: tuple[QueueState, ...]
    device: DataclassInstance | None


def _ring_features(features: int) -> tuple[bool, bool]:
    """(EVENT_IDX, INDIRECT_DESC) as accepted in ``features``."""
    return bool(features >> F_RING_EVENT_IDX & 1), bool(features >> F_RING_INDIRECT_DESC & 1)


class MmioTransport:
    """Registers, interrupts and the driver-session lifecycle of one virtio-mmio device."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory) -> None:
        self.device = device
        self.memory = memory
        self.irq_fd = os.eventfd(0, _EFD_FLAGS)
        self.notify_fds = tuple(os.eventfd(0, _EFD_FLAGS) for _ in device.queue_sizes)
        self._wake_fd = os.eventfd(0, _EFD_FLAGS)
        self._lock = threading.Lock()
        self._queues = [Queue(size) for size in device.queue_sizes]
        self._offered = device.features() | bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC)
        self._config = device.config()
        self._config_generation = 0
        self._session: Session | None = None
        self._interrupt_status = SharedWord()
        self._clear_registers()

    def _clear_registers(self) -> None:
        self._status = 0
        self._device_features_sel = self._driver_features_sel = 0
        self._driver_features = 0
        self._queue_sel = 0
        self._interrupt_status.put(0)

    def interrupt_words(self, base: int) -> list[tuple[int, int, bool]]:
        """InterruptStatus and InterruptACK at ``base`` as ``Bus.add_word`` takes them (address,
        word, clears), for a hypervisor to serve without this object; none where the word is Python's."""
        word = self._interrupt_status.address
        if not word:
            return []
        return [(base + INTERRUPT_STATUS_OFFSET, word, False), (base + INTERRUPT_ACK_OFFSET, word, True)]

    # --- register access (vCPU threads) -------------------------------------------------

    def mmio_read(self, offset: int, size: int) -> int:
        """Read a register or the device config space (§4.2.2)."""
        if offset >= CONFIG_OFFSET:
            start = offset - CONFIG_OFFSET
            return int.from_bytes(self._config[start : start + size].ljust(size, b"\0"), "little")
        if size != 4 or offset % 4:
            return 0
        with self._lock:
            return self._read_register(offset)

    def _read_register(self, offset: int) -> int:
        queue = self._selected_queue()
        match offset:
            case 0x000:
                return MAGIC
            case 0x004:
                return 2
            case 0x008:
                return self.device.device_id
            case 0x00C:
                return VENDOR_ID
            case 0x010:
                return self._offered >> (32 * self._device_features_sel) & 0xFFFFFFFF
            case 0x034:
                return queue.max_size if queue else 0
            case 0x044:
                return int(queue.ready) if queue else 0
            case 0x060:
                return self._interrupt_status.get()
            case 0x070:
                return self._status
            case 0x0B0 | 0x0B4 | 0x0B8 | 0x0BC:
                return 0xFFFFFFFF  # no shared memory regions: length and base read as -1
            case 0x0FC:
                return self._config_generation
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Write a register; config space is read-only for every device type offered here."""
        if offset >= CONFIG_OFFSET or size != 4 or offset % 4:
            return
        if offset == QUEUE_NOTIFY_OFFSET:
            # Normally KVM's ioeventfd catches this write before it reaches us.
            if value < len(self.notify_fds):
                os.eventfd_write(self.notify_fds[value], 1)
            return
        with self._lock:
            self._write_register(offset, value & 0xFFFFFFFF)

    def _write_register(self, offset: int, value: int) -> None:
        queue = self._selected_queue()
        configurable = queue is not None and not queue.ready and not self._status & STATUS_DRIVER_OK
        negotiating = not self._status & STATUS_FEATURES_OK
        match offset:
            case 0x014:
                self._device_features_sel = value
            case 0x020 if negotiating and self._driver_features_sel < 2:
                shift = 32 * self._driver_features_sel
                self._driver_features = self._driver_features & ~(0xFFFFFFFF << shift) | value << shift
            case 0x024:
                self._driver_features_sel = value
            case 0x030:
                self._queue_sel = value
            case 0x038 if queue is not None and configurable:
                queue.size = value
            case 0x044 if queue is not None and not (value & 1 and self._status & STATUS_DRIVER_OK):
                # A queue may be stopped at any time, but only enabled before DRIVER_OK, when
                # the session start validates it.
                queue.ready = bool(value & 1)
                if not queue.ready and self._session is not None:
                    self._session.queue_stopped()
            case 0x064:
                self._interrupt_status.clear(value)
            case 0x070:
                self._write_status(value)
            case 0x080 | 0x084 | 0x090 | 0x094 | 0x0A0 | 0x0A4 if queue is not None and configurable:
                self._write_queue_address(queue, offset, value)

    @staticmethod
    def _write_queue_address(queue: Queue, offset: int, value: int) -> None:
        name = {0x80: "desc_addr", 0x90: "avail_addr", 0xA0: "used_addr"}[offset & ~4]
        shift = 32 if offset & 4 else 0
        old = getattr(queue, name)
        setattr(queue, name, old & ~(0xFFFFFFFF << shift) | value << shift)

    def _selected_queue(self) -> Queue | None:
        return self._queues[self._queue_sel] if self._queue_sel < len(self._queues) else None

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        # §2.1.2: the driver must not clear a status bit but by a reset. One that tries keeps them,
        # so no queue is reconfigured under a live session (its rings were checked at DRIVER_OK).
        new = (value | self._status) & ~STATUS_NEEDS_RESET & _STATUS_ALL | self._status & STATUS_NEEDS_RESET
        if new & STATUS_FEATURES_OK and not self._status & STATUS_FEATURES_OK:
            # §2.2.2: refuse FEATURES_OK when the driver accepted anything not offered.
            if self._driver_features & ~self._offered or not self._driver_features & bit(F_VERSION_1):
                new &= ~STATUS_FEATURES_OK
            else:
                for queue in self._queues:
                    queue.set_ring_features(*_ring_features(self._driver_features))
        if new & STATUS_DRIVER_OK and not new & STATUS_FEATURES_OK:
            new &= ~STATUS_DRIVER_OK
        starting = new & STATUS_DRIVER_OK and not self._status & STATUS_DRIVER_OK
        self._status = new
        if starting:
            os.eventfd_write(self._wake_fd, 1)

    def _reset(self) -> None:
        """§4.2.2.1: writing 0 to Status resets the device, including every queue.

        Returns once a request in flight has finished (``Session.close``).
        """
        session, self._session = self._session, None
        self._clear_registers()
        for queue in self._queues:
            queue.reset()
        if session is not None:
            session.close()
            os.eventfd_write(self._wake_fd, 1)

    def config_changed(self) -> None:
        """The device's configuration changed (e.g. a restored clone's new MAC): serve the new
        one, change ConfigGeneration (§4.2.2.1, so a driver reading it sees the change) and, if a
        driver is live, send a configuration change notification (§2.3; InterruptStatus bit 1)."""
        with self._lock:
            self._config = self.device.config()
            self._config_generation = (self._config_generation + 1) & 0xFFFFFFFF
            if self._status & STATUS_DRIVER_OK:
                self._interrupt(INT_CONFIG_CHANGE)

    def _interrupt(self, bits: int = INT_USED_BUFFER) -> None:
        """Raise an interrupt; the caller holds the lock."""
        self._interrupt_status.set(bits)
        os.eventfd_write(self.irq_fd, 1)

    # --- data plane (event loop) --------------------------------------------------------

    async def run(self) -> None:
        """Serve driver sessions until cancelled; a malformed queue stops only this device.

        Cancellation is safe at any time: requests are completed between awaits (or waited
        for, when a device serves them in a thread), so every chain taken from a ring has its
        used element written when the task is cancelled.
        """
        while True:
            try:
                session = self._start_session()
            except QueueError as exc:
                self._needs_reset(exc)
                session = None
            if session is None:
                await anyio.wait_readable(self._wake_fd)
                drain_eventfd(self._wake_fd)
                continue
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.device.serve, session)
                    await self._wait_closed(session)
                    tg.cancel_scope.cancel()
            except* QueueError as group:
                self._needs_reset(group.exceptions[0])
            finally:
                self._end_session(session)
            self.device.reset()

    def _start_session(self) -> Session | None:
        with self._lock:
            ready = self._status & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET) == STATUS_DRIVER_OK
            if not ready or self._session is not None:
                return None
            for queue in self._queues:
                if queue.ready:
                    queue.validate(self.memory)
            self.device.activate(self._driver_features)
            self._session = Session(self.memory, self._queues, self.notify_fds, self._lock, self._interrupt)
            return self._session

    def _end_session(self, session: Session) -> None:
        """Forget ``session`` however it ended, so a restarted ``run()`` opens a new one."""
        with self._lock:
            session.closed = True
            if self._session is session:
                self._session = None

    async def _wait_closed(self, session: Session) -> None:
        while not session.closed:
            await anyio.wait_readable(self._wake_fd)
            drain_eventfd(self._wake_fd)

    def _needs_reset(self, exc: QueueError | ExceptionGroup[QueueError]) -> None:
        """§2.1.2: set DEVICE_NEEDS_RESET and tell the driver with a config-change interrupt."""
        _log.warning("virtio device %d needs reset: %s", self.device.device_id, exc)
        with self._lock:
            self._status |= STATUS_NEEDS_RESET
            if self._session is not None:
                self._session.closed = True
                self._session = None
            self._interrupt(INT_CONFIG_CHANGE)

    # --- state --------------------------------------------------------------------------

    def save_state(self) -> MmioState:
        """Transport, queue and device state; take it while ``run()`` is stopped."""
        with self._lock:
            return MmioState(
                self.device.device_id,
                self._status,
                self._offered,
                self._driver_features,
                self._device_features_sel,
                self._driver_features_sel,
                self._queue_sel,
                self._interrupt_status.get(),
                self._config_generation,
                tuple(q.save() for q in self._queues),
                self.device.save_state(),
            )

    def check_state(self, state: MmioState) -> None:
        """Refuse (BundleError) a saved ``state`` this device could not take, changing nothing:
        another device, other queue counts or sizes, features not offered, rings outside guest RAM."""
        if state.device_id != self.device.device_id:
            raise BundleError(f"saved virtio device {state.device_id} restored onto a {self.device.device_id}")
        if len(state.queues) != len(self._queues):
            raise BundleError(f"saved virtio device has {len(state.queues)} queues, not {len(self._queues)}")
        if state.status & ~_STATUS_ALL or state.interrupt_status & ~3:
            raise BundleError(f"saved virtio status {state.status:#x} is invalid")
        if state.driver_features & ~(self._offered & state.device_features):
            raise BundleError(f"saved virtio driver features {state.driver_features:#x} are not all offered here")
        if state.status & STATUS_FEATURES_OK and not state.driver_features & bit(F_VERSION_1):
            raise BundleError("saved virtio device negotiated features without VERSION_1")
        try:
            for queue, saved in zip(self._queues, state.queues):
                Queue(queue.max_size).restore(saved, self.memory, *_ring_features(self._negotiated(state)))
        except QueueError as exc:
            raise BundleError(f"saved virtqueue is invalid: {exc}") from exc
        self.device.restore_state(state.device)

    @staticmethod
    def _negotiated(state: MmioState) -> int:
        return state.driver_features if state.status & STATUS_FEATURES_OK else 0

    def restore_state(self, state: MmioState) -> None:
        """Check ``state`` against this device and guest RAM (``check_state``), then load it (before ``run()``)."""
        self.check_state(state)
        with self._lock:
            for queue, saved in zip(self._queues, state.queues):
                queue.restore(saved, self.memory, *_ring_features(self._negotiated(state)))
            self._status = state.status
            self._device_features_sel = state.device_features_sel
            self._driver_features_sel = state.driver_features_sel
            self._driver_features = state.driver_features
            self._queue_sel = state.queue_sel
            self._interrupt_status.put(state.interrupt_status)
            self._config_generation = state.config_generation
        os.eventfd_write(self._wake_fd, 1)

    def close(self) -> None:
        """Close the eventfds and the device's host resources."""
        for fd in (self.irq_fd, self._wake_fd, *self.notify_fds):
            os.close(fd)
        self.device.close()
