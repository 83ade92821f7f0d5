"""Split virtqueue parsing under arbitrary guest input (hypothesis) and on well-formed chains."""

from __future__ import annotations

import struct

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
from smolvmm.memory import GuestMemory

RAM = 0x20000
DESC, AVAIL, USED, INDIRECT = 0x1000, 0x2000, 0x3000, 0x4000
memory = GuestMemory.anonymous([(0, RAM)])

addresses = st.one_of(
    st.integers(0, RAM), st.integers(RAM - 64, RAM + 64), st.integers(0, 2**64 - 1)
)
descriptors = st.tuples(
    addresses,
    st.one_of(st.integers(0, 256), st.integers(0, 2**32 - 1)),
    st.integers(0, 0xFFFF) | st.sampled_from([0, 1, 2, 3, 4, 5, 6]),
    st.integers(0, 20),
)


def write_table(addr: int, descs: list[tuple[int, int, int, int]]) -> None:
    for i, (a, length, flags, nxt) in enumerate(descs):
        memory.write(addr + 16 * i, struct.pack("<QIHH", a, length, flags, nxt))


def check_chain(chain: DescriptorChain, limit: int) -> None:
    assert len(chain.readable) + len(chain.writable) <= limit
    for view in chain.readable + chain.writable:
        assert view.obj is not None  # a live view into guest RAM, already bounds-checked


@settings(max_examples=2000, deadline=None)
@given(
    table=st.lists(descriptors, min_size=1, max_size=16),
    indirect_table=st.lists(descriptors, max_size=8),
    head=st.integers(0, 20),
    indirect=st.booleans(),
)
def test_random_descriptor_tables_give_a_chain_or_queue_error(table, indirect_table, head, indirect) -> None:
    # Half the time point descriptors at a real indirect table so that path is reached often.
    table = [(INDIRECT, *d[1:]) if d[2] & DESC_F_INDIRECT and d[0] % 2 else d for d in table]
    write_table(DESC, table)
    write_table(INDIRECT, indirect_table)
    try:
        chain = parse_chain(memory, DESC, len(table), head, indirect)
    except QueueError:
        return
    check_chain(chain, len(table) + len(indirect_table))


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
            check_chain(chain, size + 16)
            queue.add_used(memory, chain.head, 0)
            queue.publish_used(memory)
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
    queue.event_idx, queue.signalled_used, queue.next_used = True, old, new
    memory.write_u16(AVAIL + 4 + 2 * 256, event)
    crossed = any((old + k) & 0xFFFF == event for k in range(step))
    assert queue.needs_interrupt(memory) == crossed
