"""Snapshot and restore mechanics on this host's own /dev/kvm, with no guest progress needed.

The default guest is booted for an instant (on PVM it only gets into its decompressor),
saved, and resumed: every ioctl of a save and a restore runs for real. A bundle that claims
another hypervisor flavour, or none, is refused with one clear line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import smolformat
from smolvmm import BundleError, ExitReason, Machine, MachineConfig
from smolvmm.host.kvmprobe import probe
from smolvmm.monitor.restore import check_flavour

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.kvm(linux_guest=False),
]


async def test_save_restore_save_again_and_refuse_another_flavour(tmp_path: Path) -> None:
    first, second = tmp_path / "first.smolmachine", tmp_path / "second.smolmachine"
    async with Machine.boot(MachineConfig(vcpus=2, memory=128 << 20)) as machine:
        digest = await machine.snapshot(first)
        await machine.stop()
    with smolformat.open_bundle(first) as bundle:
        assert bundle.digest == digest
        assert bundle.metadata.hypervisor == f"kvm-{probe().kind}"
        assert [s.mp_state.mp_state for s in bundle.vcpus] == [0, 1]  # BSP runnable; the AP awaits INIT-SIPI
    async with Machine.restore(first, paused=True) as machine:
        await machine.snapshot(second)
        end = await machine.stop()
    assert end.reason == ExitReason.STOPPED
    with smolformat.open_bundle(first) as one, smolformat.open_bundle(second) as two:
        assert two.metadata.parent_digest == digest
        # Restored and saved again before running: every register reads back as it was saved.
        for a, b in zip(one.vcpus, two.vcpus, strict=True):
            for part in ("regs", "sregs", "fpu", "xcrs", "debugregs", "mp_state", "cpuid"):
                assert a[part] == b[part], part
            assert a.xsave == b.xsave
        assert one.vm_state.ioapic == two.vm_state.ioapic and one.vm_state.pic_master == two.vm_state.pic_master

    from smolvmm.monitor.snapshot import write

    other = "kvm-hardware" if probe().kind == "pvm" else "kvm-pvm"
    with smolformat.open_bundle(first) as bundle:
        for name, metadata in (("other", {**bundle.metadata, "hypervisor": other}), ("unrecorded", None)):
            contents = smolformat.BundleContents(
                config=bundle.config,
                vcpus=bundle.vcpus,
                vm_state=bundle.vm_state,
                devices=bundle.devices,
                memory=[bytearray(r.size) for r in bundle.config.ram],
                disks=[],
                metadata=metadata,
            )
            write(tmp_path / f"{name}.smolmachine", contents, "raw")
    for name, message in (
        ("other", f"saved under {other} and this host is kvm-"),
        ("unrecorded", "does not record the hypervisor that saved it"),
    ):
        with pytest.raises(BundleError, match=message) as refused:
            async with Machine.restore(tmp_path / f"{name}.smolmachine"):
                pass
        assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("saved", "host", "refusal"),
    [
        ("kvm-hardware", "kvm-hardware", None),
        ("kvm-pvm", "kvm-pvm", None),
        ("kvm-hardware", "kvm-pvm", "CPU state is not compatible"),
        ("kvm-pvm", "kvm-hardware", "CPU state is not compatible"),
        ("", "kvm-pvm", "does not record the hypervisor"),
        ("hvf", "kvm-hardware", "smolvmm does not know hvf"),
        ("kvm-none", "kvm-none", "smolvmm does not know kvm-none"),
    ],
)
def test_a_bundle_restores_only_on_the_flavour_that_saved_it(saved: str, host: str, refusal: str | None) -> None:
    if refusal is None:
        check_flavour(saved, host)
    else:
        with pytest.raises(BundleError, match=refusal):
            check_flavour(saved, host)


async def test_a_bootable_bundle_carries_its_kernel_and_gives_its_cold_boot_config(tmp_path: Path) -> None:
    from smolvmm import ConfigError
    from smolvmm.images.guest import default_guest

    plain, bootable, again = (tmp_path / f"{name}.smolmachine" for name in ("plain", "bootable", "again"))
    async with Machine.boot(MachineConfig(vcpus=2, memory=128 << 20, console="virtio")) as machine:
        await machine.snapshot(plain)
        await machine.snapshot(bootable, bootable=True)
        await machine.stop()
    guest = default_guest()
    with smolformat.open_bundle(plain) as bundle:
        assert bundle.kernel is None and bundle.initrd is None
    with smolformat.open_bundle(bootable) as bundle:
        assert bundle.kernel == guest.kernel.read_bytes() and bundle.initrd == guest.initrd.read_bytes()
    config = MachineConfig.from_bundle(bootable)
    assert (config.vcpus, config.memory, config.console) == (2, 128 << 20, "virtio")
    assert config.kernel.read_bytes() == guest.kernel.read_bytes() and config.kernel != guest.kernel
    assert "console=hvc0" in config.cmdline and "smolvmm.agent" not in config.cmdline
    with pytest.raises(BundleError, match="has no kernel to cold-boot"):
        MachineConfig.from_bundle(plain)

    # A machine resumed from a bootable bundle can be saved bootable again; one from a plain one cannot.
    async with Machine.restore(bootable, paused=True) as machine:
        await machine.snapshot(again, bootable=True)
        await machine.stop()
    with smolformat.open_bundle(again) as bundle:
        assert bundle.kernel == guest.kernel.read_bytes()
    async with Machine.restore(plain, paused=True) as machine:
        with pytest.raises(ConfigError, match="which has no kernel"):
            await machine.snapshot(again, bootable=True)
        await machine.stop()
