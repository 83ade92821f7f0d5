"""Deterministic example bundle contents, for tests, conformance vectors and benchmarks.

Values are plausible (a long-mode x86_64 vCPU, an arm64 vCPU at EL1) and full-sized (XSAVE area,
CPUID and MSR lists, GIC register lists), so round trips exercise real sizes.
"""

from __future__ import annotations

import random
from typing import Any

from construct import Construct

from . import arm64, x86_64
from .layout import PAGE_SIZE

MIB = 1 << 20


def _random_value(construct: Construct, rng: random.Random) -> Any:
    """A value for a fixed-size declaration, built from random bytes and parsed back."""
    return construct.parse(rng.randbytes(construct.sizeof()))


def x86_64_vcpu(vcpu_id: int, rng: random.Random | None = None) -> dict[str, Any]:
    """A full-sized x86_64 VcpuState."""
    rng = rng or random.Random(vcpu_id)
    return {
        "mp_state": {"mp_state": 0},
        "regs": _random_value(x86_64.KvmRegs, rng),
        "sregs": _random_value(x86_64.KvmSregs, rng),
        "fpu": _random_value(x86_64.KvmFpu, rng),
        "xsave": rng.randbytes(4096),
        "xcrs": _random_value(x86_64.KvmXcrs, rng),
        "debugregs": _random_value(x86_64.KvmDebugregs, rng),
        "lapic": {"regs": rng.randbytes(x86_64.KVM_APIC_REG_SIZE)},
        "tsc_khz": 2_400_000,
        "cpuid": [_random_value(x86_64.KvmCpuidEntry2, rng) for _ in range(60)],
        "msrs": [{"index": 0x4B564D00 + i, "reserved": 0, "data": rng.getrandbits(64)} for i in range(80)],
        "vcpu_events": _random_value(x86_64.KvmVcpuEvents, rng),
    }


def x86_64_vm_state(rng: random.Random | None = None) -> dict[str, Any]:
    """A full-sized x86_64 VmState."""
    rng = rng or random.Random(0)
    return {
        name: _random_value(getattr(x86_64, cls), rng)
        for name, cls in (
            ("pic_master", "KvmPicState"),
            ("pic_slave", "KvmPicState"),
            ("ioapic", "KvmIoapicState"),
            ("pit", "KvmPitState2"),
            ("clock", "KvmClockData"),
        )
    }


def arm64_vcpu(vcpu_id: int, rng: random.Random | None = None) -> dict[str, Any]:
    """A full-sized arm64 VcpuState."""
    rng = rng or random.Random(vcpu_id)
    return {
        "mp_state": 0,
        "core": _random_value(arm64.KvmRegs, rng),
        "sys_regs": [{"id": 0x6030_0000_0013_0000 + i, "value": rng.getrandbits(64)} for i in range(120)],
        "timers": [
            {
                "timer": arm64.TIMER_VIRTUAL,
                "cntvoff": rng.getrandbits(64),
                "ctl": 1,
                "cval": rng.getrandbits(64),
            },
            {"timer": arm64.TIMER_PHYSICAL, "cntvoff": 0, "ctl": 0, "cval": rng.getrandbits(64)},
        ],
        "gic_redistributor": [{"offset": 0x10000 + 4 * i, "value": rng.getrandbits(32)} for i in range(64)],
        "gic_cpu_sysregs": [{"id": 0x6030_0000_0013_C600 + i, "value": rng.getrandbits(64)} for i in range(16)],
    }


def arm64_vm_state(rng: random.Random | None = None) -> dict[str, Any]:
    """A full-sized arm64 VmState (a distributor with 128 interrupts)."""
    rng = rng or random.Random(0)
    return {
        "gic_nr_irqs": 128,
        "gic_distributor": [{"offset": 4 * i, "value": rng.getrandbits(32)} for i in range(256)],
        "gic_line_levels": [{"offset": intid, "value": rng.getrandbits(32)} for intid in range(32, 128, 32)],
    }


def _virtio(device_id: int, device: Any) -> dict[str, Any]:
    queue = {
        "size": 256,
        "ready": True,
        "event_idx": True,
        "desc_addr": 0x10_0000,
        "avail_addr": 0x10_1000,
        "used_addr": 0x10_2000,
        "next_avail": 7,
        "next_used": 7,
    }
    transport = {
        "device_id": device_id,
        "status": 15,
        "device_features": (1 << 32) | (1 << 29),
        "driver_features": 1 << 32,
        "device_features_sel": 1,
        "driver_features_sel": 1,
        "queue_sel": 0,
        "interrupt_status": 0,
        "config_generation": 0,
        "queues": [queue],
    }
    return {"transport": transport, "device": device}


def devices(disks: int = 1) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(config devices, device states): uart, i8042, acpi-pm, ``disks`` virtio-blk, net, console, rng."""
    config: list[dict[str, Any]] = [
        {"kind": "uart16550", "bus": "pio", "base": 0x3F8, "size": 8, "gsi": 4, "params": None},
        {"kind": "i8042", "bus": "pio", "base": 0x60, "size": 5, "gsi": 1, "params": None},
        {"kind": "acpi-pm", "bus": "pio", "base": 0x600, "size": 8, "gsi": 9, "params": None},
    ]
    states: list[dict[str, Any]] = [
        {
            "kind": "uart16550",
            "instance": 0,
            "state": {
                "dll": 1,
                "dlm": 0,
                "ier": 1,
                "iir": 1,
                "fcr": 0,
                "lcr": 3,
                "mcr": 8,
                "lsr": 0x60,
                "msr": 0xB0,
                "scr": 0,
                "thre_pending": False,
                "rx": b"ls\n",
            },
        },
        {
            "kind": "i8042",
            "instance": 0,
            "state": {
                "status": 0x1C,
                "control": 0x47,
                "output_port": 1,
                "pending_command": 0,
                "output_buffer": b"",
            },
        },
        {"kind": "acpi-pm", "instance": 0, "state": {"pm1_status": 0, "pm1_enable": 0x100, "pm1_control": 1}},
    ]
    base = 0xD000_0000
    virtio: list[tuple[str, int, dict[str, object] | None, dict[str, object] | None]] = [
        (
            "virtio-blk",
            2,
            {"disk": i, "read_only": False, "serial": f"disk{i}"},
            {"capacity_sectors": 2048, "read_only": False, "serial": f"disk{i}"},
        )
        for i in range(disks)
    ]
    virtio += [
        ("virtio-net", 1, {"mac": bytes.fromhex("020000000001")}, {"mac": bytes.fromhex("020000000001")}),
        ("virtio-console", 3, None, {"ports": 1}),
        ("virtio-rng", 4, None, None),
    ]
    counts: dict[str, int] = {}
    for slot, (kind, device_id, params, payload) in enumerate(virtio):
        config.append(
            {
                "kind": kind,
                "bus": "mmio",
                "base": base + slot * 0x1000,
                "size": 0x1000,
                "gsi": 5 + slot,
                "params": params,
            }
        )
        states.append({"kind": kind, "instance": counts.get(kind, 0), "state": _virtio(device_id, payload)})
        counts[kind] = counts.get(kind, 0) + 1
    return config, states


def machine_config(
    arch: str, ram: list[tuple[int, int]], device_config: list[dict[str, Any]], vcpus: int = 2
) -> dict[str, Any]:
    """A Config value."""
    return {
        "arch": arch,
        "vcpu_count": vcpus,
        "ram": [{"gpa": gpa, "size": size} for gpa, size in ram],
        "cmdline": "console=ttyS0 reboot=k panic=1 pci=off",
        "devices": device_config,
    }


def realistic_memory(size: int, seed: int = 1) -> bytearray:
    """Synthetic guest RAM: ~45% zero runs, page-cache-like duplicated runs, text/code, random pages."""
    rng = random.Random(seed)
    memory = bytearray(size)
    pages = size // PAGE_SIZE
    words = [b"the ", b"kernel ", b"init ", b"return ", b"struct ", b"\x48\x89\xe5", b"\x0f\x1f\x44\x00\x00"]
    text_pool = [b"".join(rng.choice(words) for _ in range(900))[:PAGE_SIZE].ljust(PAGE_SIZE, b"\0") for _ in range(64)]
    page = 0
    while page < pages:
        run = min(pages - page, rng.randint(1, 512))
        kind = rng.random()
        start = page * PAGE_SIZE
        if kind < 0.45:
            pass  # zero run
        elif kind < 0.6 and page > 2 * run:
            source = rng.randrange(0, page - run) * PAGE_SIZE
            memory[start : start + run * PAGE_SIZE] = memory[source : source + run * PAGE_SIZE]
        elif kind < 0.85:
            for i in range(run):
                memory[start + i * PAGE_SIZE : start + (i + 1) * PAGE_SIZE] = rng.choice(text_pool)
        else:
            memory[start : start + run * PAGE_SIZE] = rng.randbytes(run * PAGE_SIZE)
        page += run
    return memory
