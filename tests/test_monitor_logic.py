"""The monitor's own logic on a hypervisor test double (tests/hypervisor_double.py): the order of
boot, pause/resume, snapshot and restore; how a machine ends on an unexpected vCPU stop, a
hypervisor call failing or a device task failing; that nothing leaks.

Guest code does not run: the tests drive the monitor through scripted vCPU stops. Beside, never
instead of, the real-KVM tests (tests/test_snapshot_native.py, tests/test_machine_native.py and
the ``@pytest.mark.kvm`` suites), which show that KVM takes what the monitor gives it.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from bundles import with_broken_zstd_chunk
from guests import broken_ring_in_ram
from hypervisor_double import (
    Busy,
    DoubleHost,
    DoubleVcpu,
    MmioIo,
    PortIo,
    Raise,
    Return,
    SetRegisters,
    Step,
    WriteMemory,
)

import smolformat
from smolformat.layout import SectionKind
from smolvmm import BundleError, ConfigError, ExitReason, HypervisorError, Machine, MachineConfig, SmolvmmError
from smolvmm.arch.x86_64 import acpi, layout
from smolvmm.config import cache_root
from smolvmm.devices.virtio.mmio import MmioTransport
from smolvmm.hypervisor.interface import Capabilities, Stop, StopKind
from smolvmm.monitor import machine as machine_module
from smolvmm.monitor import restore as restore_module
from smolvmm.monitor import vm as vm_module
from smolvmm.monitor.vcpu import VcpuThread

pytestmark = pytest.mark.anyio

MIB = 1 << 20
SECOND = 1_000_000_000
POWEROFF = PortIo(layout.ACPI_SLEEP_PORT, 1, (acpi.S5_SLEEP_TYPE << 2) | acpi.SLEEP_ENABLE)
I8042_RESET = PortIo(layout.I8042_PORT + 4, 1, 0xFE)
GUEST_DATA_GPA = 0x20_0000
SAFETY = 20  # seconds: only so that a broken monitor fails instead of hanging the suite


@pytest.fixture
def double(monkeypatch: pytest.MonkeyPatch) -> Iterator[DoubleHost]:
    """The monitor's hypervisor is the double (where vm.py and restore.py look it up), with device
    tasks journaled; every test ends with the interface's contract kept."""
    host = DoubleHost()
    monkeypatch.setattr(vm_module, "open_hypervisor", host.open)
    monkeypatch.setattr(restore_module, "open_hypervisor", host.open)
    # No guest agent answers here: a snapshot does not wait for one.
    monkeypatch.setattr(machine_module, "AGENT_START_WAIT", 0)
    real_run = MmioTransport.run

    async def journaled_run(self: MmioTransport) -> None:
        name = type(self.device).__name__  # journaled as e.g. VirtioRng.start
        host.record(name, "start")
        try:
            await real_run(self)
        finally:
            host.record(name, "stop")

    monkeypatch.setattr(MmioTransport, "run", journaled_run)
    real_resume = VcpuThread.resume

    def journaled_resume(self: VcpuThread) -> None:  # the monitor lets a parked vCPU go
        host.record(f"thread{self.vcpu.id}", "resume")
        real_resume(self)

    monkeypatch.setattr(VcpuThread, "resume", journaled_resume)
    yield host
    assert host.violations == []


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    """The smallest bzImage the loader takes (its code never runs)."""
    image = bytearray(4096)
    image[0x1F1] = 4  # setup sectors: the protected-mode part starts at 2560
    image[0x201] = 0x66  # the setup header ends at 0x268
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x020F)  # boot protocol 2.15
    struct.pack_into("<I", image, 0x22C, 0x7FFF_FFFF)  # initrd_addr_max
    struct.pack_into("<I", image, 0x230, 2 * MIB)  # kernel_alignment
    struct.pack_into("<H", image, 0x236, 1)  # XLF_KERNEL_64
    struct.pack_into("<I", image, 0x238, 2047)  # cmdline_size
    struct.pack_into("<Q", image, 0x258, 16 * MIB)  # pref_address
    struct.pack_into("<I", image, 0x260, MIB)  # init_size
    path = tmp_path / "bzImage"
    path.write_bytes(image)
    return path


def config(kernel: Path, vcpus: int = 2) -> MachineConfig:
    return MachineConfig(kernel=kernel, vcpus=vcpus, memory=64 * MIB)


class Resources:
    """This process's fds and threads (other than event loops' idle workers) when made.

    Released means none of them added since is still there, leaving out what the threads that
    build kvm tests' images meanwhile (``prepare_on_host``) hold: their subprocesses' pipes and
    files in the image cache; fds and threads that ended meanwhile were not this test's."""

    def __init__(self) -> None:
        self.fds, self.threads = self._now()

    @staticmethod
    def _now() -> tuple[dict[str, str], set[threading.Thread]]:
        threads = {t for t in threading.enumerate() if not t.name.startswith(("Trio thread", "AnyIO worker"))}
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):
                fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        return fds, threads

    def assert_released(self, host: DoubleHost) -> None:
        assert host.open_objects() == []
        fds, threads = self._now()
        cache = str(cache_root())
        added = {
            fd: target
            for fd, target in fds.items()
            if self.fds.get(fd) != target and not target.startswith(("pipe:", cache))
        }
        assert added == {}
        assert threads - self.threads == set()


async def until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition`` (set by vCPU threads) to hold."""
    with anyio.fail_after(SAFETY):
        while not condition():
            await anyio.sleep(0.001)


def vcpus(host: DoubleHost) -> list[DoubleVcpu]:
    return host.vm.vcpus


async def in_guest(host: DoubleHost) -> None:
    await until(lambda: all(v.in_run for v in vcpus(host)))


async def finish(vcpu: DoubleVcpu, *steps: Step) -> None:
    """Have the guest on ``vcpu`` take ``steps`` and wait until it has."""
    vcpu.feed(*steps)
    await until(lambda: not vcpu.script and vcpu.in_run)


def since(host: DoubleHost, mark: int) -> list[str]:
    return host.names()[mark:]


def device_events(names: list[str], event: str) -> list[int]:
    """Where device tasks started (``start``) or ended (``stop``) in ``names``."""
    return [i for i, n in enumerate(names) if n.startswith("Virtio") and n.endswith(f".{event}")]


async def save_bundle(host: DoubleHost, kernel: Path, path: Path) -> tuple[int, bytes]:
    """Boot, let the guest change a register and RAM, save; returns (guest clock saved, digest)."""
    async with Machine.boot(config(kernel)) as machine:
        await in_guest(host)
        await finish(vcpus(host)[0], SetRegisters({"rip": 0x1234_5678}), WriteMemory(GUEST_DATA_GPA, b"guest data"))
        digest = await machine.snapshot(path)
        assert machine.snapshot_timings.notes["agent"].startswith("no answer")  # this guest runs no agent
        clock = host.vm.guest_ns
        await machine.stop()
    return clock, digest


async def test_boot_wires_everything_before_any_vcpu_runs(double: DoubleHost, kernel: Path) -> None:
    before = Resources()
    async with Machine.boot(config(kernel)) as machine:
        await in_guest(double)
        names = double.names("hypervisor.", "vm.", "vcpu")
        first_run = min(names.index("vcpu0.run"), names.index("vcpu1.run"))
        wiring = names[:first_run]
        assert wiring[:2] == ["hypervisor.open", "hypervisor.create_vm"]
        assert wiring.count("vm.map_memory") == len(machine._vm.memory.regions)
        # the UART's irqfd, then per virtio device (agent console, rng) an irqfd and queue ioeventfds
        assert wiring.count("vm.irqfd") == 3 and wiring.count("vm.ioeventfd") == 3
        created = [i for i, n in enumerate(wiring) if n == "vm.create_vcpu"]
        booted = [wiring.index("vcpu0.set_boot_state"), wiring.index("vcpu1.set_boot_state")]
        assert len(created) == 2 and max(created) < min(booted)
        assert double.vm.vcpus[0].state["regs"]["rip"] == layout.KERNEL_LOAD_ADDR + 0x200
        assert double.vm.vcpus[0].state["regs"]["rsi"] == layout.ZERO_PAGE_ADDR
    assert (await machine.wait()).reason == ExitReason.STOPPED
    before.assert_released(double)


async def test_env_the_agent_cannot_take_fails_a_boot_or_restore_before_anything_is_created(
    double: DoubleHost, kernel: Path, tmp_path: Path
) -> None:
    before = Resources()
    too_big = MachineConfig(kernel=kernel, memory=64 * MIB, env={"A": "x" * 70_000})  # over one frame
    with pytest.raises(ConfigError, match="env and secrets take"):
        async with Machine.boot(too_big):
            pytest.fail("booted")
    with pytest.raises(ConfigError, match=r"^env\['A'\] must be a str"):
        async with Machine.restore(tmp_path / "none.smolmachine", env={"A": 1}):  # type: ignore[dict-item]
            pytest.fail("restored")
    assert double.names() == []
    before.assert_released(double)


async def test_a_broken_ring_report_is_found_in_guest_ram(double: DoubleHost, kernel: Path) -> None:
    """What tests/guests.py looks for when a guest's own console's broken ring silences it."""
    async with Machine.boot(config(kernel)) as machine:
        await in_guest(double)
        assert broken_ring_in_ram(machine) is None
        line = b"virtio_console virtio0: output:id 0 is not a head!"
        machine._vm.memory.write(GUEST_DATA_GPA - 20, line)  # across a page boundary
        assert broken_ring_in_ram(machine) == line.decode()


async def test_port_accesses_reach_the_devices_and_mmio_notifies_reach_ioeventfds(
    double: DoubleHost, kernel: Path
) -> None:
    async with Machine.boot(config(kernel)) as machine:
        await in_guest(double)
        vcpu = vcpus(double)[1]
        await finish(vcpu, *(PortIo(layout.COM1_PORT, 1, byte) for byte in b"hello\n"))
        with anyio.fail_after(SAFETY):
            assert b"hello" in await machine.console.wait_for(b"hello\n")
        # an MMIO read reaches the virtio-mmio transport (its magic value); a queue notify write
        # is taken by the ioeventfd without reaching the bus, as KVM does
        base, _ = layout.virtio_slot(1)
        rng = machine._vm.transports[1]
        await finish(vcpu, MmioIo(base, 4), MmioIo(base + 0x50, 4, 0))
        reads = [c for c in double.journal if c.name == "vcpu1.mmio_read"]
        assert [c.args for c in reads] == [(base, 0x74726976)]  # "virt"
        assert os.eventfd_read(rng.notify_fds[0]) == 1
        # enabling the UART's transmitter interrupt raises its line through the irqfd
        double.vm.take_interrupts(layout.COM1_IRQ)
        await finish(vcpu, PortIo(layout.COM1_PORT + 1, 1, 0x02))
        assert double.vm.take_interrupts(layout.COM1_IRQ) >= 1


@pytest.mark.parametrize(
    ("steps", "reason", "detail"),
    [
        ((POWEROFF,), ExitReason.POWEROFF, "ACPI S5"),
        ((I8042_RESET,), ExitReason.REBOOT, "i8042 reset"),
        ((Return(Stop(StopKind.RESET, "vCPU 1: triple fault")),), ExitReason.REBOOT, "vCPU 1: triple fault"),
        ((Return(Stop(StopKind.POWEROFF, "system event: shutdown")),), ExitReason.POWEROFF, "system event: shutdown"),
        (
            (Return(Stop(StopKind.CRASH, "vCPU 1: KVM internal error, suberror 1")),),
            ExitReason.CRASH,
            "vCPU 1: KVM internal error, suberror 1",
        ),
        ((Raise(HypervisorError("KVM_RUN: Bad address")),), ExitReason.CRASH, "vCPU 1: KVM_RUN: Bad address"),
    ],
    ids=["acpi-poweroff", "i8042-reset", "triple-fault", "shutdown-event", "internal-error", "run-fails"],
)
async def test_a_vcpu_stop_ends_the_machine_as_it_says_and_releases_everything(
    double: DoubleHost, kernel: Path, steps: tuple[Step, ...], reason: ExitReason, detail: str
) -> None:
    before = Resources()
    async with Machine.boot(config(kernel)) as machine:
        await in_guest(double)
        vcpus(double)[1].feed(*steps)
        with anyio.fail_after(SAFETY):
            end = await machine.wait()
        assert (end.reason, end.detail) == (reason, detail)
        # the other vCPU was taken out of the guest and its thread joined before wait() returned
        assert not any(t.alive for t in machine._vm.threads)
        assert "vcpu0.interrupt" in double.names()
    before.assert_released(double)


async def test_a_crashing_machine_leaves_its_neighbour_running(double: DoubleHost, kernel: Path) -> None:
    before = Resources()
    async with Machine.boot(config(kernel)) as first, Machine.boot(config(kernel)) as second:
        first_vm, second_vm = double.vms
        await until(lambda: all(v.in_run for vm in double.vms for v in vm.vcpus))
        first_vm.vcpus[0].feed(Raise(HypervisorError("KVM_RUN: Bad address")))
        with anyio.fail_after(SAFETY):
            assert (await first.wait()).reason == ExitReason.CRASH
        assert not any(t.alive for t in first._vm.threads)
        assert all(v.in_run for v in second_vm.vcpus)  # the neighbour still runs
        second_vm.vcpus[1].feed(POWEROFF)
        with anyio.fail_after(SAFETY):
            assert (await second.wait()).reason == ExitReason.POWEROFF
    before.assert_released(double)


async def test_a_stray_interrupted_stop_enters_the_guest_again(double: DoubleHost, kernel: Path) -> None:
    async with Machine.boot(config(kernel)) as machine:
        await in_guest(double)
        vcpus(double)[0].feed(Return(Stop(StopKind.INTERRUPTED)), SetRegisters({"rip": 0xABC}), POWEROFF)
        with anyio.fail_after(SAFETY):
            end = await machine.wait()
    assert end.reason == ExitReason.POWEROFF
    assert vcpus(double)[0].state["regs"]["rip"] == 0xABC
    assert double.names("vcpu0.run").count("vcpu0.run") == 2


async def test_pause_parks_every_vcpu_before_holding_the_clock_and_resume_releases_it_first(
    double: DoubleHost, kernel: Path
) -> None:
    async with Machine.boot(config(kernel)) as machine:
        await in_guest(double)
        double.host_time_passes(3 * SECOND)
        at_pause = double.vm.guest_ns
        mark = len(double.journal)
        await machine.pause()
        paused = since(double, mark)
        hold = paused.index("vm.hold_clock")
        assert {"vcpu0.left", "vcpu1.left"} <= set(paused[:hold])
        assert not any(v.in_run for v in vcpus(double))
        assert device_events(paused, "stop") == []  # devices keep running while paused
        await machine.pause()  # paused already: nothing happens
        assert since(double, mark) == paused

        double.host_time_passes(10 * SECOND)
        mark = len(double.journal)
        await machine.resume()
        await in_guest(double)
        resumed = since(double, mark)
        assert resumed.index("vm.release_clock") < min(resumed.index("thread0.resume"), resumed.index("thread1.resume"))
        assert double.vm.guest_ns == at_pause  # the guest sees no gap
        double.host_time_passes(SECOND)
        assert double.vm.guest_ns == at_pause + SECOND


async def test_snapshot_reads_state_with_vcpus_parked_devices_stopped_and_clock_held(
    double: DoubleHost, kernel: Path, tmp_path: Path
) -> None:
    path = tmp_path / "saved.smolmachine"
    async with Machine.boot(config(kernel)) as machine:
        await in_guest(double)
        await finish(vcpus(double)[0], SetRegisters({"rip": 0x1234_5678}))
        double.host_time_passes(SECOND)
        clock = double.vm.guest_ns
        mark = len(double.journal)
        await machine.snapshot(path)
        await in_guest(double)
        await until(lambda: len(device_events(since(double, mark), "start")) == 2)
        names = since(double, mark)
    hold = names.index("vm.hold_clock")
    reads = [names.index(n) for n in ("vcpu0.save_state", "vcpu1.save_state", "vm.save_state")]
    release = names.index("vm.release_clock")
    stopped = device_events(names, "stop")
    restarted = device_events(names, "start")
    assert max(names.index("vcpu0.left"), names.index("vcpu1.left")) < hold  # parked, then the clock held
    assert len(stopped) == 2 and max(stopped) < min(reads)  # every device quiesced before state is read
    assert hold < min(reads) and max(reads) < release  # the clock held across the reads
    assert max(reads) < min(restarted)
    assert release < min(names.index("thread0.resume"), names.index("thread1.resume"))
    assert list(machine.snapshot_timings.phases)[:4] == [
        "agent_sync",
        "agent_scrubbed",
        "vcpus_parked",
        "devices_stopped",
    ]
    with smolformat.open_bundle(path) as bundle:
        assert bundle.metadata is not None and bundle.metadata.hypervisor == double.flavour
        assert bundle.vcpus[0].regs.rip == 0x1234_5678
        assert [s.mp_state.mp_state for s in bundle.vcpus] == [0, 1]  # the BSP runnable, the AP waiting
        assert bundle.vm_state.clock.clock == clock


async def test_snapshot_of_a_paused_machine_leaves_it_paused(double: DoubleHost, kernel: Path, tmp_path: Path) -> None:
    async with Machine.boot(config(kernel)) as machine:
        await in_guest(double)
        await machine.pause()
        mark = len(double.journal)
        await machine.snapshot(tmp_path / "saved.smolmachine")
        names = since(double, mark)
        assert "vm.hold_clock" not in names and "vm.release_clock" not in names  # held since the pause
        assert not any(n.endswith((".run", ".resume")) for n in names)
        assert all(t.parked for t in machine._vm.threads)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        ("vcpu1.save_state", HypervisorError("KVM_GET_XSAVE2: Invalid argument")),
        ("vm.save_state", HypervisorError("KVM_GET_IRQCHIP: Invalid argument")),
    ],
)
async def test_a_failed_snapshot_resumes_the_machine(
    double: DoubleHost, kernel: Path, tmp_path: Path, call: str, error: HypervisorError
) -> None:
    path = tmp_path / "saved.smolmachine"
    async with Machine.boot(config(kernel)) as machine:
        await in_guest(double)
        double.failures[call] = error
        mark = len(double.journal)
        with pytest.raises(HypervisorError, match=str(error)):
            await machine.snapshot(path)
        await in_guest(double)
        await until(lambda: len(device_events(since(double, mark), "start")) == 2)
        names = since(double, mark)
        assert names.index(call) < names.index("vm.release_clock")
        assert double.vm.held_clock is None
    assert not path.exists() and list(tmp_path.iterdir()) == [kernel]


async def test_a_bundle_that_cannot_be_written_fails_the_snapshot_not_the_machine(
    double: DoubleHost, kernel: Path, tmp_path: Path
) -> None:
    async with Machine.boot(config(kernel)) as machine:
        await in_guest(double)
        with pytest.raises(SmolvmmError, match="cannot write") as raised:
            await machine.snapshot(tmp_path / "missing" / "saved.smolmachine")
        assert not isinstance(raised.value, BundleError)  # an I/O failure (exit 1), not a bad bundle
        await in_guest(double)
        vcpus(double)[0].feed(POWEROFF)
        with anyio.fail_after(SAFETY):
            assert (await machine.wait()).reason == ExitReason.POWEROFF


async def test_restore_sets_every_state_before_the_first_run(double: DoubleHost, kernel: Path, tmp_path: Path) -> None:
    path = tmp_path / "saved.smolmachine"
    clock, digest = await save_bundle(double, kernel, path)
    double.host_time_passes(60 * SECOND)
    mark = len(double.journal)
    before = Resources()
    async with Machine.restore(path) as machine:
        await in_guest(double)
        names = since(double, mark)
        first_run = min(names.index("vcpu0.run"), names.index("vcpu1.run"))
        restores = [names.index(n) for n in ("vm.restore_state", "vcpu0.restore_state", "vcpu1.restore_state")]
        assert restores == sorted(restores) and max(restores) < first_run
        assert not any(n.endswith("set_boot_state") for n in names)
        assert double.vm.vcpus[0].state["regs"]["rip"] == 0x1234_5678
        assert machine._vm.memory.read(GUEST_DATA_GPA, 10) == b"guest data"
        assert double.vm.guest_ns == clock  # the guest clock carries on from the saved value
        assert machine._parent_digest == digest
    before.assert_released(double)


async def test_a_paused_restore_runs_nothing_until_resumed(double: DoubleHost, kernel: Path, tmp_path: Path) -> None:
    path = tmp_path / "saved.smolmachine"
    await save_bundle(double, kernel, path)
    mark = len(double.journal)
    async with Machine.restore(path, paused=True) as machine:
        await until(lambda: all(t.parked for t in machine._vm.threads))
        assert not any(n.endswith(".run") for n in since(double, mark))
        await machine.resume()
        await in_guest(double)


async def test_vcpu_state_waits_for_guest_ram_however_long_its_registration_takes(
    double: DoubleHost, kernel: Path, tmp_path: Path
) -> None:
    path = tmp_path / "saved.smolmachine"
    await save_bundle(double, kernel, path)
    double.slot_seconds = 0.2  # the devices are built meanwhile; no vCPU state may come first
    async with Machine.boot(config(kernel)) as machine:
        await in_guest(double)
        await machine.stop()
    mark = len(double.journal)
    await Machine.prepare_restore(path)
    names = since(double, mark)
    slots = [i for i, n in enumerate(names) if n == "vm.map_memory"]
    notifiers = [i for i, n in enumerate(names) if n == "vm.ioeventfd"]
    first_msrs = min(i for i, n in enumerate(names) if n.endswith(".restore_msrs"))
    assert slots and notifiers and max(slots) < min(notifiers) and max(notifiers) < first_msrs
    assert not double.violations


async def test_a_bundle_from_another_flavour_is_refused_before_any_state_is_set(
    double: DoubleHost, kernel: Path, tmp_path: Path
) -> None:
    path = tmp_path / "saved.smolmachine"
    await save_bundle(double, kernel, path)
    double.flavour = "kvm-pvm"
    mark = len(double.journal)
    before = Resources()
    with pytest.raises(BundleError, match="saved under kvm-hardware and this host is kvm-pvm"):
        async with Machine.restore(path):
            pytest.fail("restored")
    assert not any(n.endswith((".restore_state", ".run")) for n in since(double, mark))
    before.assert_released(double)


async def test_a_bundle_failing_its_checks_after_its_ram_layout_releases_the_vm_started_meanwhile(
    double: DoubleHost, kernel: Path, tmp_path: Path
) -> None:
    path = tmp_path / "saved.smolmachine"
    await save_bundle(double, kernel, path)
    with smolformat.open_bundle(path) as bundle:
        vcpu = next(s for s in bundle.sections if s.kind == SectionKind.VCPU_STATE)
    data = bytearray(path.read_bytes())
    data[vcpu.offset] ^= 0xFF
    path.write_bytes(data)
    mark = len(double.journal)
    before = Resources()
    with pytest.raises(BundleError, match="section vcpu_state#0 does not match its digest"):
        async with Machine.restore(path):
            pytest.fail("restored")
    calls = since(double, mark)
    assert "hypervisor.create_vm" in calls  # RAM was being registered while the sections were read
    assert not any(n.endswith(".restore_state") for n in calls)
    before.assert_released(double)


async def test_zstd_ram_that_does_not_decode_fails_the_restore_as_a_bad_bundle(
    double: DoubleHost, kernel: Path, tmp_path: Path
) -> None:
    await save_bundle(double, kernel, tmp_path / "saved.smolmachine")
    broken = with_broken_zstd_chunk(tmp_path / "saved.smolmachine", tmp_path / "broken.smolmachine")
    before = Resources()
    with pytest.raises(BundleError, match=r"^\S+/broken.smolmachine: zstd chunk at 0x\w+ .*\[bad-chunk\]$"):
        async with Machine.restore(broken):
            pytest.fail("restored")
    before.assert_released(double)


async def test_a_measured_restore_sets_state_leniently_and_runs_nothing(
    double: DoubleHost, kernel: Path, tmp_path: Path
) -> None:
    path = tmp_path / "saved.smolmachine"
    await save_bundle(double, kernel, path)
    double.flavour = "kvm-pvm"  # a measured restore takes another flavour's bundle
    mark = len(double.journal)
    before = Resources()
    timings = await Machine.prepare_restore(path)
    calls = [c for c in double.journal[mark:] if c.what in ("restore_state", "run")]
    assert [(c.name, c.args) for c in calls] == [
        ("vm.restore_state", ()),
        ("vcpu0.restore_state", (False,)),
        ("vcpu1.restore_state", (False,)),
    ]
    assert list(timings.phases)[-2:] == ["vm_vcpu_state", "teardown"]
    before.assert_released(double)


@pytest.mark.parametrize(
    ("call", "error", "expected"),
    [
        ("vcpu1.restore_state", HypervisorError("KVM_SET_SREGS: Invalid argument"), BundleError),
        ("vcpu0.restore_msrs", HypervisorError("KVM_SET_MSRS: Invalid argument"), BundleError),
        ("vm.restore_state", HypervisorError("KVM_SET_PIT2: Invalid argument"), BundleError),
        ("vm.create_vcpu", HypervisorError("KVM_CREATE_VCPU: Too many open files"), HypervisorError),
        ("vm.irqfd", HypervisorError("KVM_IRQFD: No space left on device"), HypervisorError),
        ("vm.map_memory", HypervisorError("KVM_SET_USER_MEMORY_REGION: Cannot allocate memory"), HypervisorError),
        ("hypervisor.create_vm", HypervisorError("KVM_CREATE_VM: Cannot allocate memory"), HypervisorError),
    ],
)
async def test_a_hypervisor_call_failing_mid_restore_fails_it_cleanly(
    double: DoubleHost, kernel: Path, tmp_path: Path, call: str, error: HypervisorError, expected: type[Exception]
) -> None:
    path = tmp_path / "saved.smolmachine"
    await save_bundle(double, kernel, path)
    mark = len(double.journal)
    before = Resources()
    double.failures[call] = error
    with pytest.raises(expected, match=str(error)):
        async with Machine.restore(path):
            pytest.fail("the restore went on")
    assert call not in double.failures  # the failure was hit
    assert not any(n.endswith(".run") for n in since(double, mark))
    before.assert_released(double)


async def test_a_failing_device_task_crashes_its_machine_only(double: DoubleHost, kernel: Path) -> None:
    before = Resources()
    double.failures["VirtioRng.start"] = RuntimeError("device model bug")
    async with Machine.boot(config(kernel)) as machine:
        with anyio.fail_after(SAFETY):
            end = await machine.wait()
        assert end.reason == ExitReason.CRASH
        assert end.detail == "virtio-VirtioRng1: device model bug"
        assert not any(t.alive for t in machine._vm.threads)
    before.assert_released(double)


async def test_a_hypervisor_without_irqfd_is_refused_and_released(double: DoubleHost, kernel: Path) -> None:
    double.capabilities = Capabilities(ioeventfd=True, irqfd=False, irqchip=True)
    before = Resources()
    with pytest.raises(HypervisorError, match="no in-kernel interrupt controller with irqfd"):
        async with Machine.boot(config(kernel)):
            pytest.fail("booted")
    assert "hypervisor.create_vm" not in double.names()
    before.assert_released(double)


async def test_cancelling_the_caller_stops_the_machine_and_releases_everything(
    double: DoubleHost, kernel: Path
) -> None:
    before = Resources()
    with anyio.CancelScope() as scope:
        async with Machine.boot(config(kernel)) as machine:
            await in_guest(double)
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert (await machine.wait()).reason == ExitReason.STOPPED
    assert {"vcpu0.left", "vcpu1.left"} <= set(double.names())
    before.assert_released(double)


async def test_a_pause_cancelled_while_a_vcpu_is_busy_holds_no_clock_and_can_be_resumed(
    double: DoubleHost, kernel: Path
) -> None:
    before = Resources()
    busy = threading.Event()
    async with Machine.boot(config(kernel)) as machine:
        await in_guest(double)
        vcpus(double)[1].feed(Busy(busy))
        await until(lambda: not vcpus(double)[1].script)
        try:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(machine.pause)
                    await until(lambda: "vcpu1.interrupt" in double.names() and not vcpus(double)[0].in_run)
                    scope.cancel()
        finally:
            busy.set()
        assert scope.cancelled_caught
        await until(lambda: all(t.parked for t in machine._vm.threads))
        assert "vm.hold_clock" not in double.names()  # never while vCPU 1 was in the guest
        await machine.resume()
        await in_guest(double)
    assert (await machine.wait()).reason == ExitReason.STOPPED
    before.assert_released(double)


async def test_an_error_in_the_block_reaches_the_caller_as_itself(double: DoubleHost, kernel: Path) -> None:
    before = Resources()
    with pytest.raises(KeyError, match="from the caller"):
        async with Machine.boot(config(kernel)):
            await in_guest(double)
            raise KeyError("from the caller")
    before.assert_released(double)


def test_dirty_pages_log_what_the_guest_wrote_once() -> None:
    """The double's own dirty log, as KVM_GET_DIRTY_LOG gives it (read and cleared)."""
    host = DoubleHost()
    vm = host.open().create_vm()
    memory = mmap.mmap(-1, 16 * 4096)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    vm.map_memory(0, 0x10_0000, 16 * 4096, address, log_dirty=True)
    vm.map_memory(1, 0x20_0000, 4096, address, log_dirty=False)
    vm.guest_write(0x10_0000 + 3 * 4096 + 10, b"x" * 4096)  # pages 3 and 4
    assert memory[3 * 4096 + 10] == ord("x")
    assert vm.dirty_pages(0, 16 * 4096) == bytes([0b0001_1000, 0])
    assert vm.dirty_pages(0, 16 * 4096) == bytes(2)
    with pytest.raises(HypervisorError):
        vm.dirty_pages(1, 4096)
    with pytest.raises(HypervisorError):
        vm.map_memory(2, 0x10_0000, 4096, address)
