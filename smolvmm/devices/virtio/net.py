"""virtio-net (virtio 1.x §5.1) over a host backend: a TAP interface or passt's stream socket.

With TAP, frames move straight between the file descriptor and guest RAM with readv/writev, or,
given vhost-net, in the host kernel without the monitor (its interrupts relayed, as virtio-mmio's
status register needs); the virtio_net_hdr_v1 the guest and the kernel exchange is the same 12
bytes on both sides, so checksum and TSO offloads pass through untouched. A backend without
offloads (a stream) gets only complete frames and is offered none of the offload features.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

import anyio

from smolvmm.devices.virtio.backend import VNET_HDR_SIZE, NetBackend
from smolvmm.devices.virtio.buffers import scatter
from smolvmm.devices.virtio.device import VirtioDevice, bit
from smolvmm.devices.virtio.queue import DescriptorChain, Queue
from smolvmm.devices.virtio.session import Session
from smolvmm.devices.virtio.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, Tap
from smolvmm.errors import ConfigError
from smolvmm.host.vhost import VhostNet

F_CSUM = 0
F_GUEST_CSUM = 1
F_MAC = 5
F_GUEST_TSO4 = 7
F_GUEST_TSO6 = 8
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_MRG_RXBUF = 15

RX, TX = 0, 1
NUM_BUFFERS_OFFSET = 10
# The largest frame a backend hands over: a 64 KiB TSO segment, its headers and the vnet header.
MAX_FRAME = VNET_HDR_SIZE + 65536 + 256
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetState:
    """The guest-visible identity a restored net device must keep: its MAC address."""

    mac: bytes


def random_mac() -> bytes:
    """A random unicast, locally administered MAC address."""
    first, *rest = os.urandom(6)
    return bytes([first & 0xFC | 0x02, *rest])


class VirtioNet(VirtioDevice):
    """A network card whose wire is ``backend`` (owned from here on: closed with the device)."""

    device_id = 1
    queue_sizes = (256, 256)

    def __init__(self, backend: NetBackend, mac: bytes | None = None, vhost: VhostNet | None = None) -> None:
        if mac is not None and (len(mac) != 6 or mac[0] & 1):
            backend.close()
            if vhost is not None:
                vhost.close()
            raise ConfigError(f"MAC {mac.hex(':')} is not a 6-byte unicast address")
        self.mac = mac or random_mac()
        self.backend = backend
        self.vhost = vhost  # given only with a Tap backend (monitor.usernet.open_vhost)
        self._accepted = 0
        self._merge = False
        self._frame = bytearray(MAX_FRAME)
        self._frame_length = 0  # a received frame waiting in _frame for guest buffers

    def features(self) -> int:
        offered = bit(F_MAC) | bit(F_MRG_RXBUF)
        offloads = self.backend.offloads
        # The HOST_* offloads need a backend that takes partial checksums and TSO frames (the
        # kernel's tap does), the GUEST_* ones a backend that hands us the same kind of frame.
        if self.backend.takes_offloads:
            offered |= bit(F_CSUM) | bit(F_HOST_TSO4) | bit(F_HOST_TSO6)
        if offloads & TUN_F_CSUM:
            offered |= bit(F_GUEST_CSUM)
        if offloads & TUN_F_TSO4:
            offered |= bit(F_GUEST_TSO4)
        if offloads & TUN_F_TSO6:
            offered |= bit(F_GUEST_TSO6)
        return offered

    def config(self) -> bytes:
        return self.mac

    def activate(self, features: int) -> None:
        self._accepted = features
        self._merge = bool(features & bit(F_MRG_RXBUF))
        offloads = 0
        # §5.1.3.1: the TSO features depend on GUEST_CSUM, and so does the kernel's TSO.
        if features & bit(F_GUEST_CSUM):
            offloads |= TUN_F_CSUM
            for feature, flag in ((F_GUEST_TSO4, TUN_F_TSO4), (F_GUEST_TSO6, TUN_F_TSO6)):
                if features & bit(feature):
                    offloads |= flag
        self.backend.set_offloads(offloads)

    def reset(self) -> None:
        self.backend.set_offloads(0)
        self._frame_length = 0

    async def serve(self, session: Session) -> None:
        if self.vhost is not None:
            try:
                await self._serve_in_kernel(session)
                return
            except OSError as exc:
                _log.warning("vhost-net failed (%s): frames go through the monitor from now on", exc)
                self.vhost.close()
                self.vhost = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._receive, session)
            tg.start_soon(self.backend.serve)
            await session.process(TX, self._transmit)

    async def _serve_in_kernel(self, session: Session) -> None:
        vhost, memory = self.vhost, session.memory
        assert vhost is not None and isinstance(self.backend, Tap)
        tap = self.backend.fd
        vhost.set_features(self._accepted & vhost.features)
        vhost.set_memory(memory.regions)

        def start(index: int, queue: Queue, kick: int, call: int) -> None:
            rings = (
                memory.host_address(queue.desc_addr),
                memory.host_address(queue.avail_addr),
                memory.host_address(queue.used_addr),
            )
            vhost.start_ring(index, queue.size, rings, queue.next_avail, kick, call)
            vhost.attach(index, tap)

        await session.serve_in_kernel(start, vhost.stop_ring)
        await anyio.sleep_forever()  # the session closed before the kernel took the queues

    async def _receive(self, session: Session) -> None:
        # Wait for guest buffers before waiting for frames: a readable backend with no buffers
        # to put frames in must not spin.
        while True:
            await session.wait_available(RX)
            if self._merge:
                if not self._frame_length:
                    await self.backend.wait_readable()
                if not self._receive_merged(session):
                    await session.wait_for_more(RX)
            else:
                await self.backend.wait_readable()
                session.fill(RX, self._receive_frame)

    def _receive_merged(self, session: Session) -> bool:
        """Move up to a queue's worth of frames into merged buffers; True once the backend has
        nothing to give or the batch is done, False when the ring lacks room for the next frame."""
        for _ in range(self.queue_sizes[RX]):
            if not self._frame_length:
                try:
                    length = self.backend.read_into([memoryview(self._frame)])
                except OSError as exc:
                    _log.debug("virtio-net dropped a received frame: %s", exc)
                    return True
                if length is None:
                    return True
                self._frame_length = length
            if not session.spread(RX, self._frame_length, self._scatter_frame):
                return False
            self._frame_length = 0
        return True

    def _scatter_frame(self, chains: list[DescriptorChain]) -> list[int]:
        # §5.1.6.4: with VIRTIO_NET_F_MRG_RXBUF a frame spans num_buffers chains.
        struct.pack_into("<H", self._frame, NUM_BUFFERS_OFFSET, len(chains))
        frame = memoryview(self._frame)[: self._frame_length]
        lengths = []
        for chain in chains:
            lengths.append(scatter(chain.writable, 0, frame))
            frame = frame[lengths[-1] :]
        return lengths

    def _receive_frame(self, chain: DescriptorChain) -> int | None:
        try:
            length = self.backend.read_into(chain.writable)
        except OSError as exc:
            _log.debug("virtio-net dropped a received frame: %s", exc)
            return 0
        if length is not None and length >= NUM_BUFFERS_OFFSET + 2:
            # §5.1.6.4: without VIRTIO_NET_F_MRG_RXBUF every frame fits one buffer; the kernel
            # leaves this field alone, so the device fills it in.
            scatter(chain.writable, NUM_BUFFERS_OFFSET, b"\x01\x00")
        return length

    def _transmit(self, chain: DescriptorChain) -> int:
        try:
            self.backend.write_from(chain.readable)
        except OSError as exc:
            _log.debug("virtio-net dropped a transmitted frame: %s", exc)
        return 0

    def save_state(self) -> NetState:
        return NetState(self.mac)

    def close(self) -> None:
        if self.vhost is not None:
            self.vhost.close()
        self.backend.close()
