"""Rules that tie sections together (spec §6); the reader and the writer both apply them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from construct import Container

from .devices import BUS_MMIO, BUS_PIO, DEVICE_KINDS
from .errors import FormatError, brief
from .layout import PAGE_SIZE
from .pages import Region
from .payloads import ARCHES


def ram_regions(config: Container) -> list[Region]:
    """The config's RAM regions, checked: page-aligned, non-empty, not overlapping."""
    if config.arch not in ARCHES:
        raise FormatError("unknown-arch", f"unknown architecture code {int(config.arch)}")
    if config.vcpu_count == 0:
        raise FormatError("bad-config", "the machine has no vCPU")
    regions = sorted((Region(r.gpa, r.size) for r in config.ram), key=lambda r: r.start)
    if not regions:
        raise FormatError("bad-config", "the machine has no RAM")
    previous_end = 0
    for region in regions:
        if region.start % PAGE_SIZE or region.size % PAGE_SIZE or region.size == 0:
            raise FormatError("bad-config", f"RAM region {region.start:#x}+{region.size:#x} is not page-aligned")
        if region.start < previous_end or region.end > 1 << 64:
            raise FormatError("bad-config", f"RAM region {region.start:#x}+{region.size:#x} overlaps or wraps")
        previous_end = region.end
    return regions


def check_working_set(regions: Sequence[Region], ranges: Sequence[Container]) -> None:
    """The working set's ranges are page-aligned, non-empty, in increasing order, apart, and each
    inside one RAM region (spec §9.1)."""
    previous_end = 0
    for item in ranges:
        start, pages = item.address, item.pages
        end = start + pages * PAGE_SIZE
        where = f"working-set range {start:#x}+{pages} pages"
        if start % PAGE_SIZE or not pages:
            raise FormatError("bad-working-set", f"{where} is not page-aligned or is empty")
        if start < previous_end:
            raise FormatError("bad-working-set", f"{where} is out of order or overlaps the one before")
        if not any(region.start <= start and end <= region.end for region in regions):
            raise FormatError("bad-working-set", f"{where} is not inside one RAM region")
        previous_end = end


def check_vcpu_ids(config: Container, ids: Iterable[int]) -> None:
    """There is exactly one vCPU state per vCPU id 0..vcpu_count-1."""
    seen: set[int] = set()
    for vcpu_id in ids:
        if vcpu_id in seen:
            raise FormatError("duplicate-vcpu", f"vCPU {vcpu_id} is saved twice")
        seen.add(vcpu_id)
    if seen != set(range(config.vcpu_count)):
        raise FormatError("vcpu-mismatch", f"saved vCPUs {brief(seen)} do not match vcpu_count {config.vcpu_count}")


def check_devices(config: Container, records: Sequence[Container]) -> list[int]:
    """Device states match the configured devices one for one; returns the disk numbers used."""
    for device in [*config.devices, *records]:
        if device.kind not in DEVICE_KINDS:
            raise FormatError("unknown-device-kind", f"unknown device kind code {int(device.kind)}")
    for device in config.devices:
        if device.bus not in (BUS_PIO, BUS_MMIO):
            raise FormatError("bad-config", f"device {device.kind} has unknown bus code {int(device.bus)}")
    if len(records) != len(config.devices):
        raise FormatError("device-mismatch", f"{len(records)} device states for {len(config.devices)} devices")
    counts: dict[str, int] = {}
    disks: list[int] = []
    for device, record in zip(config.devices, records):
        instance = counts.get(device.kind, 0)
        counts[device.kind] = instance + 1
        if record.kind != device.kind or record.instance != instance:
            raise FormatError(
                "device-mismatch",
                f"device state {record.kind}#{record.instance} does not match configured {device.kind}#{instance}",
            )
        virtio_id = DEVICE_KINDS[device.kind].virtio_id
        if virtio_id is not None and record.state.transport.device_id != virtio_id:
            raise FormatError(
                "device-mismatch",
                f"{device.kind}#{instance}'s saved transport is virtio device {record.state.transport.device_id}",
            )
        if device.kind == "virtio-blk":
            disks.append(device.params.disk)
    if sorted(disks) != list(range(len(disks))):
        raise FormatError(
            "device-mismatch", f"block devices use disks {brief(disks)}, not 0..{len(disks) - 1} once each"
        )
    return disks
