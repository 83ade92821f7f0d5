"""The copy-on-write disk against a model: random writes and reads, then reopened."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from smolvmm.devices.virtio.cow import CLUSTER_SIZE, CowDisk

DISK = 16 * CLUSTER_SIZE + 1536  # ends in a partial cluster
BASE = bytes((i * 7 + i // 4096) & 0xFF for i in range(DISK))
ranges = st.integers(0, DISK - 1).flatmap(lambda start: st.tuples(st.just(start), st.integers(1, DISK - start)))
cuts = st.lists(st.integers(0, DISK), max_size=3)


def scatter_list(buffer: bytearray, at: list[int]) -> list[memoryview]:
    """``buffer`` as views cut at ``at`` (as a guest's descriptors would cut it)."""
    edges = sorted({0, len(buffer), *(c % (len(buffer) + 1) for c in at)})
    view = memoryview(buffer)
    return [view[a:b] for a, b in zip(edges, edges[1:])]


@settings(max_examples=150, deadline=None)
@given(
    writes=st.lists(st.tuples(ranges, st.integers(0, 255), cuts), max_size=12),
    reads=st.lists(st.tuples(ranges, cuts), min_size=1, max_size=6),
)
def test_cow_disk_reads_what_a_flat_disk_would(writes, reads) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.write_bytes(BASE)
        overlay = Path(tmp) / "overlay"
        model = bytearray(BASE)
        disk = CowDisk(base, overlay, read_only=False)
        for (start, length), fill, at in writes:
            data = bytearray([fill]) * length
            disk.write_from(start, scatter_list(data, at))
            model[start : start + length] = data
        for (start, length), at in reads:
            got = bytearray(length)
            disk.read_into(start, scatter_list(got, at))
            assert got == model[start : start + length]
        disk.close()
        reopened = CowDisk(base, overlay, read_only=True)
        whole = bytearray(DISK)
        reopened.read_into(0, [memoryview(whole)])
        reopened.close()
        assert whole == model
        assert base.read_bytes() == BASE
