"""One vCPU's thread: KVM_RUN in a loop, port and MMIO exits served inline, parked on request.

The thread only moves register accesses between the guest and the device models and goes
straight back into the guest; anything slow happens in device tasks. It leaves KVM_RUN when
kicked (``immediate_exit`` plus a signal) to park, or to end when the machine stops.
"""

from __future__ import annotations

import enum
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .devices.bus import Bus
from .errors import GuestError
from .hypervisor.kvm.bindings import ffi
from .hypervisor.kvm.ioctls import (
    KVM_EXIT_IO_OUT,
    KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
    Exit,
)
from .hypervisor.kvm.vcpu import KvmVcpu

KICK_SIGNAL = signal.SIGRTMIN + 3


class ExitReason(enum.Enum):
    """How a machine ended."""

    POWEROFF = "poweroff"
    REBOOT = "reboot"
    CRASH = "crash"
    STOPPED = "stopped"


@dataclass(frozen=True)
class MachineExit:
    reason: ExitReason
    detail: str = ""


def install_kick_handler() -> None:
    """A no-op handler for the kick signal, so it interrupts KVM_RUN instead of killing the process.

    Python installs signal handlers from the main thread only; the first machine must be
    started there (any event loop on the main thread qualifies).
    """
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        if threading.current_thread() is not threading.main_thread():
            raise GuestError("the first machine must be started from the main thread (to install its kick signal)")
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class VcpuThread:
    """Drives one KvmVcpu on its own thread until the machine stops."""

    def __init__(
        self,
        vcpu: KvmVcpu,
        pio: Bus,
        mmio: Bus,
        on_exit: Callable[[MachineExit], None],
        on_parked: Callable[[], None],
        on_done: Callable[[], None],
    ) -> None:
        self.vcpu = vcpu
        self._on_parked = on_parked
        self._on_done = on_done
        self._pio = pio
        self._mmio = mmio
        self._on_exit = on_exit
        self._cond = threading.Condition()
        self._stop = False
        self._pause = False
        self.parked = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"vcpu{vcpu.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _kick(self) -> None:
        self.vcpu.kvm_run.immediate_exit = 1
        ident = self._thread.ident
        if ident is not None and self._thread.is_alive():
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._kick()

    def pause(self) -> None:
        with self._cond:
            self._pause = True
        self._kick()

    def resume(self) -> None:
        with self._cond:
            self._pause = False
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        if self._thread.ident is not None:
            self._thread.join()

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported by the machine, which stops every other task
            self.error = exc
            self._on_exit(MachineExit(ExitReason.CRASH, f"vCPU {self.vcpu.id}: {exc}"))
        finally:
            self._on_done()

    def _wait_while_paused(self) -> bool:
        """Park while a pause is requested; False when the machine is stopping."""
        with self._cond:
            if self._pause and not self._stop:
                self.parked = True
                self._on_parked()
                while self._pause and not self._stop:
                    self._cond.wait()
                self.parked = False
            self.vcpu.kvm_run.immediate_exit = 0
            return not self._stop

    def _loop(self) -> None:
        run = self.vcpu.kvm_run
        while self._wait_while_paused():
            reason = self.vcpu.run()
            if reason == Exit.KVM_EXIT_IO:
                self._port_io(run.io)
            elif reason == Exit.KVM_EXIT_MMIO:
                self._mmio_access(run.mmio)
            elif reason in (Exit.KVM_EXIT_INTR, Exit.KVM_EXIT_HLT, Exit.KVM_EXIT_IRQ_WINDOW_OPEN):
                continue
            elif reason == Exit.KVM_EXIT_SHUTDOWN:
                self._on_exit(MachineExit(ExitReason.REBOOT, "triple fault"))
                return
            elif reason == Exit.KVM_EXIT_SYSTEM_EVENT:
                self._system_event(run.system_event.type)
                return
            else:
                self._on_exit(MachineExit(ExitReason.CRASH, self._describe_failure(reason)))
                return

    def _port_io(self, io) -> None:
        data = self.vcpu.io_data()
        size = io.size
        if io.direction == KVM_EXIT_IO_OUT:
            for i in range(io.count):
                self._pio.write(io.port, size, int.from_bytes(data[i * size : (i + 1) * size], "little"))
        else:
            for i in range(io.count):
                data[i * size : (i + 1) * size] = self._pio.read(io.port, size).to_bytes(size, "little")

    def _mmio_access(self, mmio) -> None:
        length = mmio.len
        if length not in (1, 2, 4, 8):
            return
        buffer = ffi.buffer(mmio.data, length)
        if mmio.is_write:
            self._mmio.write(mmio.phys_addr, length, int.from_bytes(buffer[:], "little"))
        else:
            buffer[:] = self._mmio.read(mmio.phys_addr, length).to_bytes(length, "little")

    def _system_event(self, kind: int) -> None:
        if kind == KVM_SYSTEM_EVENT_SHUTDOWN:
            self._on_exit(MachineExit(ExitReason.POWEROFF, "system event: shutdown"))
        elif kind == KVM_SYSTEM_EVENT_RESET:
            self._on_exit(MachineExit(ExitReason.REBOOT, "system event: reset"))
        elif kind == KVM_SYSTEM_EVENT_CRASH:
            self._on_exit(MachineExit(ExitReason.CRASH, "system event: guest crash"))
        else:
            self._on_exit(MachineExit(ExitReason.CRASH, f"system event {kind}"))

    def _describe_failure(self, reason: Exit) -> str:
        run = self.vcpu.kvm_run
        if reason == Exit.KVM_EXIT_INTERNAL_ERROR:
            return f"vCPU {self.vcpu.id}: KVM internal error, suberror {run.internal.suberror}"
        if reason == Exit.KVM_EXIT_FAIL_ENTRY:
            return f"vCPU {self.vcpu.id}: KVM entry failed, hardware reason {run.fail_entry.hardware_entry_failure_reason:#x}"
        return f"vCPU {self.vcpu.id}: unexpected exit {reason.name}"
