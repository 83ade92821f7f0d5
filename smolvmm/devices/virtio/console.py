"""virtio-console (virtio 1.x §5.3), one port per device: port 0 is the guest's hvc0.

A second console is a second device, not VIRTIO_CONSOLE_F_MULTIPORT: no control queue, and
each port gets its own queues and interrupt.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import anyio

from smolvmm.devices.virtio.buffers import gather, scatter
from smolvmm.devices.virtio.device import VirtioDevice
from smolvmm.devices.virtio.ports import ConsolePort
from smolvmm.devices.virtio.queue import DescriptorChain
from smolvmm.devices.virtio.session import Session

RX, TX = 0, 1
RECEIVE_CHUNK = 4096
_ZEROS = bytes(RECEIVE_CHUNK)
# Output taken from one chain / one batch. Linux's hvc writes at most a page per chain; the caps
# stop a guest from making the host copy its whole RAM per descriptor.
MAX_CHAIN_BYTES = 64 * 1024
MAX_BATCH_BYTES = 256 * 1024


@dataclass(frozen=True)
class ConsoleState:
    """A saved console: how many ports the guest saw (always 1 here)."""

    ports: int


class VirtioConsole(VirtioDevice):
    """A single-port console whose host side is ``port``, which the device owns and closes."""

    device_id = 3
    queue_sizes = (256, 256)

    def __init__(self, port: ConsolePort) -> None:
        self.port = port
        self._input = memoryview(b"")
        self._output = bytearray()

    def features(self) -> int:
        return 0

    def config(self) -> bytes:
        # cols, rows (unused without VIRTIO_CONSOLE_F_SIZE), max_nr_ports, emerg_wr
        return struct.pack("<HHII", 0, 0, 1, 0)

    async def serve(self, session: Session) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._receive, session)
            await session.process(TX, self._take_output, self._send_output)

    async def _receive(self, session: Session) -> None:
        while True:
            # Input left from before a pause goes first.
            while self._input:
                await session.wait_available(RX)
                session.fill(RX, self._deliver)
            try:
                self._input = memoryview(await self.port.receive(RECEIVE_CHUNK))
            except anyio.EndOfStream:
                return  # the host closed its input; output keeps flowing

    def _deliver(self, chain: DescriptorChain) -> int | None:
        if not self._input:
            return None
        done = scatter(chain.writable, 0, self._input)
        self._input = self._input[done:]
        # Clear what an earlier, longer delivery left after this one's end in the same buffer (up to
        # RECEIVE_CHUNK bytes from its start: all of a Linux guest's page-sized buffers), so that
        # no old input (the agent's secrets) outlives its reading; virtio lets a device write past len.
        if done < RECEIVE_CHUNK:
            scatter(chain.writable, done, _ZEROS[: RECEIVE_CHUNK - done])
        return done

    def _take_output(self, chain: DescriptorChain) -> int | None:
        if len(self._output) >= MAX_BATCH_BYTES:
            return None
        self._output += gather(chain.readable, 0, MAX_CHAIN_BYTES)
        return 0

    async def _send_output(self) -> None:
        data, self._output = bytes(self._output), bytearray()
        if data:
            await self.port.send(data)

    def reset(self) -> None:
        self._input = memoryview(b"")
        self._output = bytearray()

    def save_state(self) -> ConsoleState:
        return ConsoleState(ports=1)

    def close(self) -> None:
        self.port.close()
