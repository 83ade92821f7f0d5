"""Device kinds: for each, its configuration parameters and its saved-state payload.

Adding a device kind is one ``_kind(...)`` line here. Virtio kinds save the virtio-mmio
transport state followed by their own payload.
"""

from __future__ import annotations

from dataclasses import dataclass

from construct import (
    Bytes,
    Construct,
    Enum,
    FocusedSeq,
    GreedyBytes,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    Mapping,
    PascalString,
    Pass,
    Prefixed,
    PrefixedArray,
    Struct,
    Switch,
    Terminated,
    this,
)

from .limits import bounded

MAX_QUEUES = 1024
MAX_FIFO = 1 << 16
MAX_DEVICE_STATE = 1 << 24

# A u8 that is 0 or 1: construct's Flag would read any other byte as True.
Bool = Mapping(Int8ul, {False: 0, True: 1})

VirtqueueState = Struct(
    "size" / Int16ul,
    "ready" / Bool,
    "event_idx" / Bool,
    "desc_addr" / Int64ul,
    "avail_addr" / Int64ul,
    "used_addr" / Int64ul,
    "next_avail" / Int16ul,
    "next_used" / Int16ul,
)

VirtioMmioState = Struct(
    "device_id" / Int32ul,
    "status" / Int32ul,
    "device_features" / Int64ul,
    "driver_features" / Int64ul,
    "device_features_sel" / Int32ul,
    "driver_features_sel" / Int32ul,
    "queue_sel" / Int32ul,
    "interrupt_status" / Int32ul,
    "config_generation" / Int32ul,
    "queues" / PrefixedArray(bounded(Int16ul, MAX_QUEUES), VirtqueueState),
)


def _virtio(payload: Construct) -> Construct:
    return Struct("transport" / VirtioMmioState, "device" / payload)


_Serial = PascalString(bounded(Int8ul, 20), "ascii")
_Mac = Bytes(6)


@dataclass(frozen=True)
class DeviceKind:
    """One device kind: its wire code, configuration parameters and saved state."""

    code: int
    params: Construct
    state: Construct
    virtio_id: int | None = None  # the virtio device id its saved transport must carry


DEVICE_KINDS: dict[str, DeviceKind] = {}


def _kind(name: str, code: int, params: Construct, state: Construct, virtio_id: int | None = None) -> None:
    DEVICE_KINDS[name] = DeviceKind(code, params, state, virtio_id)


_kind(
    "uart16550",
    1,
    Pass,
    Struct(
        *[name / Int8ul for name in ("dll", "dlm", "ier", "iir", "fcr", "lcr", "mcr", "lsr", "msr", "scr")],
        "thre_pending" / Bool,
        "rx" / Prefixed(bounded(Int32ul, MAX_FIFO), GreedyBytes),
    ),
)
_kind(
    "i8042",
    2,
    Pass,
    Struct(
        "status" / Int8ul,
        "control" / Int8ul,
        "output_port" / Int8ul,
        "pending_command" / Int8ul,
        "output_buffer" / Prefixed(bounded(Int32ul, MAX_FIFO), GreedyBytes),
    ),
)
_kind("acpi-pm", 3, Pass, Struct("pm1_status" / Int16ul, "pm1_enable" / Int16ul, "pm1_control" / Int16ul))
_kind(
    "virtio-blk",
    4,
    Struct("disk" / Int32ul, "read_only" / Bool, "serial" / _Serial),
    _virtio(Struct("capacity_sectors" / Int64ul, "read_only" / Bool, "serial" / _Serial)),
    virtio_id=2,
)
_kind("virtio-net", 5, Struct("mac" / _Mac), _virtio(Struct("mac" / _Mac)), virtio_id=1)
_kind("virtio-console", 6, Pass, _virtio(Struct("ports" / Int32ul)), virtio_id=3)
_kind("virtio-rng", 7, Pass, _virtio(Pass), virtio_id=4)

DeviceKindCode = Enum(Int16ul, **{name: kind.code for name, kind in DEVICE_KINDS.items()})

BUS_PIO = "pio"
BUS_MMIO = "mmio"

DeviceConfig = Struct(
    "kind" / DeviceKindCode,
    "bus" / Enum(Int8ul, pio=1, mmio=2),
    "base" / Int64ul,
    "size" / Int64ul,
    "gsi" / Int32ul,
    "params" / Switch(this.kind, {name: kind.params for name, kind in DEVICE_KINDS.items()}),
)

# One saved device: the instance index tells apart devices of the same kind, in config order.
DeviceRecord = Struct(
    "kind" / DeviceKindCode,
    "instance" / Int16ul,
    "state"
    / Prefixed(
        bounded(Int32ul, MAX_DEVICE_STATE),
        Switch(
            this.kind,
            {name: FocusedSeq("state", "state" / kind.state, Terminated) for name, kind in DEVICE_KINDS.items()},
            default=GreedyBytes,  # an unknown kind: refused by the checks, by name
        ),
    ),
)
