"""The 16550A model, driven as Linux's 8250 driver drives it."""

from __future__ import annotations

from smolvmm.devices.uart import IER_DLM, IIR_FCR, LCR, LSR, MCR, MSR, RBR_THR_DLL, SCR, Uart16550


def _uart() -> tuple[Uart16550, list[str], bytearray]:
    events: list[str] = []
    out = bytearray()
    uart = Uart16550(lambda: events.append("irq"), out.extend, lambda: events.append("drained"))
    return uart, events, out


def test_probe_sees_a_16550a_with_fifo_scratch_and_loopback() -> None:
    uart, _, _ = _uart()
    uart.write(SCR, 1, 0xA5)
    assert uart.read(SCR, 1) == 0xA5
    uart.write(IIR_FCR, 1, 0x01)  # enable FIFOs
    assert uart.read(IIR_FCR, 1) & 0xC0 == 0xC0
    uart.write(MCR, 1, 0x10 | 0x0A)  # loopback with RTS and OUT2
    assert uart.read(MSR, 1) & 0xF0 == 0x90
    uart.write(LCR, 1, 0x80)  # DLAB: divisor latch
    uart.write(RBR_THR_DLL, 1, 0x01)
    assert uart.read(RBR_THR_DLL, 1) == 0x01


def test_transmit_raises_thre_interrupts_and_output() -> None:
    uart, events, out = _uart()
    uart.write(LCR, 1, 0x03)
    uart.write(IER_DLM, 1, 0x02)  # enabling THRE with THR empty interrupts at once
    assert events == ["irq"] and uart.read(IIR_FCR, 1) & 0x0F == 0x02
    assert uart.read(IIR_FCR, 1) & 0x0F == 0x01  # reading IIR cleared it
    uart.write(RBR_THR_DLL, 1, ord("A"))
    assert out == b"A" and events == ["irq", "irq"]
    assert uart.read(LSR, 1) & 0x60 == 0x60


def test_receive_fifo_bounds_and_interrupts() -> None:
    uart, events, _ = _uart()
    uart.write(IER_DLM, 1, 0x01)
    assert uart.feed(b"x" * 100) == 64  # the FIFO holds 64 bytes; the rest waits
    assert events == ["drained", "irq"] and uart.read(LSR, 1) & 1  # enabling RDA offered input
    assert bytes(uart.read(RBR_THR_DLL, 1) for _ in range(64)) == b"x" * 64
    assert events[-1] == "drained" and not uart.read(LSR, 1) & 1
    assert uart.read(RBR_THR_DLL, 1) == 0  # reading an empty FIFO is harmless


def test_typed_ahead_input_waits_until_the_driver_listens_and_survives_its_fifo_reset() -> None:
    """Input sent before a program opens the port is held on the host side, not put in the FIFO
    that the 8250 driver's startup clears (FCR) and drains (RBR reads)."""
    uart, events, _ = _uart()
    assert uart.feed(b"nproc\n") == 0  # no program has the port open: receive interrupts are off
    uart.write(IIR_FCR, 1, 0x07)  # startup: enable and clear both FIFOs...
    assert not uart.read(LSR, 1) & 1 and uart.read(RBR_THR_DLL, 1) == 0  # ...and drain RBR
    events.clear()
    uart.write(IER_DLM, 1, 0x05)  # receive interrupts on: the port is open
    assert events == ["drained"]  # the console task offers what waited
    assert uart.feed(b"nproc\n") == 6 and events[-1] == "irq"
    assert bytes(uart.read(RBR_THR_DLL, 1) for _ in range(6)) == b"nproc\n"
    uart.write(IER_DLM, 1, 0x00)  # throttled (or closed): input waits again
    assert uart.feed(b"more") == 0


def test_input_taken_during_the_drivers_probe_is_held_through_its_fifo_reset() -> None:
    """Linux's autoconfig turns every interrupt on for a moment (IER 0x0F) to check the register,
    then puts IER back and resets the FIFO: input offered in that moment reaches the program that
    opens the port (a user's kernel with no ready marker sends stdin from the start)."""
    uart, events, _ = _uart()
    assert uart.feed(b"echo hi\n") == 0
    uart.write(IER_DLM, 1, 0x0F)  # autoconfig's IER test
    assert events == ["irq", "drained"]
    assert uart.feed(b"echo hi\n") == 8  # the console task offered its input at once
    uart.write(IER_DLM, 1, 0x00)  # IER put back
    uart.write(IIR_FCR, 1, 0x07)  # the probe resets the FIFOs...
    assert not uart.read(LSR, 1) & 1 and uart.read(RBR_THR_DLL, 1) == 0  # ...and startup drains RBR
    assert uart.state().rx == b"echo hi\n"  # a snapshot keeps it
    events.clear()
    uart.write(IER_DLM, 1, 0x05)  # a program opened the port
    assert events == ["irq", "drained"]
    assert bytes(uart.read(RBR_THR_DLL, 1) for _ in range(8)) == b"echo hi\n"
    uart.write(IIR_FCR, 1, 0x07)  # a reset while the driver listens discards, as on hardware
    uart.write(IER_DLM, 1, 0x00)
    uart.write(IER_DLM, 1, 0x05)
    assert not uart.read(LSR, 1) & 1
