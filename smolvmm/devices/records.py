"""Device state <-> smolformat device records (format/smolformat/devices.py).

The device models keep plain dataclasses; this module is the one place that knows how their
fields are named on disk. Restoring a record re-validates it in the device model itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from smolvmm.devices.uart import UartState
from smolvmm.devices.virtio.block import BlockState, VirtioBlock
from smolvmm.devices.virtio.console import ConsoleState, VirtioConsole
from smolvmm.devices.virtio.device import VirtioDevice
from smolvmm.devices.virtio.mmio import MmioState
from smolvmm.devices.virtio.net import NetState, VirtioNet
from smolvmm.devices.virtio.queue import QueueState
from smolvmm.devices.virtio.rng import VirtioRng
from smolvmm.errors import BundleError

VIRTIO_KINDS: dict[type[VirtioDevice], str] = {
    VirtioBlock: "virtio-blk",
    VirtioNet: "virtio-net",
    VirtioConsole: "virtio-console",
    VirtioRng: "virtio-rng",
}
_PAYLOADS = {"virtio-blk": BlockState, "virtio-net": NetState, "virtio-console": ConsoleState}
_UART_COMPUTED = {"iir": 0, "lsr": 0, "msr": 0}  # derived from the others; not restored


def uart_record(state: UartState) -> dict[str, Any]:
    return {**dataclasses.asdict(state), **_UART_COMPUTED}


def uart_state(record: Any) -> UartState:
    fields = {f.name: record[f.name] for f in dataclasses.fields(UartState)}
    state = UartState(**fields)
    try:
        state.validate()
    except ValueError as exc:
        raise BundleError(f"saved UART state is invalid: {exc}") from None
    return state


def virtio_record(state: MmioState) -> dict[str, Any]:
    transport = {f.name: getattr(state, f.name) for f in dataclasses.fields(MmioState) if f.name != "device"}
    transport["queues"] = [dataclasses.asdict(q) for q in state.queues]
    device = dataclasses.asdict(state.device) if state.device is not None else None
    return {"transport": transport, "device": device}


def virtio_state(kind: str, record: Any) -> MmioState:
    transport = record["transport"]
    queues = tuple(
        QueueState(**{f.name: q[f.name] for f in dataclasses.fields(QueueState)}) for q in transport["queues"]
    )
    payload_type = _PAYLOADS.get(kind)
    device = None
    if payload_type is not None:
        device = payload_type(**{f.name: record["device"][f.name] for f in dataclasses.fields(payload_type)})
    names = [f.name for f in dataclasses.fields(MmioState) if f.name not in ("queues", "device")]
    return MmioState(**{name: transport[name] for name in names}, queues=queues, device=device)
