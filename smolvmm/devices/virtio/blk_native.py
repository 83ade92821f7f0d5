"""virtio-blk's reads and writes served in C (``blk.c``), which also waits for the driver's
notifications and decides the interrupts: Python runs only to raise one.

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
from pathlib import Path
from typing import Any

from smolformat.native import compiled
from smolvmm.devices.virtio.cow import CowLayout
from smolvmm.devices.virtio.queue import Queue, QueueError
from smolvmm.host.eventfd import EventFd
from smolvmm.host.memory import GuestMemory

BROKEN = -1  # smol_blk_serve on a malformed ring; its other outcomes are session.STOPPED, PYTHON_NEXT, INTERRUPT
_log = logging.getLogger(__name__)


@functools.cache
def native_module() -> Any | None:
    """The compiled request loop (built on first call), or None where it cannot be built; set
    ``SMOLVMM_BLK_PYTHON=1`` to serve every request in Python."""
    if os.environ.get("SMOLVMM_BLK_PYTHON"):
        return None
    source = Path(__file__).with_name("blk.c").read_text()
    return compiled("_smolvmm_blk", source[source.index("/* cdef:") : source.index("/* cdef end */")], source)


class NativeRequests:
    """One driver session's request queue served by ``smol_blk_serve`` (a ``session.NativeLoop``)."""

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
        self._wake = EventFd()
        b.wake_fd = self._wake.fd

    def start(self, queue: Queue, notify_fd: int, stop_fd: int) -> None:
        b = self._state
        b.desc_addr, b.avail_addr, b.used_addr = queue.desc_addr, queue.avail_addr, queue.used_addr
        b.size, b.indirect, b.event_idx = queue.size, queue.indirect, queue.event_idx
        b.next_avail, b.next_used, b.signalled_used = queue.next_avail, queue.next_used, queue.signalled_used
        b.notify_fd, b.stop_fd = notify_fd, stop_fd
        b.io_errors = b.stop = 0
        self._wake.take()

    def serve(self) -> tuple[int, bool]:
        """Serve until Python is needed: the outcome (STOPPED, PYTHON_NEXT or INTERRUPT; BROKEN
        raises QueueError) and whether an interrupt is due."""
        b = self._state
        outcome = self._lib.smol_blk_serve(b)
        if b.io_errors:
            code = b.io_errno
            more = f" ({b.io_errors} requests)" if b.io_errors > 1 else ""
            _log.warning("virtio-blk I/O error: [Errno %d] %s%s", code, os.strerror(code), more)
            b.io_errors = 0
        if outcome == BROKEN:
            raise QueueError(self._ffi.string(b.error).decode())
        return int(outcome), bool(b.interrupt_due)

    def finish(self, queue: Queue) -> None:
        """Hand the ring positions back to ``queue``."""
        b = self._state
        queue.next_avail, queue.next_used, queue.signalled_used = b.next_avail, b.next_used, b.signalled_used

    def cancel(self) -> None:
        """Stop after the request in hand, not publishing it, and stop waiting (a reset, from
        another thread)."""
        self._state.stop = 1
        self._wake.signal()

    def pause(self) -> None:
        """Return after the request in hand, having published it (the driver stopped the queue)."""
        self._wake.signal()

    def close(self) -> None:
        self._wake.close()
