"""Host-side restore against its floor: the same KVM ioctls for the same vCPUs and RAM from a minimal script.

Run: ``python bench/bench_restore_floor.py [--bundle PATH] [--runs 15]`` on a host with /dev/kvm (PVM
included: nothing enters the guest). Alternating, each in a fresh process:

- **smolvmm**: ``python -m smolvmm run --prepare-only --json BUNDLE``, its ``vm_vcpu_state`` phase (the
  restore's last): ms from the start of the restore (bundle opened) until every register, device
  and eventfd is in place, i.e. just before the first ``KVM_RUN``.
- **floor** (``--floor BUNDLE``, this file): every state blob is built from the bundle *before* the
  clock starts; then, timed: open the bundle, reserve RAM and map its extents ``MAP_PRIVATE`` as a
  restore does, and issue the restore's ioctls with ``fcntl.ioctl``: open /dev/kvm, check its API
  version and capabilities, create the VM (TSS, identity
  map, irqchip, PIT), the memory slot(s), the vCPUs (and their ``kvm_run`` mappings), PIT, clock and
  irqchip state, per vCPU CPUID, MP state, registers, special registers, XSAVE, XCRs, debug
  registers, LAPIC, MSRs (filtered by KVM's MSR list, as a restore does), events, an irqfd for the
  UART and per virtio device an irqfd and an ioeventfd per queue.

Prints a Markdown table: min / median / max ms of each, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import mmap
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import machine_info

KVMIO = 0xAE
PAGE = 4096
TSS_ADDR, IDENTITY_MAP_ADDR = 0xFFFB_D000, 0xFFFB_C000
QUEUE_NOTIFY = 0x050
IRQCHIPS = ("pic_master", "pic_slave", "ioapic")  # chip ids 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | KVMIO << 8 | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(1, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(2, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(3, nr, size)


GET_API_VERSION, CHECK_EXTENSION, GET_TSC_KHZ = _io(0x00), _io(0x03), _io(0xA3)
CAP_IRQCHIP, CAP_IRQFD, CAP_IOEVENTFD = 0, 32, 36
CREATE_VM, GET_VCPU_MMAP_SIZE, CREATE_VCPU = _io(0x01), _io(0x04), _io(0x41)
SET_TSS_ADDR, SET_IDENTITY_MAP_ADDR = _io(0x47), _iow(0x48, 8)
CREATE_IRQCHIP, CREATE_PIT2 = _io(0x60), _iow(0x77, 64)
SET_USER_MEMORY_REGION = _iow(0x46, 32)
SET_IRQCHIP, SET_PIT2, SET_CLOCK = _ior(0x63, 520), _iow(0xA0, 112), _iow(0x7B, 48)
SET_CPUID2, SET_MP_STATE = _iow(0x90, 8), _iow(0x99, 4)
SET_REGS, SET_SREGS, SET_XSAVE = _iow(0x82, 144), _iow(0x84, 312), _iow(0xA5, 4096)
SET_XCRS, SET_DEBUGREGS, SET_LAPIC = _iow(0xA7, 392), _iow(0xA2, 128), _iow(0x8F, 1024)
SET_MSRS, SET_VCPU_EVENTS = _iow(0x89, 8), _iow(0xA0, 64)
GET_MSR_INDEX_LIST = _iowr(0x02, 4)
IRQFD, IOEVENTFD = _iow(0x76, 32), _iow(0x79, 64)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_MAP_FIXED, _MAP_NORESERVE = 0x10, 0x4000


def _map(address: int, length: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    result = _libc.mmap(address, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, offset)
    if result in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    return result


def _host_msrs(kvm: int) -> set[int]:
    probe = bytearray(struct.pack("<I", 0))
    try:
        fcntl.ioctl(kvm, GET_MSR_INDEX_LIST, probe)
    except OSError:
        pass
    count = struct.unpack_from("<I", probe)[0]
    listing = bytearray(struct.pack("<I", count) + bytes(4 * count))
    fcntl.ioctl(kvm, GET_MSR_INDEX_LIST, listing)
    return set(struct.unpack_from(f"<{count}I", listing, 4))


def _blobs(path: Path, host_msrs: set[int]) -> dict[str, Any]:
    """Every ioctl argument of a restore of ``path``, built from the bundle (untimed)."""
    import smolformat
    from smolformat import x86_64 as fmt

    with smolformat.open_bundle(path) as bundle:
        vcpus = []
        for state in bundle.vcpus:
            cpuid = [fmt.KvmCpuidEntry2.build(entry) for entry in state.cpuid]
            msrs = [(m.index, m.data) for m in state.msrs if m.index in host_msrs]
            vcpus.append(
                {
                    "cpuid": bytearray(struct.pack("<II", len(cpuid), 0) + b"".join(cpuid)),
                    "mp_state": struct.pack("<I", state.mp_state.mp_state),
                    "regs": fmt.KvmRegs.build(state.regs),
                    "sregs": fmt.KvmSregs.build(state.sregs),
                    "xsave": bytearray(state.xsave),
                    "xcrs": fmt.KvmXcrs.build(state.xcrs),
                    "debugregs": fmt.KvmDebugregs.build(state.debugregs),
                    "lapic": bytes(state.lapic.regs),
                    "msrs": msrs,
                    "events": fmt.KvmVcpuEvents.build(state.vcpu_events),
                }
            )
        vm = bundle.vm_state
        chips = [
            fmt.KvmPicState.build(vm.pic_master),
            fmt.KvmPicState.build(vm.pic_slave),
            fmt.KvmIoapicState.build(vm.ioapic),
        ]
        devices = [(0, d.gsi, 0) for d in bundle.config.devices if d.kind == "uart16550"]
        for entry, record in zip(
            (d for d in bundle.config.devices if d.bus == "mmio"), (d for d in bundle.devices if d.kind != "uart16550")
        ):
            devices.append((entry.base, entry.gsi, len(record.state.transport.queues)))
        return {
            "ram": [(r.gpa, r.size) for r in bundle.config.ram],
            "extents": [tuple(e) for e in bundle.memory_extents()],  # (gpa, length, file offset)
            "vcpus": vcpus,
            "irqchips": [struct.pack("<II", i, 0) + chip.ljust(512, b"\0") for i, chip in enumerate(chips)],
            "pit": fmt.KvmPitState2.build(vm.pit),
            "clock": fmt.KvmClockData.build({**vm.clock, "flags": 0}),
            "devices": devices,
        }


def _msrs_blob(values: list[tuple[int, int]]) -> bytearray:
    return bytearray(struct.pack("<II", len(values), 0) + b"".join(struct.pack("<IIQ", i, 0, v) for i, v in values))


def floor(path: Path) -> float:
    """Seconds of the timed part (see the module docstring); nothing is closed before the clock stops."""
    probe = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    blobs = _blobs(path, _host_msrs(probe))
    began = time.perf_counter()
    bundle_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(kvm, GET_API_VERSION, 0)
    for capability in (CAP_IOEVENTFD, CAP_IRQFD, CAP_IRQCHIP):
        fcntl.ioctl(kvm, CHECK_EXTENSION, capability)
    vm = fcntl.ioctl(kvm, CREATE_VM, 0)
    run_size = fcntl.ioctl(kvm, GET_VCPU_MMAP_SIZE, 0)
    if _libc.ioctl(vm, SET_TSS_ADDR, ctypes.c_ulong(TSS_ADDR)):  # an unsigned long: past fcntl.ioctl's int
        raise OSError(ctypes.get_errno(), "KVM_SET_TSS_ADDR")
    fcntl.ioctl(vm, SET_IDENTITY_MAP_ADDR, struct.pack("<Q", IDENTITY_MAP_ADDR))
    fcntl.ioctl(vm, CREATE_IRQCHIP, 0)
    fcntl.ioctl(vm, CREATE_PIT2, bytes(64))
    hosts = []
    for slot, (gpa, size) in enumerate(blobs["ram"]):
        host = _map(0, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        hosts.append((gpa, size, host))
        fcntl.ioctl(vm, SET_USER_MEMORY_REGION, struct.pack("<IIQQQ", slot, 0, gpa, size, host))
    for gpa, length, offset in blobs["extents"]:
        base, _, host = next(h for h in hosts if h[0] <= gpa < h[0] + h[1])
        _map(host + gpa - base, length, mmap.MAP_PRIVATE | _MAP_FIXED, bundle_fd, offset)
    vcpu_fds = []
    for index in range(len(blobs["vcpus"])):
        fd = fcntl.ioctl(vm, CREATE_VCPU, index)
        vcpu_fds.append((fd, mmap.mmap(fd, run_size)))
    fcntl.ioctl(vm, SET_PIT2, blobs["pit"])
    fcntl.ioctl(vm, SET_CLOCK, blobs["clock"])
    for chip in blobs["irqchips"]:
        fcntl.ioctl(vm, SET_IRQCHIP, chip)
    _host_msrs(kvm)  # a restore filters the saved MSRs by this list
    for (fd, _), state in zip(vcpu_fds, blobs["vcpus"]):
        fcntl.ioctl(fd, GET_TSC_KHZ, 0)  # does the TSC need scaling?
        fcntl.ioctl(fd, SET_CPUID2, state["cpuid"])
        fcntl.ioctl(fd, SET_MP_STATE, state["mp_state"])
        fcntl.ioctl(fd, SET_REGS, state["regs"])
        fcntl.ioctl(fd, SET_SREGS, state["sregs"])
        fcntl.ioctl(fd, SET_XSAVE, state["xsave"])
        fcntl.ioctl(fd, SET_XCRS, state["xcrs"])
        fcntl.ioctl(fd, SET_DEBUGREGS, state["debugregs"])
        fcntl.ioctl(fd, SET_LAPIC, state["lapic"])
        values = state["msrs"]
        while values:  # as a restore does: past an MSR KVM refuses, the rest
            written = fcntl.ioctl(fd, SET_MSRS, _msrs_blob(values))
            values = values[written + 1 :] if written < len(values) else []
        fcntl.ioctl(fd, SET_VCPU_EVENTS, state["events"])
    for base, gsi, queues in blobs["devices"]:  # the UART first, with no queues
        fcntl.ioctl(vm, IRQFD, struct.pack("<IIII16x", os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), gsi, 0, 0))
        for queue in range(queues):
            notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fcntl.ioctl(vm, IOEVENTFD, struct.pack("<QQIiI36x", queue, base + QUEUE_NOTIFY, 4, notify, 1))
    return time.perf_counter() - began


def _cells(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="raw x86_64 bundle (default: the demo bundle)")
    parser.add_argument("--runs", type=int, default=15, help="processes of each (default 15)")
    parser.add_argument("--floor", type=Path, metavar="BUNDLE", help=argparse.SUPPRESS)  # one floor run, ms on stdout
    args = parser.parse_args()
    if args.floor:
        print(f"{floor(args.floor) * 1e3:.3f}")
        return 0
    bundle = args.bundle
    if bundle is None:
        from smolvmm.cli.demo import demo_bundle

        bundle = Path(demo_bundle())
    if not bundle.exists():
        print(
            f"bench_restore_floor: no bundle at {bundle}; pass --bundle or run `python -m smolvmm demo`",
            file=sys.stderr,
        )
        return 1
    smolvmm_ms, floor_ms = [], []
    for _ in range(args.runs):
        done = subprocess.run(
            [sys.executable, "-m", "smolvmm", "run", "--prepare-only", "--json", str(bundle)],
            capture_output=True,
            text=True,
            check=True,
        )
        smolvmm_ms.append(
            json.loads(done.stdout.strip().splitlines()[-1])["phases_ms"]["vm_vcpu_state"]
        )  # --json: on stdout
        done = subprocess.run(
            [sys.executable, __file__, "--floor", str(bundle)], capture_output=True, text=True, check=True
        )
        floor_ms.append(float(done.stdout))
    machine = machine_info()
    print(
        f"`{bundle}`; {machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}; load {machine['load']}"
        f" after the run; {args.runs} alternating processes each.\n"
    )
    print("| host-side restore, bundle opened → ready for the first KVM_RUN | ms (min / median / max) | ratio |")
    print("|---|---|---|")
    print(f"| floor: the same ioctls and mappings from a minimal script | {_cells(floor_ms)} | 1 |")
    ratio = statistics.median(smolvmm_ms) / statistics.median(floor_ms)
    print(f"| smolvmm `run --prepare-only` (`vm_vcpu_state` phase) | {_cells(smolvmm_ms)} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
