"""Split virtqueues (virtio 1.x §2.7): descriptor chains, ring indices, notification suppression.

Everything here is pure and synchronous: it reads and writes guest memory and nothing else,
so property tests can drive it with arbitrary rings. Every guest-supplied address, length and
index is checked; a malformed queue raises :class:`QueueError` and nothing else.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

from smolvmm.errors import GuestError, GuestMemoryError
from smolvmm.host.memory import GuestMemory

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
DESC_SIZE = 16
USED_ELEM_SIZE = 8
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")
_NO_RING = memoryview(b"")  # a queue's rings before ``validate``: any access fails, none lands in guest RAM
_FENCE = threading.Lock()


class QueueError(GuestError):
    """The driver put something malformed in a virtqueue; the device needs a reset."""


@dataclass(frozen=True)
class DescriptorChain:
    """One available buffer: its head index and its device-readable then device-writable parts.

    Each part is a view into guest RAM that has already been bounds-checked.
    """

    head: int
    readable: tuple[memoryview, ...]
    writable: tuple[memoryview, ...]


@dataclass(frozen=True)
class QueueState:
    """The saved state of one virtqueue (plain data; see ``Queue.restore``).

    Interrupts are decided in the same step that writes used elements, so at a save point every
    used element has been signalled (or suppressed) and ``next_used`` is all there is to keep.
    """

    size: int
    ready: bool
    event_idx: bool
    desc_addr: int
    avail_addr: int
    used_addr: int
    next_avail: int
    next_used: int


def _checked_view(memory: GuestMemory, addr: int, length: int, what: str) -> memoryview:
    try:
        return memory.view(addr, length)
    except GuestMemoryError as exc:
        raise QueueError(f"{what} {addr:#x}+{length:#x} is outside guest RAM") from exc


def parse_chain(memory: GuestMemory, desc_addr: int, queue_size: int, head: int, indirect: bool) -> DescriptorChain:
    """Walk the descriptor chain starting at ``head`` (§2.7.5) and return its buffers.

    A chain holds at most ``queue_size`` buffer descriptors, direct and indirect together (a
    longer walk is a loop or a driver bug), readable descriptors must precede writable ones
    (§2.7.4.2), and an indirect table (§2.7.5.3) may only be reached once and only when
    ``indirect`` (VIRTIO_F_INDIRECT_DESC) was negotiated.
    """
    if not 0 <= head < queue_size:
        raise QueueError(f"descriptor head {head} is beyond the queue size {queue_size}")
    # The queue's table was checked to lie in guest RAM when the queue became ready (``validate``),
    # an indirect one is checked below: each is one view, its descriptors unpacked from it.
    table = _checked_view(memory, desc_addr, queue_size * DESC_SIZE, "descriptor table")
    table_size, index = queue_size, head
    # §2.7.5.3.1: "A driver MUST NOT create a descriptor chain longer than the Queue Size of the
    # device", indirect descriptors included. The spec bounds the chain, not the indirect table
    # (§2.7.5.3 only makes it len / 16 descriptors), so a larger table is accepted: it is checked
    # as one range and never copied, and a walk reads at most queue_size + 2 descriptors. The
    # descriptor pointing at the table does not count: Linux puts a whole queue's worth of
    # entries in one table (virtio-blk: seg_max = queue size - 2, plus header and status).
    ttl = queue_size
    in_indirect = False
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    while True:
        addr, length, flags, next_index = _DESC.unpack_from(table, index * DESC_SIZE)
        if flags & DESC_F_INDIRECT:
            if in_indirect:
                raise QueueError("nested indirect descriptor table")
            if not indirect:
                raise QueueError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
            # §2.7.5.3.1: the driver must not set NEXT together with INDIRECT.
            if flags & DESC_F_NEXT:
                raise QueueError("indirect descriptor also has NEXT set")
            if length == 0 or length % DESC_SIZE:
                raise QueueError(f"indirect table length {length} is not a multiple of 16")
            table = _checked_view(memory, addr, length, "indirect table")
            table_size, index = length // DESC_SIZE, 0
            in_indirect = True
            continue
        if ttl == 0:
            raise QueueError(f"descriptor chain is longer than the queue size {queue_size} (a loop?)")
        ttl -= 1
        try:  # inline, not _checked_view: this runs once per buffer of every request
            view = memory.view(addr, length)
        except GuestMemoryError as exc:
            raise QueueError(f"buffer {addr:#x}+{length:#x} is outside guest RAM") from exc
        if flags & DESC_F_WRITE:
            writable.append(view)
        elif writable:
            raise QueueError("device-readable descriptor after a device-writable one")
        else:
            readable.append(view)
        if not flags & DESC_F_NEXT:
            return DescriptorChain(head, tuple(readable), tuple(writable))
        if next_index >= table_size:
            raise QueueError(f"next descriptor {next_index} is beyond its table ({table_size})")
        index = next_index


# Memory ordering. The driver runs concurrently on other CPUs, so the device must see and make
# its ring accesses in this order:
#  1. load the available idx before the ring entries and descriptors it covers (the driver
#     writes them, then a barrier, then idx: §2.7.13.3);
#  2. store the buffer bytes and the used element before the used idx that publishes them
#     (§2.7.8.2: "The device MUST set len prior to updating the used idx");
#  3. store avail_event (or the used idx) before loading the available idx (or used_event and
#     the avail flags) to decide whether to sleep (or interrupt) (§2.7.7.2, §2.7.10);
#     otherwise a notification or an interrupt can be lost.
# Each access to guest RAM here is a separate C call (struct, memoryview, a syscall such as
# preadv), which neither the compiler nor the interpreter reorders, and the code issues them in
# the order above; the CPU may still reorder them. On x86-64 (TSO) loads are not reordered with
# loads, nor stores with stores, so 1 and 2 hold with no barrier, and only 3, a store before a
# load, needs ``_full_fence``. That is an x86-64 argument: arm64 reorders all four kinds, so 1
# would need a load barrier (dmb ishld), 2 a store barrier (dmb ishst) and 3 a dmb ish, which
# Python cannot issue. virtio is wired only on x86-64 KVM (vm.py); see docs/devices.md.


def _full_fence() -> None:
    """Order the ring store before it against the ring load after it (rule 3 above).

    Python has no fence. Taking an uncontended ``threading.Lock`` (a glibc semaphore) runs a
    ``lock cmpxchg``, which is a full barrier on x86-64; on arm64 the lock's acquire and release
    do not order an earlier store against a later load.
    """
    with _FENCE:
        pass


def _need_event(event: int, new: int, old: int) -> bool:
    """§2.7.7.2 / §2.7.10: has ``event`` been passed going from ``old`` to ``new`` (mod 2^16)?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class Queue:
    """One split virtqueue as the device sees it: addresses set by the driver, indices kept here."""

    def __init__(self, max_size: int) -> None:
        if not _is_power_of_two(max_size) or max_size > 32768:
            raise ValueError(f"queue size {max_size} must be a power of two <= 32768")
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset (§2.4)."""
        self.size = self.max_size
        self.ready = False
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.next_avail = self.next_used = self.signalled_used = 0
        self.event_idx = self.indirect = False
        self._avail = self._used = _NO_RING

    def validate(self, memory: GuestMemory) -> None:
        """Check the size and that the three rings are aligned and inside guest RAM (§2.7), and
        keep a view of each ring: their addresses only change while the queue is not ready, and
        every ring access then goes through these views (one lookup per queue, not per access)."""
        if not _is_power_of_two(self.size) or self.size > self.max_size:
            raise QueueError(f"queue size {self.size} is not a power of two <= {self.max_size}")
        views = []
        for addr, align, length, what in (
            (self.desc_addr, 16, DESC_SIZE * self.size, "descriptor table"),
            (self.avail_addr, 2, 6 + 2 * self.size, "available ring"),
            (self.used_addr, 4, 6 + USED_ELEM_SIZE * self.size, "used ring"),
        ):
            if addr % align:
                raise QueueError(f"{what} at {addr:#x} is not {align}-byte aligned")
            views.append(_checked_view(memory, addr, length, what))
        self._avail, self._used = views[1], views[2]

    def set_ring_features(self, event_idx: bool, indirect: bool) -> None:
        """Record the negotiated VIRTIO_F_EVENT_IDX and VIRTIO_F_INDIRECT_DESC (at FEATURES_OK)."""
        self.event_idx, self.indirect = event_idx, indirect

    def avail_index(self) -> int:
        """The driver's available index: how many chains it has made available, mod 2^16."""
        index: int = _U16.unpack_from(self._avail, 2)[0]
        return index

    def pending(self) -> int:
        """How many chains the driver made available that the device has not taken yet."""
        count = (self.avail_index() - self.next_avail) & 0xFFFF
        if count > self.size:
            raise QueueError(f"available index ran {count} entries ahead of a {self.size}-entry queue")
        return count

    def pop(self, memory: GuestMemory) -> DescriptorChain | None:
        """Take the next available chain, or None when the ring is empty."""
        if not self.ready or self.pending() == 0:
            return None
        (head,) = _U16.unpack_from(self._avail, 4 + 2 * (self.next_avail % self.size))
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return parse_chain(memory, self.desc_addr, self.size, head, self.indirect)

    def undo_pop(self) -> None:
        """Give back the chain the last ``pop`` took (the device could not use it yet)."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def add_used(self, head: int, length: int) -> None:
        """Write the used element for a chain; the driver sees it after ``publish_used``."""
        _USED_ELEM.pack_into(self._used, 4 + USED_ELEM_SIZE * (self.next_used % self.size), head, length)
        self.next_used = (self.next_used + 1) & 0xFFFF

    def publish_used(self) -> None:
        """Expose the used elements written so far by storing the used index after them (§2.7.8;
        ordered after them by x86-64's TSO, see the memory-ordering note above)."""
        _U16.pack_into(self._used, 2, self.next_used)

    def enable_notification(self) -> bool:
        """Ask the driver to notify on the next buffer; True if buffers are already waiting.

        With VIRTIO_F_EVENT_IDX the device publishes avail_event (§2.7.10); without it the
        device never sets VIRTQ_USED_F_NO_NOTIFY, so there is nothing to do.
        """
        if not self.ready:
            return False
        if self.event_idx:
            _U16.pack_into(self._used, 4 + USED_ELEM_SIZE * self.size, self.next_avail)
        _full_fence()
        return self.pending() > 0

    def watch_avail(self) -> int:
        """Ask to be notified when the driver goes beyond its current available index (returned).

        Unlike ``enable_notification`` this asks for *new* chains even while some are waiting,
        for a device that needs more room than the available chains hold.
        """
        seen = self.avail_index()
        if self.event_idx:
            _U16.pack_into(self._used, 4 + USED_ELEM_SIZE * self.size, seen)
        _full_fence()
        return seen

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for the chains used since the last one (§2.7.7)."""
        old, self.signalled_used = self.signalled_used, self.next_used
        if old == self.next_used:
            return False
        _full_fence()
        if self.event_idx:
            (used_event,) = _U16.unpack_from(self._avail, 4 + 2 * self.size)
            return _need_event(used_event, self.next_used, old)
        return not _U16.unpack_from(self._avail, 0)[0] & AVAIL_F_NO_INTERRUPT

    def continue_from(self, memory: GuestMemory, next_avail: int) -> None:
        """Go on where another data path (the kernel's) left the ring: at its next available index
        and the used index it published; the driver has had its interrupts."""
        self.next_avail = next_avail & 0xFFFF
        self.next_used = self.signalled_used = memory.read_u16(self.used_addr + 2)

    def save(self) -> QueueState:
        return QueueState(
            self.size,
            self.ready,
            self.event_idx,
            self.desc_addr,
            self.avail_addr,
            self.used_addr,
            self.next_avail,
            self.next_used,
        )

    def restore(self, state: QueueState, memory: GuestMemory, event_idx: bool, indirect: bool) -> None:
        """Load saved state after checking it against the negotiated features and guest RAM."""
        for name in ("next_avail", "next_used"):
            if not 0 <= getattr(state, name) <= 0xFFFF:
                raise QueueError(f"saved queue {name} {getattr(state, name)} is not a 16-bit index")
        if state.event_idx != event_idx:
            raise QueueError("saved queue event-idx setting disagrees with the negotiated features")
        self.reset()
        self.set_ring_features(event_idx, indirect)
        self.size, self.desc_addr = state.size, state.desc_addr
        self.avail_addr, self.used_addr = state.avail_addr, state.used_addr
        self.next_avail, self.next_used = state.next_avail, state.next_used
        self.signalled_used = state.next_used
        if not _is_power_of_two(self.size) or self.size > self.max_size:
            raise QueueError(f"saved queue size {self.size} is not a power of two <= {self.max_size}")
        if state.ready:
            self.validate(memory)
            self.pending()
            if memory.read_u16(self.used_addr + 2) != self.next_used:
                raise QueueError("saved next_used disagrees with the used ring in guest RAM")
        self.ready = state.ready
