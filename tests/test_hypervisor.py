"""The hypervisor interface on the real KVM backend: a real-mode guest runs through it, its state
goes out and back in through it, and its interrupt lines reach the in-kernel interrupt controllers.

Real mode needs no standard kernel, so this runs natively on hardware KVM and on PVM alike.
"""

from __future__ import annotations

import os
import struct
import time

import pytest

from smolvmm.devices.bus import Bus
from smolvmm.host.kvmprobe import probe
from smolvmm.host.memory import GuestMemory
from smolvmm.host.words import SharedWord
from smolvmm.hypervisor import open_hypervisor
from smolvmm.hypervisor.interface import Capabilities, StopKind
from smolvmm.hypervisor.kvm.ioctls import Cap
from smolvmm.hypervisor.kvm.system import Kvm

pytestmark = pytest.mark.kvm(linux_guest=False)

RAM = 0x3000
NOTIFY_ADDR = 0x4000  # an ioeventfd: written without an exit
DEVICE_ADDR = 0x5000  # plain MMIO: an exit served by the bus
CODE = bytes.fromhex(
    "b83412"  # mov ax, 0x1234
    "a30020"  # mov [0x2000], ax        (dirties page 2)
    "c70600400700"  # mov word [0x4000], 7  (ioeventfd, datamatch 7)
    "c606005042"  # mov byte [0x5000], 0x42 (MMIO exit)
    "a10450"
    "a30220"  # mov ax, [0x5004]; mov [0x2002], ax  (an MMIO read's value reaches the guest)
    "baf903"
    "ec"
    "a20420"  # mov dx, 0x3f9; in al, dx; mov [0x2004], al  (a port read's)
    "be0220"
    "b90200"
    "bafa03"
    "f36e"  # mov si, 0x2002; mov cx, 2; mov dx, 0x3fa; rep outsb  (one exit, two bytes)
    "baf803"
    "b07a"
    "ee"  # mov dx, 0x3f8; mov al, 'z'; out dx, al
    "ebfe"  # jmp $
)


def test_real_mode_guest_through_the_interface() -> None:
    hypervisor = open_hypervisor()
    assert hypervisor.flavour == f"kvm-{probe().kind}"
    assert hypervisor.capabilities == Capabilities(ioeventfd=True, irqfd=True, irqchip=True)
    memory = GuestMemory.anonymous([(0, RAM)])
    vm = hypervisor.create_vm()
    vcpu = vm.create_vcpu(0)
    notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        vm.map_memory(0, 0, RAM, memory.regions[0].host_address, log_dirty=True)
        vm.dirty_pages(0, RAM)  # clear the log
        memory.write(0x1000, CODE)
        vm.ioeventfd(notify, NOTIFY_ADDR, 2, 7)
        state = vcpu.save_state()
        state["sregs"]["cs"].update({"base": 0, "selector": 0})
        state["regs"].update({"rip": 0x1000, "rflags": 0x2})
        assert vcpu.restore_state(state)() == 0

        seen: list[tuple[str, int, int]] = []
        pio, mmio = Bus("port I/O"), Bus("MMIO")

        def port_write(offset: int, size: int, value: int) -> None:
            seen.append(("pio", offset, value))
            if offset == 0:
                vcpu.interrupt()  # the next entry returns at once

        pio.add(0x3F8, 8, lambda offset, size: 0x5A if (offset, size) == (1, 1) else 0, port_write)
        mmio.add(
            DEVICE_ADDR,
            0x1000,
            lambda offset, size: 0xBEEF if (offset, size) == (4, 2) else 0,
            lambda offset, size, value: seen.append(("mmio", offset, value)),
        )
        stop = vcpu.run(pio, mmio)

        assert stop.kind == StopKind.INTERRUPTED
        assert seen == [("mmio", 0, 0x42), ("pio", 2, 0xEF), ("pio", 2, 0xBE), ("pio", 0, ord("z"))]
        assert memory.read(0x2002, 3) == bytes([0xEF, 0xBE, 0x5A])
        assert os.eventfd_read(notify) == 1  # the notify write never reached the monitor
        assert memory.read(0x2000, 2) == struct.pack("<H", 0x1234)
        dirty = vm.dirty_pages(0, RAM)
        assert dirty[0] & 0b100, f"page 2 not in the dirty log {dirty.hex()}"
        vcpu.clear_interrupt()
    finally:
        os.close(notify)
        vcpu.close()
        vm.close()
        memory.close()
        hypervisor.close()


WORD_CODE = bytes.fromhex(
    "66a16050"
    "66a30020"  # mov eax, [0x5060]; mov [0x2000], eax  (a word register's read)
    "66c7066450"
    "01000000"  # mov dword [0x5064], 1  (a write clearing bit 0)
    "66a16050"
    "66a30420"  # mov eax, [0x5060]; mov [0x2004], eax
    "a06050"  # mov al, [0x5060]  (one byte: not the word's access, the bus serves it)
    "c606005042"  # mov byte [0x5000], 0x42
    "baf803"
    "ee"  # mov dx, 0x3f8; out dx, al
    "ebfe"  # jmp $
)


def test_word_registers_are_served_without_the_bus() -> None:
    """A 4-byte read of a word register returns the word and a write to its clearing twin clears
    the bits written, in the vCPU loop's C (virtio-mmio's InterruptStatus and ACK); every other
    access, a 1-byte read of the same register too, still reaches the bus's handlers."""
    hypervisor = open_hypervisor()
    memory = GuestMemory.anonymous([(0, RAM)])
    vm = hypervisor.create_vm()
    vcpu = vm.create_vcpu(0)
    word = SharedWord()
    if not word.address:
        pytest.skip("no C compiler: the word is Python's and the bus serves every access")
    try:
        vm.map_memory(0, 0, RAM, memory.regions[0].host_address, log_dirty=False)
        memory.write(0x1000, WORD_CODE)
        state = vcpu.save_state()
        state["sregs"]["cs"].update({"base": 0, "selector": 0})
        state["regs"].update({"rip": 0x1000, "rflags": 0x2})
        assert vcpu.restore_state(state)() == 0
        word.put(0b11)
        seen: list[tuple[str, int, int]] = []
        pio, mmio = Bus("port I/O"), Bus("MMIO")
        pio.add(0x3F8, 8, lambda offset, size: 0, lambda offset, size, value: vcpu.interrupt())

        def read(offset: int, size: int) -> int:
            seen.append(("read", offset, size))
            return 0x77

        mmio.add(DEVICE_ADDR, 0x1000, read, lambda offset, size, value: seen.append(("write", offset, value)))
        mmio.add_word(DEVICE_ADDR + 0x60, word.address, False)
        mmio.add_word(DEVICE_ADDR + 0x64, word.address, True)
        assert vcpu.run(pio, mmio).kind == StopKind.INTERRUPTED

        assert struct.unpack("<II", memory.read(0x2000, 8)) == (0b11, 0b10)
        assert word.get() == 0b10
        assert seen == [("read", 0x60, 1), ("write", 0, 0x42)]
        vcpu.clear_interrupt()
    finally:
        vcpu.close()
        vm.close()
        memory.close()
        hypervisor.close()


def test_state_goes_out_and_back_in_through_the_interface() -> None:
    """A vCPU at its boot entry and a VM saved, restored into a fresh VM, and saved again read
    back the same (the TSC and the clock run on)."""
    hypervisor = open_hypervisor()
    first = hypervisor.create_vm()
    second = hypervisor.create_vm()
    vcpus = [first.create_vcpu(0), second.create_vcpu(0)]
    try:
        vcpus[0].set_boot_state(vcpus=1, entry=0x10_0200, argument=0x7000)
        saved, vm_saved = vcpus[0].save_state(), first.save_state()
        assert (saved["regs"]["rip"], saved["regs"]["rsi"]) == (0x10_0200, 0x7000)
        assert saved["sregs"]["efer"] & 0x500 == 0x500, "long mode enabled and active"
        leaf1 = next(entry for entry in saved["cpuid"] if (entry["function"], entry["index"]) == (1, 0))
        kvm = Kvm()
        try:  # the TSC-deadline timer wherever KVM emulates it, whether its supported CPUID says so or not
            assert leaf1["ecx"] >> 24 & 1 == kvm.check_extension(Cap.KVM_CAP_TSC_DEADLINE_TIMER)
        finally:
            kvm.close()
        second.restore_state(vm_saved)
        assert vcpus[1].restore_state(saved)() == 0
        again, vm_again = vcpus[1].save_state(), second.save_state()
        ticking = {0x10}  # IA32_TSC
        for part in saved:
            if part == "msrs":
                assert [m for m in saved[part] if m["index"] not in ticking] == [
                    m for m in again[part] if m["index"] not in ticking
                ]
            else:
                assert saved[part] == again[part], part
        assert {k: vm_again[k] for k in ("pic_master", "pic_slave", "ioapic")} == {
            k: vm_saved[k] for k in ("pic_master", "pic_slave", "ioapic")
        }
        second.hold_clock()
        second.release_clock()
    finally:
        for vcpu in vcpus:
            vcpu.close()
        first.close()
        second.close()
        hypervisor.close()


def test_irq_line_and_irqfd_reach_the_in_kernel_interrupt_controllers() -> None:
    """irq_line drives a line's level and a signalled irqfd pulses it; the PICs and the IOAPIC,
    read through ``Vm.save_state``, show it: the PIC latches the edge, the IOAPIC follows the level."""
    hypervisor = open_hypervisor()
    vm = hypervisor.create_vm()
    eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def irr() -> tuple[int, int, int]:
        """The interrupt request registers of the master PIC, the slave PIC and the IOAPIC."""
        state = vm.save_state()
        return state["pic_master"]["irr"], state["pic_slave"]["irr"], state["ioapic"]["irr"]

    try:
        assert irr() == (0, 0, 0)
        vm.irq_line(3, 1)
        assert irr() == (1 << 3, 0, 1 << 3)
        vm.irq_line(3, 0)
        assert irr() == (1 << 3, 0, 0)
        vm.irq_line(10, 1)  # the slave PIC's pin 2, cascaded into the master's pin 2
        assert irr() == (1 << 3 | 1 << 2, 1 << 2, 1 << 10)
        vm.irq_line(10, 0)
        vm.irq_line(20, 1)  # an IOAPIC-only pin
        assert irr() == (1 << 3 | 1 << 2, 1 << 2, 1 << 20)

        vm.irqfd(eventfd, 5)
        os.eventfd_write(eventfd, 1)
        deadline = time.monotonic() + 5
        while not irr()[0] & 1 << 5:  # KVM injects from a work queue, not in the write itself
            assert time.monotonic() < deadline, "the irqfd never raised GSI 5"
            time.sleep(0.001)
        assert not irr()[2] & 1 << 5, "a pulse: the line is low again"
    finally:
        os.close(eventfd)
        vm.close()
        hypervisor.close()
