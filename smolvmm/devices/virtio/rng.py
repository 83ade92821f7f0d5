"""virtio-rng, the entropy device (virtio 1.x §5.4): fills writable buffers from os.urandom."""

from __future__ import annotations

import os

from smolvmm.devices.virtio.buffers import total_length
from smolvmm.devices.virtio.device import VirtioDevice
from smolvmm.devices.virtio.queue import DescriptorChain
from smolvmm.devices.virtio.session import Session

# Entropy per request is capped so a guest cannot make the host allocate without bound (§5.4.6.1
# lets the device return fewer bytes than the buffer holds).
MAX_BYTES_PER_REQUEST = 64 * 1024


class VirtioRng(VirtioDevice):
    """An entropy source with one request queue and no features or configuration."""

    device_id = 4
    queue_sizes = (256,)

    def features(self) -> int:
        return 0

    def config(self) -> bytes:
        return b""

    async def serve(self, session: Session) -> None:
        await session.process(0, self._fill)

    @staticmethod
    def _fill(chain: DescriptorChain) -> int:
        budget = min(total_length(chain.writable), MAX_BYTES_PER_REQUEST)
        written = 0
        for view in chain.writable:
            n = min(len(view), budget - written)
            view[:n] = os.urandom(n)
            written += n
        return written
