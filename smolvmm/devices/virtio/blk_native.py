"""virtio-blk's reads and writes served in C (``blk.c``), a queue's worth of requests per call.

In the nested machine Python runs 10-30x slower than natively, and at queue depth 32 the
Python per request (taking the chain, parsing it, the overlay lookup, the used element) was the
whole gap to QEMU (BENCHMARKS.md, "Random 4 KiB IOPS"). The C does exactly what the Python path
does, with the same checks and the same error text, and releases the GIL while it works; FLUSH
and GET_ID stay in Python (``VirtioBlock._handle``). Built like the page scanner
(``smolformat.native``); where it cannot be built, the Python path serves every request.
"""

from __future__ import annotations

import functools
import logging
import os
from importlib import resources
from typing import Any

from smolformat.native import compiled
from smolvmm.devices.virtio.cow import CowLayout
from smolvmm.devices.virtio.queue import Queue, QueueError
from smolvmm.host.memory import GuestMemory

PYTHON_NEXT, BROKEN = 1, -1  # smol_blk_run's outcomes besides 0 (the batch is done)
_log = logging.getLogger(__name__)


@functools.cache
def native_module() -> Any | None:
    """The compiled request loop (built on first call), or None where it cannot be built; set
    ``SMOLVMM_BLK_PYTHON=1`` to serve every request in Python."""
    if os.environ.get("SMOLVMM_BLK_PYTHON"):
        return None
    source = resources.files(__package__).joinpath("blk.c").read_text()
    return compiled("_smolvmm_blk", source[source.index("/* cdef:") : source.index("/* cdef end */")], source)


class NativeRequests:
    """One driver session's request queue served by ``smol_blk_run`` (a ``session.Batch``)."""

    def __init__(self, module: Any, memory: GuestMemory, disk: CowLayout, capacity: int, read_only: bool) -> None:
        ffi = module.ffi
        self._lib = module.lib
        self._regions = ffi.new("struct smol_region[]", len(memory.regions))
        for slot, region in zip(self._regions, memory.regions):
            slot.gpa, slot.size = region.gpa, region.size
            slot.host = ffi.cast("uint8_t *", region.host_address)
        self._bitmap = ffi.from_buffer("uint8_t[]", disk.bitmap)
        self._dirty = ffi.from_buffer("uint8_t[]", disk.dirty_pages)
        b = self._state = ffi.new("smol_blk *")
        b.regions, b.nregions = self._regions, len(memory.regions)
        b.base_fd, b.overlay_fd, b.read_only = disk.base, disk.overlay, read_only
        b.disk_size, b.capacity_sectors, b.data_offset = disk.size, capacity, disk.data_offset
        b.bitmap, b.dirty = self._bitmap, self._dirty
        self._ffi = ffi

    def start(self, queue: Queue) -> None:
        b = self._state
        b.desc_addr, b.avail_addr, b.used_addr = queue.desc_addr, queue.avail_addr, queue.used_addr
        b.size, b.indirect = queue.size, queue.indirect
        b.next_avail, b.next_used = queue.next_avail, queue.next_used
        b.completed = b.io_errors = b.stop = 0

    def run(self) -> bool:
        b = self._state
        outcome = self._lib.smol_blk_run(b)
        if b.io_errors:
            code = b.io_errno
            more = f" ({b.io_errors} requests)" if b.io_errors > 1 else ""
            _log.warning("virtio-blk I/O error: [Errno %d] %s%s", code, os.strerror(code), more)
        if outcome == BROKEN:
            raise QueueError(self._ffi.string(b.error).decode())
        return bool(outcome == PYTHON_NEXT)

    def finish(self, queue: Queue) -> int:
        b = self._state
        queue.next_avail, queue.next_used = b.next_avail, b.next_used
        return int(b.completed)

    def cancel(self) -> None:
        """Stop after the request in hand, not publishing it (a reset, from another thread)."""
        self._state.stop = 1
