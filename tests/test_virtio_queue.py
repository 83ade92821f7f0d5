"""Split virtqueue parsing under arbitrary guest input (hypothesis) and on well-formed chains."""

from __future__ import annotations

import struct
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smolvmm.devices.virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DescriptorChain,
    Queue,
    QueueError,
    parse_chain,
)
from smolvmm.host.memory import GuestMemory

RAM = 32 << 20  # room for a 32768-entry queue and a 1M-entry (16 MiB) indirect table
DESC, AVAIL, USED, INDIRECT = 0x10000, 0x100000, 0x200000, 0x400000
QUEUE_SIZES = st.sampled_from([1 << k for k in range(16)])
memory = GuestMemory.anonymous([(0, RAM)])
_DESC = struct.Struct("<QIHH")

addresses = st.one_of(st.integers(0, RAM), st.integers(RAM - 64, RAM + 64), st.integers(0, 2**64 - 1))
descriptors = st.tuples(
    addresses,
    st.one_of(st.integers(0, 256), st.integers(0, 2**32 - 1)),
    st.integers(0, 0xFFFF) | st.sampled_from([0, 1, 2, 3, 4, 5, 6]),
    st.integers(0, 20),
)
# A buffer descriptor that passes the bounds checks.
plausible = st.tuples(
    st.integers(0, RAM - 0x1000), st.integers(0, 0x1000), st.sampled_from([0, DESC_F_WRITE]), st.integers(0, 20)
)
# A descriptor pointing at the indirect table area, with a plausible or a random length.
indirect_pointers = st.tuples(
    st.just(INDIRECT),
    st.integers(0, 1 << 16).map(lambda n: 16 * n) | st.integers(0, 2**32 - 1),
    st.integers(0, 0xFFFF).map(lambda f: f | DESC_F_INDIRECT),
    st.integers(0, 20),
)
# next fields 1, 2, ..., 65535, 0 (the longest a chain can run before it repeats itself)
_CHAIN = array("H", range(1, 0x10000)) + array("H", [0])


def _nexts(count: int, period: int) -> array:
    """``next`` = i + 1 within each run of ``period`` entries, the last pointing back to 0."""
    run = _CHAIN[: period - 1] + array("H", [0]) if period < 0x10000 else _CHAIN
    return (run * (count // len(run) + 1))[:count]


@st.composite
def tables(draw: st.DrawFn, max_entries: int, elements: st.SearchStrategy = descriptors) -> bytes:
    """A descriptor table of up to ``max_entries``: one descriptor repeated, its ``next`` fields
    forming one long chain (ending there or wrapping around), a loop or a constant, and a few
    random descriptors on top. So walks get long and tables large without drawing every entry."""
    count = draw(st.integers(1, max_entries) | st.just(max_entries))
    addr, length, flags, _ = draw(plausible | descriptors)
    if draw(st.booleans()):
        flags |= DESC_F_NEXT
    table = bytearray(_DESC.pack(addr, length, flags, 0) * count)
    shape = draw(st.sampled_from(["chain", "loop", "constant"]))
    if shape == "constant":
        nexts = array("H", [draw(st.integers(0, 0xFFFF))]) * count
    else:
        nexts = _nexts(count, 0x10000 if shape == "chain" else draw(st.integers(1, 0x10000)))
    memoryview(table).cast("H")[7::8] = nexts
    if shape == "chain" and draw(st.booleans()):
        _DESC.pack_into(table, 16 * (count - 1), addr, length, flags & ~DESC_F_NEXT, 0)
    for index, desc in draw(st.lists(st.tuples(st.integers(0, count - 1), elements), max_size=6)):
        _DESC.pack_into(table, 16 * index, *desc)
    return bytes(table)


def write_table(addr: int, descs: list[tuple[int, int, int, int]]) -> None:
    for i, (a, length, flags, nxt) in enumerate(descs):
        memory.write(addr + 16 * i, struct.pack("<QIHH", a, length, flags, nxt))


def check_chain(chain: DescriptorChain, queue_size: int) -> None:
    """A chain holds at most a queue's worth of buffers (§2.7.5.3.1), each a view into RAM."""
    assert len(chain.readable) + len(chain.writable) <= queue_size
    for view in chain.readable + chain.writable:
        assert view.obj is not None  # a live view into guest RAM, already bounds-checked


@settings(max_examples=1500, deadline=None)
@given(
    table=st.lists(descriptors | indirect_pointers, min_size=1, max_size=16),
    indirect_table=st.lists(descriptors, max_size=8),
    head=st.integers(0, 20),
    indirect=st.booleans(),
)
def test_random_descriptor_tables_give_a_chain_or_queue_error(table, indirect_table, head, indirect) -> None:
    write_table(DESC, table)
    write_table(INDIRECT, indirect_table)
    try:
        chain = parse_chain(memory, DESC, len(table), head, indirect)
    except QueueError:
        return
    check_chain(chain, len(table))


@settings(max_examples=600, deadline=None)
@given(
    queue_size=QUEUE_SIZES,
    table=tables(1 << 15, descriptors | indirect_pointers),
    indirect_table=tables(1 << 16),
    head=st.integers(0, 1 << 15),
    indirect=st.booleans(),
)
def test_large_tables_and_long_chains_give_a_chain_or_queue_error(
    queue_size, table, indirect_table, head, indirect
) -> None:
    head %= queue_size + 1  # mostly inside the queue
    memory.write(DESC, table)
    memory.write(INDIRECT, indirect_table)
    try:
        chain = parse_chain(memory, DESC, queue_size, head, indirect)
    except QueueError:
        return
    check_chain(chain, queue_size)


@settings(max_examples=1000, deadline=None)
@given(
    size=st.sampled_from([1, 2, 4, 8, 16]),
    table=st.lists(descriptors, min_size=16, max_size=16),
    ring=st.lists(st.integers(0, 0xFFFF), min_size=16, max_size=16),
    avail_idx=st.integers(0, 0xFFFF),
    next_avail=st.integers(0, 0xFFFF),
    pops=st.integers(1, 20),
)
def test_random_rings_pop_chains_or_raise_queue_error(size, table, ring, avail_idx, next_avail, pops) -> None:
    write_table(DESC, table)
    memory.write(AVAIL, struct.pack("<HH", 0, avail_idx) + struct.pack(f"<{len(ring)}H", *ring))
    queue = Queue(16)
    queue.size, queue.desc_addr, queue.avail_addr, queue.used_addr = size, DESC, AVAIL, USED
    queue.set_ring_features(event_idx=True, indirect=True)
    queue.validate(memory)
    queue.ready = True
    queue.next_avail = next_avail
    try:
        for _ in range(pops):
            chain = queue.pop(memory)
            if chain is None:
                assert queue.next_avail == avail_idx
                break
            check_chain(chain, size)
            queue.add_used(chain.head, 0)
            queue.publish_used()
    except QueueError:
        pass


@settings(max_examples=500, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 4096), st.booleans()), min_size=1, max_size=8),
    order=st.randoms(use_true_random=False),
    via_indirect=st.booleans(),
)
def test_well_formed_chain_is_parsed_exactly(lengths, order, via_indirect) -> None:
    lengths = sorted(lengths, key=lambda item: item[1])  # readable before writable
    slots = list(range(16))
    order.shuffle(slots)
    buffers = [(0x8000 + 0x1000 * i, n, w) for i, (n, w) in enumerate(lengths)]
    table_addr, indices = (INDIRECT, list(range(len(buffers)))) if via_indirect else (DESC, slots)
    for i, (gpa, n, writable) in enumerate(buffers):
        flags = (DESC_F_WRITE if writable else 0) | (DESC_F_NEXT if i + 1 < len(buffers) else 0)
        nxt = indices[i + 1] if i + 1 < len(buffers) else 0
        memory.write(table_addr + 16 * indices[i], struct.pack("<QIHH", gpa, n, flags, nxt))
    head = slots[0]
    if via_indirect:
        memory.write(DESC + 16 * head, struct.pack("<QIHH", INDIRECT, 16 * len(buffers), DESC_F_INDIRECT, 0))
    chain = parse_chain(memory, DESC, 16, head, indirect=True)
    assert chain.head == head
    got = [(len(v), False) for v in chain.readable] + [(len(v), True) for v in chain.writable]
    assert got == [(n, w) for _, n, w in buffers]


def test_loop_is_detected() -> None:
    write_table(DESC, [(0x8000, 1, DESC_F_NEXT, 1), (0x8000, 1, DESC_F_NEXT, 0)])
    with pytest.raises(QueueError, match="loop"):
        parse_chain(memory, DESC, 2, 0, indirect=False)


class CountingMemory(GuestMemory):
    """Guest memory that counts the views taken of it: one per descriptor, table or buffer."""

    views = 0

    def view(self, gpa: int, length: int) -> memoryview:
        self.views += 1
        return super().view(gpa, length)


@pytest.mark.parametrize("period", [1, 0x10000], ids=["looping", "65536-long"])
def test_1m_entry_indirect_table_costs_one_queue_of_descriptors(period: int) -> None:
    # A 256-entry queue used to walk such a table to its end: 1.3 s and 185 MB for the loop.
    entries = 1 << 20
    counting = CountingMemory.anonymous([(0, RAM)])
    table = bytearray(_DESC.pack(0x8000, 512, DESC_F_WRITE | DESC_F_NEXT, 0) * entries)
    memoryview(table).cast("H")[7::8] = _nexts(entries, period)
    counting.write(INDIRECT, table)
    counting.write(DESC, _DESC.pack(INDIRECT, 16 * entries, DESC_F_INDIRECT, 0))
    counting.views = 0
    with pytest.raises(QueueError, match="longer than the queue size 256"):
        parse_chain(counting, DESC, 256, 0, indirect=True)
    assert counting.views <= 2 + 257 + 256  # head and table, 257 descriptors, 256 buffers
    counting.close()


@pytest.mark.parametrize(
    ("direct", "in_table", "ok"), [(0, 256, True), (0, 257, False), (1, 255, True), (2, 255, False)]
)
def test_chain_length_counts_direct_and_indirect_buffers(direct: int, in_table: int, ok: bool) -> None:
    # §2.7.5.3.1: at most a queue's worth of descriptors; the table pointer itself does not count.
    direct_descs = [(0x8000, 1, DESC_F_NEXT, i + 1) for i in range(direct)]
    write_table(DESC, [*direct_descs, (INDIRECT, 16 * in_table, DESC_F_INDIRECT, 0)])
    write_table(INDIRECT, [(0x8000, 1, DESC_F_NEXT if i + 1 < in_table else 0, i + 1) for i in range(in_table)])
    if ok:
        check_chain(parse_chain(memory, DESC, 256, 0, indirect=True), 256)
    else:
        with pytest.raises(QueueError, match="longer than the queue size"):
            parse_chain(memory, DESC, 256, 0, indirect=True)


def test_nested_indirect_is_refused() -> None:
    write_table(DESC, [(INDIRECT, 16, DESC_F_INDIRECT, 0)])
    write_table(INDIRECT, [(INDIRECT, 16, DESC_F_INDIRECT, 0)])
    with pytest.raises(QueueError, match="nested"):
        parse_chain(memory, DESC, 1, 0, indirect=True)


@given(event=st.integers(0, 0xFFFF), old=st.integers(0, 0xFFFF), step=st.integers(1, 256))
def test_event_idx_interrupts_exactly_when_used_event_is_crossed(event, old, step) -> None:
    new = (old + step) & 0xFFFF
    queue = Queue(256)
    queue.size, queue.avail_addr, queue.used_addr = 256, AVAIL, USED
    queue.validate(memory)
    queue.event_idx, queue.signalled_used, queue.next_used = True, old, new
    memory.write_u16(AVAIL + 4 + 2 * 256, event)
    crossed = any((old + k) & 0xFFFF == event for k in range(step))
    assert queue.needs_interrupt() == crossed


@settings(max_examples=1000, deadline=None)
@given(
    size=QUEUE_SIZES,
    ready=st.booleans(),
    event_idx=st.booleans(),
    avail_flags=st.integers(0, 0xFFFF),
    avail_idx=st.integers(0, 0xFFFF),
    used_event=st.integers(0, 0xFFFF),
    next_avail=st.integers(0, 0xFFFF),
    signalled_used=st.integers(0, 0xFFFF),
    next_used=st.integers(0, 0xFFFF) | st.just(None),
)
def test_notification_decisions_on_random_rings(
    size, ready, event_idx, avail_flags, avail_idx, used_event, next_avail, signalled_used, next_used
) -> None:
    next_used = signalled_used if next_used is None else next_used
    queue = Queue(1 << 15)
    queue.size, queue.desc_addr, queue.avail_addr, queue.used_addr = size, DESC, AVAIL, USED
    queue.set_ring_features(event_idx, indirect=True)
    queue.validate(memory)
    queue.ready, queue.next_avail, queue.next_used, queue.signalled_used = ready, next_avail, next_used, signalled_used
    memory.write(AVAIL, struct.pack("<HH", avail_flags, avail_idx))
    memory.write_u16(AVAIL + 4 + 2 * size, used_event)
    avail_event = USED + 4 + 8 * size
    memory.write_u16(avail_event, next_avail ^ 0xFFFF)
    waiting = (avail_idx - next_avail) & 0xFFFF

    # enable_notification: publishes avail_event (§2.7.10), then says whether chains wait.
    if ready and waiting > size:
        with pytest.raises(QueueError):
            queue.enable_notification()
    else:
        assert queue.enable_notification() == (ready and waiting > 0)
    assert memory.read_u16(avail_event) == (next_avail if ready and event_idx else next_avail ^ 0xFFFF)

    # watch_avail asks for a notification past the current available index.
    assert queue.watch_avail() == avail_idx
    assert memory.read_u16(avail_event) == (avail_idx if event_idx else next_avail ^ 0xFFFF)

    # needs_interrupt (§2.7.7): once per batch of used elements, as the driver asked.
    if next_used == signalled_used:
        expected = False
    elif event_idx:
        expected = (used_event - signalled_used) & 0xFFFF < (next_used - signalled_used) & 0xFFFF
    else:
        expected = not avail_flags & 1
    assert queue.needs_interrupt() == expected
    assert queue.signalled_used == next_used
    assert not queue.needs_interrupt()


def test_a_queue_uses_the_rings_it_validated_and_none_before() -> None:
    """The ring addresses only change while a queue is not ready; a queue keeps the rings it
    checked, and one never checked reaches no guest memory at all."""
    unchecked = Queue(16)
    unchecked.used_addr = USED
    memory.write(USED, bytes(8))
    with pytest.raises(TypeError):
        unchecked.publish_used()
    assert memory.read(USED, 8) == bytes(8)

    queue = Queue(16)
    queue.desc_addr, queue.avail_addr, queue.used_addr = DESC, AVAIL, USED
    queue.validate(memory)
    queue.ready = True
    queue.used_addr = USED + 0x1000  # what a driver writing the register now would do; ignored
    memory.write(USED + 0x1000, bytes(12))  # (other tests of this module left rings there)
    queue.add_used(3, 512)
    queue.publish_used()
    assert struct.unpack_from("<HHII", memory.read(USED, 12)) == (0, 1, 3, 512)
    assert memory.read(USED + 0x1000, 12) == bytes(12)
