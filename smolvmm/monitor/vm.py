"""A virtual machine's host-side parts: KVM objects, guest RAM, buses, devices and vCPUs.

Everything here is synchronous and runs before the guest first runs (``smolvmm.monitor.machine`` runs it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from smolvmm.arch.interface import Arch, PlatformDevice
from smolvmm.arch.machines import host_arch
from smolvmm.devices.acpi_power import AcpiSleepRegister
from smolvmm.devices.bus import Bus, ReadHandler, WriteHandler
from smolvmm.devices.i8042 import I8042
from smolvmm.devices.uart import Uart16550, UartState
from smolvmm.devices.virtio.device import VirtioDevice
from smolvmm.devices.virtio.mmio import MMIO_SIZE, QUEUE_NOTIFY_OFFSET, MmioTransport
from smolvmm.errors import HypervisorError, ImageError
from smolvmm.host.eventfd import EventFd
from smolvmm.host.memory import GuestMemory
from smolvmm.hypervisor import open_hypervisor
from smolvmm.hypervisor.interface import Capabilities, Hypervisor, Vcpu, Vm
from smolvmm.monitor.console import Console, VirtioConsoleInput
from smolvmm.monitor.exit import ExitReason, MachineExit
from smolvmm.monitor.vcpu import VcpuThread


class VirtualMachine:
    """One VM on KVM with its legacy devices; ``close()`` releases every fd and mapping."""

    def __init__(
        self,
        memory: GuestMemory,
        vcpus: int,
        on_exit: Callable[[MachineExit], None],
        virtio_console: VirtioConsoleInput | None = None,
        uart_state: UartState | None = None,
        *,
        hypervisor: Hypervisor | None = None,
        arch: Arch | None = None,
        started: StartedVm | None = None,
    ) -> None:
        """A VM of ``arch`` (this host's when None) on ``hypervisor`` (this host's when None),
        owning it, ``memory`` and ``started`` (``start_vm`` of the two) from here on."""
        self._closers: list[Callable[[], None]] = [memory.close]
        self.memory = memory
        self.arch = arch or host_arch()
        try:
            self.hypervisor = hypervisor or open_hypervisor()
        except BaseException:
            memory.close()
            raise
        self._closers.append(self.hypervisor.close)
        try:
            self._started = started or start_vm(self.hypervisor, memory)
        except BaseException:
            self.close()
            raise
        self._closers.append(self._started.close)
        self.vm = self._started.vm
        try:
            self._setup(vcpus, on_exit, virtio_console, uart_state)
        except BaseException:
            self.close()
            raise

    def _setup(
        self,
        vcpus: int,
        on_exit: Callable[[MachineExit], None],
        virtio_console: VirtioConsoleInput | None,
        uart_state: UartState | None,
    ) -> None:
        self._notifiers: list[tuple[int, int, int]] | None = []  # (eventfd, address, queue) until ``ready``

        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self.on_exit = on_exit
        # The machine's console is the UART, or a virtio console port when the guest uses hvc0;
        # either way the UART's output (early kernel messages) lands in it.
        self.console = virtio_console.console if virtio_console else Console(self._feed_console)
        self._closers.append(self.console.close_fds)
        for device in self.arch.platform_devices:
            read, write = self._platform_model(device, uart_state)
            (self.pio if device.bus == "pio" else self.mmio).add(device.base, device.size, read, write)

        self.vcpus: list[Vcpu] = []
        for index in range(vcpus):
            vcpu = self.vm.create_vcpu(index)
            self._closers.append(vcpu.close)
            self.vcpus.append(vcpu)
        self.threads: list[VcpuThread] = []
        self.virtio_slots: list[tuple[int, int, int]] = []  # (mmio base, size, gsi) per virtio device
        self.transports: list[MmioTransport] = []
        self.console_roles: list[str] = []  # per virtio console, in slot order: main, socket

    def _platform_model(self, device: PlatformDevice, uart_state: UartState | None) -> tuple[ReadHandler, WriteHandler]:
        """The model behind one of the architecture's platform devices: its register handlers."""
        on_exit = self.on_exit
        if device.kind == "uart16550":
            irq = self.irq_eventfd(device.irq)
            state = uart_state or UartState()
            self.uart = Uart16550(irq.signal, self.console.write_output, self.console.input_space.signal, state)
            return self.uart.read, self.uart.write
        if device.kind == "i8042":
            i8042 = I8042(lambda: on_exit(MachineExit(ExitReason.REBOOT, "i8042 reset")))
            return i8042.read, i8042.write
        if device.kind == "acpi-sleep":
            power = AcpiSleepRegister(lambda: on_exit(MachineExit(ExitReason.POWEROFF, "ACPI S5")))
            return power.read, power.write
        raise HypervisorError(f"smolvmm has no {device.kind} model yet: {self.arch.name} machines cannot run")

    def add_virtio(self, device: VirtioDevice, console_role: str | None = None) -> MmioTransport:
        """Attach ``device`` behind a virtio-mmio transport in the next free slot (before boot).

        A virtio console says what its host side is: ``main`` (the machine's console) or ``socket``.
        """
        try:
            transport = MmioTransport(device, self.memory)
        except BaseException:
            device.close()
            raise
        self._closers.append(transport.close)
        base, gsi = self.arch.virtio_slot(len(self.transports))
        self.mmio.add(base, MMIO_SIZE, transport.mmio_read, transport.mmio_write)
        for address, word, clears in transport.interrupt_words(base):
            self.mmio.add_word(address, word, clears)
        self.vm.irqfd(transport.irq_fd, gsi)
        if self.hypervisor.capabilities.ioeventfd:  # else the notify write exits and the transport signals
            notifiers = [(fd, base + QUEUE_NOTIFY_OFFSET, index) for index, fd in enumerate(transport.notify_fds)]
            if self._notifiers is None:
                self._wire(notifiers)
            else:
                self._notifiers += notifiers
        self.transports.append(transport)
        self.virtio_slots.append((base, MMIO_SIZE, gsi))
        if console_role is not None:
            self.console_roles.append(console_role)
        return transport

    def ready(self) -> None:
        """Wait until guest RAM is registered with the hypervisor, then wire the queues' ioeventfds:
        before any vCPU state is set (MSRs such as the PV EOI's name guest pages) or a vCPU runs."""
        if self._notifiers is None:
            return
        self._started.ram.wait()
        notifiers, self._notifiers = self._notifiers, None
        self._wire(notifiers)

    def _wire(self, notifiers: list[tuple[int, int, int]]) -> None:
        for fd, address, queue in notifiers:
            self.vm.ioeventfd(fd, address, 4, queue)

    def _feed_console(self, data: bytes) -> int:
        return self.uart.feed(data)

    def irq_eventfd(self, gsi: int) -> EventFd:
        """An eventfd whose every write pulses ``gsi`` (a KVM irqfd)."""
        eventfd = EventFd()
        self._closers.append(eventfd.close)  # before the irqfd call, which may fail
        self.vm.irqfd(eventfd.fd, gsi)
        return eventfd

    def setup_boot(self, kernel: Path, initrd: Path | None, cmdline: str) -> None:
        """Load a kernel (once its virtio devices are attached) and put every vCPU in its boot
        state: the boot vCPU at the kernel's entry, the others waiting to be started."""
        try:
            kernel_data = kernel.read_bytes()
            initrd_data = initrd.read_bytes() if initrd else None
        except OSError as exc:
            raise ImageError(f"cannot read {exc.filename}: {exc.strerror}") from None
        self.ready()
        vcpus = len(self.vcpus)
        boot = self.arch.load_linux(self.memory, kernel_data, initrd_data, cmdline, vcpus, len(self.transports))
        for vcpu in self.vcpus:
            vcpu.set_boot_state(vcpus=vcpus, entry=boot.entry, argument=boot.argument)

    def vcpu_threads(
        self, on_parked: Callable[[], None], on_done: list[Callable[[], None]], paused: bool = False
    ) -> list[VcpuThread]:
        """One thread per vCPU, not yet started, each calling its ``on_done`` as it ends; with
        ``paused`` each parks before it first enters the guest."""
        self.ready()
        self.threads = [
            VcpuThread(vcpu, self.pio, self.mmio, self.on_exit, on_parked, done, paused)
            for vcpu, done in zip(self.vcpus, on_done, strict=True)
        ]
        return self.threads

    def hold_clock(self) -> None:
        """While every vCPU is parked: note the guest clock, so ``release_clock`` hides the pause."""
        self.vm.hold_clock()

    def release_clock(self) -> None:
        """Before the vCPUs run again: the guest clock carries on from where ``hold_clock`` read it.

        Otherwise a long pause looks to the guest like CPUs that stopped answering (RCU stall and
        soft-lockup reports), as QEMU avoids the same way."""
        self.vm.release_clock()

    def close(self) -> None:
        """Release everything, newest first. vCPU threads must have been stopped."""
        while self._closers:
            try:
                self._closers.pop()()
            except OSError:
                pass


class StartedVm:
    """A VM just created, its guest RAM's slots being registered on a thread (``start_vm``)."""

    def __init__(self, vm: Vm, ram: _RamSlots) -> None:
        self.vm, self.ram = vm, ram

    def close(self) -> None:
        """Wait for the slots' thread, then close the VM."""
        self.ram.join()
        self.vm.close()


def start_vm(hypervisor: Hypervisor, memory: GuestMemory) -> StartedVm:
    """Create a VM on ``hypervisor`` and start registering ``memory`` as its guest RAM, which takes
    a while: a restore starts it as soon as it knows the RAM layout."""
    _check_capabilities(hypervisor.flavour, hypervisor.capabilities)
    vm = hypervisor.create_vm()
    try:
        return StartedVm(vm, _RamSlots(vm, memory))
    except BaseException:
        vm.close()
        raise


class _RamSlots(threading.Thread):
    """Guest RAM's memory slots, registered on a thread of their own while the devices are built.

    KVM spends milliseconds of kernel time on a slot (6 of a 256 MiB restore's 8 ms of ioctls on a
    PVM host), the GIL released; it holds the VM's slots lock meanwhile, so ioeventfds wait for it.
    """

    def __init__(self, vm: Vm, memory: GuestMemory) -> None:
        super().__init__(name="ram-slots", daemon=True)
        self._vm, self._memory = vm, memory
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            for slot, region in enumerate(self._memory.regions):
                self._vm.map_memory(slot, region.gpa, region.size, region.host_address)
        except BaseException as exc:  # raised in the thread that waits for the slots
            self._error = exc

    def wait(self) -> None:
        """Return once every slot is registered; raise what registering one raised."""
        self.join()
        if self._error is not None:
            raise self._error


def _check_capabilities(flavour: str, capabilities: Capabilities) -> None:
    """Refuse a hypervisor without what the monitor relies on: it has no userspace interrupt
    controller, and devices raise their interrupts through irqfds."""
    if not (capabilities.irqchip and capabilities.irqfd):
        raise HypervisorError(f"{flavour} has no in-kernel interrupt controller with irqfd, which smolvmm needs")
