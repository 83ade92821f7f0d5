"""virtio-blk (virtio 1.x §5.2) over a copy-on-write disk.

Requests are parsed (is there a header, a status byte, where is the data?) separately from
being executed; I/O goes straight between the image files and guest RAM with preadv/pwritev.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from smolvmm.devices.virtio.blk_native import NativeRequests, native_module
from smolvmm.devices.virtio.buffers import gather, scatter, slice_views, total_length
from smolvmm.devices.virtio.cow import CowDisk
from smolvmm.devices.virtio.device import VirtioDevice, bit
from smolvmm.devices.virtio.queue import DescriptorChain, QueueError
from smolvmm.devices.virtio.session import Session

F_SIZE_MAX = 1
F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9

T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_BAD_HEADER = -1  # not a virtio type: the chain was too short to hold a header

S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

SECTOR_SIZE = 512
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # every request also needs a header and a status descriptor
SIZE_MAX = 1 << 20
MAX_DATA = SEG_MAX * SIZE_MAX  # the most a driver keeping to seg_max and size_max sends in one request
ID_BYTES = 20
_HEADER = struct.Struct("<IIQ")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockRequest:
    """A parsed request: its type, first sector, data buffers and status byte (§5.2.6)."""

    type: int
    sector: int
    data: tuple[memoryview, ...]
    status: memoryview


@dataclass(frozen=True)
class BlockState:
    """What a restored block device must match: the guest-visible size, writability and serial."""

    capacity_sectors: int
    read_only: bool
    serial: str


def parse_request(chain: DescriptorChain) -> BlockRequest:
    """Split a chain into a request (of type T_BAD_HEADER if the header is cut short).

    A chain without any device-writable byte cannot even be failed, so it is a QueueError.
    """
    writable = [v for v in chain.writable if len(v)]
    if not writable:
        raise QueueError("block request has no status byte")
    last = writable[-1]
    status = last[-1:]
    in_data = writable[:-1] + [last[:-1]] if len(last) > 1 else writable[:-1]
    header = gather(chain.readable, 0, _HEADER.size)
    if len(header) < _HEADER.size:
        return BlockRequest(T_BAD_HEADER, 0, (), status)
    type_, _, sector = _HEADER.unpack(header)
    if type_ in (T_IN, T_GET_ID):
        data = in_data
    else:
        data = slice_views(chain.readable, _HEADER.size, total_length(chain.readable))
    return BlockRequest(type_, sector, tuple(data), status)


class VirtioBlock(VirtioDevice):
    """A block device whose base image never changes; writes go to an overlay (see ``CowDisk``)."""

    device_id = 2
    queue_sizes = (QUEUE_SIZE,)

    def __init__(
        self,
        path: str | os.PathLike[str],
        read_only: bool = False,
        overlay: str | os.PathLike[str] | None = None,
        serial: str = "",
    ) -> None:
        self._disk = CowDisk(path, overlay, read_only)
        self.read_only = read_only
        self.capacity = self._disk.size // SECTOR_SIZE
        self._serial = serial.encode("ascii", "replace")[:ID_BYTES]

    def features(self) -> int:
        offered = bit(F_SIZE_MAX) | bit(F_SEG_MAX) | bit(F_BLK_SIZE) | bit(F_FLUSH)
        return offered | (bit(F_RO) if self.read_only else 0)

    def config(self) -> bytes:
        # capacity, size_max, seg_max, geometry (cylinders, heads, sectors: unused), blk_size
        return struct.pack("<QIIHBBI", self.capacity, SIZE_MAX, SEG_MAX, 0, 0, 0, SECTOR_SIZE)

    async def serve(self, session: Session) -> None:
        # In a worker thread: a read that misses the page cache, or FLUSH's fdatasync, may block
        # for as long as the host's storage takes; only this device waits for it. Reads and
        # writes are served in C where it could be built (``blk_native``), the rest here.
        module = native_module()
        if module is None:
            await session.process_in_thread(0, self._handle)
            return
        loop = NativeRequests(module, session.memory, self._disk.layout(), self.capacity, self.read_only)
        try:
            await session.process_in_thread(0, self._handle, loop)
        finally:
            loop.close()

    def _handle(self, chain: DescriptorChain) -> int:
        request = parse_request(chain)
        try:
            status, written = self._execute(request)
        except OSError as exc:
            _log.warning("virtio-blk I/O error: %s", exc)
            status, written = S_IOERR, 0
        request.status[0] = status
        return written + 1

    def _execute(self, request: BlockRequest) -> tuple[int, int]:
        """Run one request; returns its status and how many data bytes went to the guest."""
        if request.type == T_BAD_HEADER:
            return S_IOERR, 0
        length = total_length(request.data)
        if request.type in (T_IN, T_OUT):
            offset = request.sector * SECTOR_SIZE
            # A longer request (buffers repeating the same guest pages) is failed, not served: its
            # used length would not fit the used element's 32 bits.
            if length % SECTOR_SIZE or length > MAX_DATA or offset + length > self.capacity * SECTOR_SIZE:
                return S_IOERR, 0
            if request.type == T_IN:
                self._disk.read_into(offset, request.data)
                return S_OK, length
            # §5.2.6.2: a read-only device fails writes without writing anything.
            if self.read_only:
                return S_IOERR, 0
            self._disk.write_from(offset, request.data)
            return S_OK, 0
        if request.type == T_FLUSH:
            self._disk.flush()
            return S_OK, 0
        if request.type == T_GET_ID:
            # §5.2.6: 20 bytes, NUL-terminated only when shorter.
            return S_OK, scatter(request.data, 0, self._serial.ljust(ID_BYTES, b"\0"))
        return S_UNSUPP, 0

    def export(self, dest: str | os.PathLike[str] | BinaryIO) -> None:
        """Write base + overlay as one flat image (sparse where zero); call while quiesced."""
        self._disk.export(dest)

    def save_state(self) -> BlockState:
        return BlockState(self.capacity, self.read_only, self._serial.decode("ascii"))

    def close(self) -> None:
        self._disk.close()
