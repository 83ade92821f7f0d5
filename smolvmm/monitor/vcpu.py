"""One vCPU's thread: the guest runs in it, port and MMIO accesses are served inline, and it
parks on request.

The thread only moves register accesses between the guest and the device models and goes
straight back into the guest; anything slow happens in device tasks. It leaves the guest when
kicked (``Vcpu.interrupt`` plus a signal, for a run call blocked in the kernel) to park, or to
end when the machine stops.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from smolvmm.devices.bus import Bus
from smolvmm.errors import UsageError
from smolvmm.hypervisor.interface import StopKind, Vcpu
from smolvmm.monitor.exit import ExitReason, MachineExit

KICK_SIGNAL = signal.SIGRTMIN + 3


def install_kick_handler() -> None:
    """A no-op handler for the kick signal, so it interrupts a blocked run instead of killing the process.

    Python installs signal handlers from the main thread only; the first machine must be
    started there (any event loop on the main thread qualifies).
    """
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        if threading.current_thread() is not threading.main_thread():
            raise UsageError("the first machine must be started from the main thread (to install its kick signal)")
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class VcpuThread:
    """Drives one vCPU on its own thread until the machine stops."""

    def __init__(
        self,
        vcpu: Vcpu,
        pio: Bus,
        mmio: Bus,
        on_exit: Callable[[MachineExit], None],
        on_parked: Callable[[], None],
        on_done: Callable[[], None],
        paused: bool = False,
    ) -> None:
        self.vcpu = vcpu
        self._on_parked = on_parked
        self._on_done = on_done
        self._pio = pio
        self._mmio = mmio
        self._on_exit = on_exit
        self._cond = threading.Condition()
        self._stop = False
        self._pause = paused
        self.parked = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"vcpu{vcpu.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _kick(self) -> None:
        self.vcpu.interrupt()
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
            self.vcpu.clear_interrupt()
            return not self._stop

    def _loop(self) -> None:
        while self._wait_while_paused():
            stop = self.vcpu.run(self._pio, self._mmio)
            if stop.kind != StopKind.INTERRUPTED:
                self._on_exit(MachineExit(_EXIT_REASONS[stop.kind], stop.detail))
                return


_EXIT_REASONS = {
    StopKind.POWEROFF: ExitReason.POWEROFF,
    StopKind.RESET: ExitReason.REBOOT,
    StopKind.CRASH: ExitReason.CRASH,
}
