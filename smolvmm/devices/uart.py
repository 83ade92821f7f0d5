"""A 16550A UART (COM1): the guest's serial console, interrupt-driven both ways.

Register reads and writes come from vCPU threads; host input arrives from the console
task through ``feed``. Transmission is instant: every byte the guest writes to THR goes
straight to ``output`` and THR is empty again, so a THRE interrupt follows each write.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

RX_FIFO_SIZE = 64

# Register offsets
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
_PLAIN = {LCR: "lcr", MCR: "mcr", SCR: "scr"}  # registers that read back what was written
IER_RDA, IER_THRE = 0x01, 0x02
IIR_NONE, IIR_THRE, IIR_RDA, IIR_FIFO = 0x01, 0x02, 0x04, 0xC0
FCR_ENABLE = 0x01
LCR_DLAB = 0x80
MCR_LOOP = 0x10
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80


@dataclass(frozen=True)
class UartState:
    """Everything a 16550A holds, as plain data."""

    dll: int = 0x0C
    dlm: int = 0
    ier: int = 0
    fcr: int = 0
    lcr: int = 0x03
    mcr: int = 0x08
    scr: int = 0
    thre_pending: bool = False
    rx: bytes = b""

    def validate(self) -> None:
        for name in ("dll", "dlm", "ier", "fcr", "lcr", "mcr", "scr"):
            if not 0 <= getattr(self, name) <= 0xFF:
                raise ValueError(f"UART register {name} out of range")
        if len(self.rx) > RX_FIFO_SIZE:
            raise ValueError(f"UART receive FIFO holds {len(self.rx)} bytes, more than {RX_FIFO_SIZE}")


class Uart16550:
    """The register model. ``interrupt`` pulses the UART's IRQ line; ``output`` takes transmitted bytes;
    ``rx_drained`` is called when the receive FIFO can take input again."""

    def __init__(
        self,
        interrupt: Callable[[], None],
        output: Callable[[bytes], None],
        rx_drained: Callable[[], None],
        state: UartState = UartState(),
    ) -> None:
        state.validate()
        self._interrupt = interrupt
        self._output = output
        self._rx_drained = rx_drained
        self._lock = threading.Lock()
        self._regs: dict[str, int] = {k: getattr(state, k) for k in ("dll", "dlm", "ier", "fcr", "lcr", "mcr", "scr")}
        self._thre_pending = state.thre_pending
        self._rx: deque[int] = deque(state.rx)
        # Host input a FIFO reset took while the driver was not listening: the guest never saw it.
        self._held: deque[int] = deque()

    def state(self) -> UartState:
        with self._lock:  # held input is saved as FIFO content: the driver's next reset holds it again
            rx = bytes(self._held) + bytes(self._rx)
            return UartState(**self._regs, thre_pending=self._thre_pending, rx=rx[:RX_FIFO_SIZE])

    def feed(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes fit in the FIFO.

        Nothing fits while the guest's driver has receive interrupts off: until a program opens the
        port (Linux's 8250 startup clears the FIFO and reads RBR, which would discard typed-ahead
        input) or while the driver throttles. ``rx_drained`` says when to offer it again. Input that
        got in while the driver only probed the port (Linux's autoconfig sets IER to 0x0F for a moment,
        then resets the FIFO) is held, not discarded, and put back when receive interrupts come on."""
        with self._lock:
            listening = self._regs["ier"] & IER_RDA
            accepted = data[: RX_FIFO_SIZE - len(self._rx)] if listening else b""
            self._rx.extend(accepted)
            raise_irq = bool(accepted) and self._regs["ier"] & IER_RDA
        if raise_irq:
            self._interrupt()
        return len(accepted)

    def _iir(self) -> int:
        fifo = IIR_FIFO if self._regs["fcr"] & FCR_ENABLE else 0
        if self._regs["ier"] & IER_RDA and self._rx:
            return IIR_RDA | fifo
        if self._regs["ier"] & IER_THRE and self._thre_pending:
            return IIR_THRE | fifo
        return IIR_NONE | fifo

    def _msr(self) -> int:
        mcr = self._regs["mcr"]
        if mcr & MCR_LOOP:  # loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD
            return (mcr & 0x01) << 5 | (mcr & 0x02) << 3 | (mcr & 0x04) << 4 | (mcr & 0x08) << 4
        return MSR_DCD | MSR_DSR | MSR_CTS

    def read(self, offset: int, size: int) -> int:
        drained = False
        with self._lock:
            dlab = self._regs["lcr"] & LCR_DLAB
            if offset == RBR_THR_DLL:
                if dlab:
                    return self._regs["dll"]
                value = self._rx.popleft() if self._rx else 0
                drained = not self._rx
            elif offset == IER_DLM:
                value = self._regs["dlm"] if dlab else self._regs["ier"]
            elif offset == IIR_FCR:
                value = self._iir()
                if value & 0x0F == IIR_THRE:
                    self._thre_pending = False
            elif offset == LSR:
                value = LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
            elif offset == MSR:
                value = self._msr()
            else:
                value = self._regs[_PLAIN[offset]]
        if drained:
            self._rx_drained()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        raise_irq = listening = False
        transmit = None
        with self._lock:
            dlab = self._regs["lcr"] & LCR_DLAB
            if offset == RBR_THR_DLL:
                if dlab:
                    self._regs["dll"] = value
                elif self._regs["mcr"] & MCR_LOOP:
                    if len(self._rx) < RX_FIFO_SIZE:
                        self._rx.append(value)
                    raise_irq = bool(self._regs["ier"] & IER_RDA)
                else:
                    transmit = bytes([value])
                    self._thre_pending = True
                    raise_irq = bool(self._regs["ier"] & IER_THRE)
            elif offset == IER_DLM:
                if dlab:
                    self._regs["dlm"] = value
                else:
                    enabled = value & ~self._regs["ier"]
                    self._regs["ier"] = value & 0x0F
                    if enabled & IER_THRE:
                        self._thre_pending = True
                    listening = bool(enabled & IER_RDA)
                    if listening and self._held:
                        self._rx.extendleft(reversed(self._held))
                        self._held.clear()
                        while len(self._rx) > RX_FIFO_SIZE:
                            self._rx.pop()
                    raise_irq = self._iir() & 0x0F != IIR_NONE
            elif offset == IIR_FCR:
                self._regs["fcr"] = value & 0xC9
                if value & 0x02:
                    if not self._regs["ier"] & IER_RDA and not self._regs["mcr"] & MCR_LOOP:
                        self._held.extend(self._rx)  # the host's input, never read by a listening driver
                        while len(self._held) > RX_FIFO_SIZE:
                            self._held.pop()
                    self._rx.clear()
            elif offset in _PLAIN:
                self._regs[_PLAIN[offset]] = value
        if transmit is not None:
            self._output(transmit)
        if raise_irq:
            self._interrupt()
        if listening:  # the driver takes input now: offer what waited
            self._rx_drained()
