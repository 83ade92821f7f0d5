"""The architecture interface the monitor uses (``smolvmm.arch.interface``), as x86_64 and arm64
implement it, and the machine plan cold boot and restore both wire from (``smolvmm.monitor.plan``)."""

from __future__ import annotations

import platform
import struct
import subprocess
import sys
from pathlib import Path

import bundles
import pytest

import smolformat
from smolformat import samples
from smolvmm.arch.arm64 import layout as arm64_layout
from smolvmm.arch.interface import HostOffer
from smolvmm.arch.machines import ARCHES, arch_named, host_arch, host_arch_name
from smolvmm.config import CONSOLE_ROLES_LABEL, NET_MODES_LABEL, DiskConfig, MachineConfig, NetConfig
from smolvmm.errors import BundleError, ConfigError
from smolvmm.host.memory import GuestMemory
from smolvmm.monitor.plan import ConsolePort, Disk, Entropy, MachinePlan, Network, RestoreOverrides
from smolvmm.oci.imageconfig import LABEL as IMAGE_CONFIG_LABEL
from smolvmm.oci.imageconfig import ImageConfig

MIB = 1 << 20
FDT_MAGIC = b"\xd0\x0d\xfe\xed"


@pytest.mark.parametrize("name", sorted(ARCHES))
def test_each_arch_keeps_ram_platform_devices_and_virtio_slots_apart(name: str) -> None:
    arch = arch_named(name)
    assert arch.name == name
    ram = arch.ram_regions(4096 * MIB)
    assert sum(size for _, size in ram) == 4096 * MIB
    windows = [(gpa, gpa + size) for gpa, size in ram]
    windows += [(d.base, d.base + d.size) for d in arch.platform_devices if d.bus == "mmio"]
    slots = [arch.virtio_slot(index) for index in range(8)]
    windows += [(base, base + 0x1000) for base, _ in slots]
    windows.sort()
    assert all(end <= start for (_, end), (start, _) in zip(windows, windows[1:]))
    lines = [irq for _, irq in slots] + [d.irq for d in arch.platform_devices if d.irq]
    assert len(set(lines)) == len(lines)


def test_both_arch_packages_have_the_same_modules_and_state_rules() -> None:
    import importlib
    import pkgutil

    import smolvmm.arch.arm64
    import smolvmm.arch.x86_64

    shared = {"boot", "image", "layout", "machine", "regs", "state"}
    for package in (smolvmm.arch.x86_64, smolvmm.arch.arm64):
        modules = {info.name for info in pkgutil.iter_modules(package.__path__)}
        assert shared <= modules, package.__name__
        state = importlib.import_module(f"{package.__name__}.state")
        assert callable(state.admit_vcpu) and callable(state.admit_vm)


def test_each_arch_refuses_saved_state_naming_the_field() -> None:
    offer = HostOffer(4096, {(0, 0): (0, 0, 0, 0)}, frozenset({0x10}))
    x86_vm = samples.x86_64_vm_state()
    with pytest.raises(BundleError, match=r"^ioapic\.base_address: 0x0, not 0xfec00000$"):
        arch_named("x86_64").admit_vm_state({**x86_vm, "ioapic": {**x86_vm["ioapic"], "base_address": 0}})
    arm64_vm = {"gic_nr_irqs": arm64_layout.NR_IRQS, "gic_distributor": [{"offset": 0xFFFF, "value": 0}]}
    with pytest.raises(BundleError, match=r"^gic_distributor: the arm64 distributor register 0xffff is not one"):
        arch_named("arm64").admit_vm_state({**arm64_vm, "gic_line_levels": []})
    from smolvmm.arch.arm64 import regs, state

    no_mpidr = state.VcpuState(regs.MpState.RUNNABLE, tuple((r, 0) for r in regs.CORE_REGISTERS), (), (), (), ())
    with pytest.raises(BundleError, match=r"^sys_regs: no MPIDR_EL1"):
        arch_named("arm64").admit_vcpu_state(no_mpidr.to_record(), offer, strict=True)


def test_arm64_loads_linux_through_the_interface_with_its_device_tree_in_x0() -> None:
    arm64 = arch_named("arm64")
    text_offset, image_size = 0x8_0000, 4 * MIB
    kernel = struct.pack("<IIQQQQQQ4sI", 0, 0, text_offset, image_size, 0b1010, 0, 0, 0, b"ARM\x64", 0)
    kernel += b"kernel code"
    cmdline = "console=ttyAMA0 smolvmm.agent=hvc0"
    memory = GuestMemory.anonymous(arm64.ram_regions(128 * MIB))
    try:
        start = arm64.load_linux(memory, kernel, b"initrd!", cmdline, 2, 3)
        tree = memory.read(start.argument, struct.unpack(">I", memory.read(start.argument + 4, 4))[0])
        loaded, initrd = memory.read(start.entry, len(kernel)), memory.read(start.argument - 4096, 7)
    finally:
        memory.close()
    assert start.entry == arm64_layout.RAM_START + text_offset and loaded == kernel
    assert tree[:4] == FDT_MAGIC and cmdline.encode() in tree
    assert b"virtio_mmio@40012000" in tree and b"virtio_mmio@40013000" not in tree  # three slots
    assert initrd == b"initrd!"  # page aligned, right below the device tree


def test_architectures_by_name_and_the_hosts() -> None:
    with pytest.raises(BundleError, match="riscv64, an architecture smolvmm does not know"):
        arch_named("riscv64")
    assert host_arch().name == host_arch_name() == {"x86_64": "x86_64", "aarch64": "arm64"}[platform.machine()]


def test_a_config_plans_its_devices_in_slot_order_and_its_command_line(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    tap, user = NetConfig(tap="tap0", mac=bytes.fromhex("525400000001")), NetConfig()
    config = MachineConfig(
        console="virtio",
        disks=(DiskConfig(disk, read_only=True),),
        networks=(tap, user),
        console_socket=tmp_path / "console.sock",
        extra_cmdline="quiet",
    )
    plan = MachinePlan.from_config(config, "console=ttyS0 panic=-1")
    assert plan.devices == (
        ConsolePort("main"),
        ConsolePort("agent"),
        Disk(disk, True, None, "smolvmm-disk0"),
        Network(tap, tap.mac),
        Network(user, None),
        ConsolePort("socket", tmp_path / "console.sock"),
        Entropy(),
    )
    assert plan.cmdline == "panic=-1 console=hvc0 smolvmm.agent=hvc1 smolvmm.dhcp=eth1 quiet"
    assert (plan.arch, plan.vcpus, plan.ram, plan.console) == (host_arch().name, 1, ((0, 256 * MIB),), "virtio")
    assert plan.has_agent and plan.config is config


def test_a_bundle_plans_the_machine_it_saved_with_the_host_sides_a_restore_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    disk = tmp_path / "disk0.img"
    disk.write_bytes(b"base" + bytes(MIB - 4))
    config_devices, states = samples.devices(disks=1)
    labels = {CONSOLE_ROLES_LABEL: "socket", NET_MODES_LABEL: "user"}
    contents = smolformat.BundleContents(
        config=samples.machine_config("x86_64", [(0, 64 * MIB)], config_devices),
        vcpus=[samples.x86_64_vcpu(0), samples.x86_64_vcpu(1)],
        vm_state=samples.x86_64_vm_state(),
        devices=states,
        memory=[bytearray(64 * MIB)],
        disks=[disk],
        metadata=smolformat.make_metadata("kvm-hardware", labels=labels),
    )
    path = tmp_path / "saved.smolmachine"
    smolformat.write_bundle(path, contents)
    socket, overlay = tmp_path / "console.sock", tmp_path / "overlay"
    with smolformat.open_bundle(path) as bundle:
        plan = MachinePlan.from_bundle(bundle, RestoreOverrides(console_socket=socket, overlays=(overlay,)))
        with pytest.raises(ConfigError, match="pass --console-socket PATH"):
            MachinePlan.from_bundle(bundle, RestoreOverrides())
        with pytest.raises(ConfigError, match="1 network device"):
            MachinePlan.from_bundle(bundle, RestoreOverrides((NetConfig(), NetConfig()), socket))
    base, net, console, rng = plan.devices
    assert isinstance(base, Disk) and base.base.read_bytes() == disk.read_bytes()
    assert base.base.is_relative_to(tmp_path / "cache" / "smolvmm" / "bundle-disks")
    assert (base.read_only, base.overlay, base.serial) == (False, overlay, "disk0")
    assert net == Network(NetConfig(), bytes.fromhex("020000000001"))  # the saved MAC, on a passt of its own
    assert (console, rng) == (ConsolePort("socket", socket), Entropy())
    assert (plan.arch, plan.vcpus, plan.ram, plan.console) == ("x86_64", 2, ((0, 64 * MIB),), "serial")
    assert not plan.has_agent and plan.config == MachineConfig(vcpus=2, memory=64 * MIB)
    assert plan.cmdline == "console=ttyS0 reboot=k panic=1 pci=off"


@pytest.mark.parametrize(
    ("roles", "shown"),
    [
        ("main,agenX", "label has 'agenX', which is not main, agent or socket"),
        ("", "label names 0 role(s) for the bundle's 1 virtio console(s)"),
        ("agent,main", "label names 2 role(s) for the bundle's 1 virtio console(s)"),
    ],
)
def test_a_garbled_console_roles_label_is_a_bad_bundle(
    roles: str, shown: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    contents = bundles.contents(tmp_path)
    contents.metadata = smolformat.make_metadata("kvm-hardware", labels={CONSOLE_ROLES_LABEL: roles})
    path = tmp_path / "garbled.smolmachine"
    smolformat.write_bundle(path, contents)
    where = f"{path}: its {CONSOLE_ROLES_LABEL} "
    with smolformat.open_bundle(path) as bundle, pytest.raises(BundleError) as caught:
        MachinePlan.from_bundle(bundle, RestoreOverrides(console_socket=tmp_path / "console.sock"))
    assert str(caught.value) == where + shown
    with pytest.raises(BundleError) as caught:  # a cold boot reads the label too
        MachineConfig.from_bundle(path, console_socket=tmp_path / "console.sock")
    assert str(caught.value) == where + shown


def test_a_disk_that_does_not_decode_fails_a_cold_boot_as_a_bad_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    smolformat.write_bundle(tmp_path / "saved.smolmachine", bundles.contents(tmp_path))
    broken = tmp_path / "broken.smolmachine"
    bundles.with_broken_zstd_chunk(tmp_path / "saved.smolmachine", broken, smolformat.layout.SectionKind.DISK_DATA)
    with pytest.raises(BundleError, match=r"broken.smolmachine: zstd chunk at 0x0 .*\[bad-chunk\]$"):
        MachineConfig.from_bundle(broken, networks=(NetConfig(),), console_socket=tmp_path / "console.sock")


def test_saved_arm64_state_is_admitted_register_by_register() -> None:
    from smolvmm.arch.arm64 import gic, regs, state
    from smolvmm.monitor.boundary import admit_state

    mpidr, icc_ctlr = regs.kvm_mpidr(0), 6 << gic.ICC_CTLR_PRIBITS_SHIFT  # 7 priority bits
    vcpu = state.VcpuState(
        mp_state=regs.MpState.RUNNABLE,
        core=tuple((reg, 0) for reg in regs.CORE_REGISTERS),
        sys_regs=((regs.SYSTEM["MPIDR_EL1"], mpidr),),
        timers=(),
        redistributor=(),
        cpu_interface=tuple((attr, icc_ctlr) for attr in gic.cpu_interface_attrs(mpidr, icc_ctlr)),
    )
    vm = state.VmState(nr_irqs=arm64_layout.NR_IRQS, distributor=(), line_levels=())
    offer = HostOffer(0, {}, frozenset())
    admitted_vm, (admitted,) = admit_state(arch_named("arm64"), vm.to_record(), [vcpu.to_record()], offer, strict=True)
    assert state.VcpuState.from_record(admitted.state) == vcpu and state.VmState.from_record(admitted_vm) == vm
    unknown = {**vcpu.to_record(), "sys_regs": [{"id": 0x6030_0000_0013_FFFF, "value": 1}]}
    with pytest.raises(
        BundleError, match=r"VCPU_STATE#0 sys_regs: the arm64 system register 0x60300000001\w+ is not one"
    ):
        admit_state(arch_named("arm64"), vm.to_record(), [unknown], offer, strict=True)


def test_run_of_an_image_without_a_command_is_a_usage_error_before_any_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image that sets neither Entrypoint nor Cmd needs a command after --: said before the clone starts."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    contents = bundles.contents(tmp_path)
    label = ImageConfig().to_json()
    contents.metadata = smolformat.make_metadata("kvm-hardware", labels={IMAGE_CONFIG_LABEL: label})
    path = tmp_path / "tiny.smolmachine"
    smolformat.write_bundle(path, contents)
    done = subprocess.run(
        [sys.executable, "-m", "smolvmm", "run", "--no-jail", str(path)], capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stderr) == (
        2,
        "smolvmm: error: the image sets no Entrypoint or Cmd: give a command after --\n",
    )
