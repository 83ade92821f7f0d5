"""The nested machine's watchdog: its heartbeat, timed with the host's clock, and what QEMU was doing.

The machine's init writes ``beat <activity>`` on the heartbeat port every second of the nested
machine's own time, ``<activity>`` being the first line of the file the job may write to
(``$SMOLVMM_NESTED_ACTIVITY``, e.g. the test running). When the beats stop for ``bound`` seconds of
the host's monotonic clock (the first one, which waits for the kernel to boot, ``BOOT_ALLOWANCE``
seconds more), the nested kernel has stopped (or QEMU has), whatever the inner clocks say; the
harness then gathers evidence with :func:`evidence` and kills QEMU.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

WATCHDOG_ENV = "SMOLVMM_NESTED_WATCHDOG"
WATCHDOG_DEFAULT = 60.0
BOOT_ALLOWANCE = 60.0
"""Seconds the first heartbeat may take beyond the bound: the kernel boots first, slowly under TCG on a busy host."""
ACTIVITY_ENV = "SMOLVMM_NESTED_ACTIVITY"
"""Names, inside the nested machine, the file where a job writes what it is doing (image.ACTIVITY_PATH)."""
_MAX_LINE = 4096
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def watchdog_bound(env: Mapping[str, str] = os.environ) -> float:
    """Seconds without a heartbeat after which the machine counts as frozen (``$SMOLVMM_NESTED_WATCHDOG``)."""
    text = env.get(WATCHDOG_ENV, "")
    if not text:
        return WATCHDOG_DEFAULT
    try:
        bound = float(text)
    except ValueError:
        bound = 0.0
    if not 0 < bound < float("inf"):
        raise ValueError(f"{WATCHDOG_ENV} must be a number of seconds > 0, not {text!r}")
    return bound


@dataclass(frozen=True)
class Progress:
    """A sample of a QEMU process's progress from /proc (absent fields: the process is gone)."""

    state: str = "?"
    cpu: float = 0.0
    io_syscalls: int = 0


def progress(pid: int) -> Progress:
    """``pid``'s scheduler state, CPU time (user + system, all threads) and read/write system calls so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        io = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return Progress()
    fields = stat[stat.rindex(")") + 2 :].split()
    syscalls = sum(int(n) for n in re.findall(r"^sysc[rw]: (\d+)$", io, re.MULTILINE))
    return Progress(fields[0], (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS, syscalls)


POKE_AFTER = 5.0
"""Seconds without a heartbeat after which the harness pokes the machine, and again every as many
seconds of the same silence. Well under the inner kernel's 20 s soft-lockup threshold."""
POKES = ("info registers", "a byte on the heartbeat port")
"""The first poke of a silence, then every later one. The freezes were the idle inner kernel halted,
waiting for a local APIC timer interrupt that QEMU never raised, its vCPU thread asleep the whole
time (BENCHMARKS.md, "The freeze found"): a monitor query does not touch a TCG vCPU, so the first
poke only records the registers of the frozen machine; a byte sent into the machine on its
heartbeat port raises a virtio interrupt, which wakes the halted CPU: in the runs measured, the
beats resumed after it. Each kind counts the beats that followed it."""
PAUSE_PREFIX = "nested-kvm: the heartbeat paused "
PAUSE_LINE = PAUSE_PREFIX + "{seconds:.0f} s while the job ran: {activity}"
"""What the harness prints, once the machine has ended, for each silence of POKE_AFTER seconds or
more that a beat ended (one line each; see :func:`pauses`)."""
_PAUSE = re.compile(re.escape(PAUSE_PREFIX) + r"(\d+) s while the job ran: (.*)")


def pauses(lines: Iterable[str]) -> dict[str, float]:
    """Seconds of pauses per activity in output that holds :data:`PAUSE_LINE` lines (among others)."""
    paused: dict[str, float] = {}
    for line in lines:
        if match := _PAUSE.search(line):
            activity = match[2].strip()
            paused[activity] = paused.get(activity, 0.0) + int(match[1])
    return paused


@dataclass
class Heartbeat:
    """QEMU ``pid``'s heartbeat port: how many beats, the host's monotonic time of the last one (at first,
    QEMU's start), the job's activity it carried and QEMU's progress then; how often a silence was poked
    and how often a beat followed the poke, per monitor command of :data:`POKES`."""

    bound: float
    pid: int
    last: float = field(default_factory=time.monotonic)
    beats: int = 0
    activity: str = ""
    pokes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(POKES, 0))
    woken: dict[str, int] = field(default_factory=lambda: dict.fromkeys(POKES, 0))
    at_last: Progress = field(init=False)
    paused: list[tuple[str, float]] = field(default_factory=list)
    """(the job's activity, seconds) of each silence poked that a beat ended: the machine stalled and woke."""
    silent_registers: str = ""
    """The first ``info registers`` poke's answer in the current silence: the machine while frozen
    (the evidence's own dump comes after whatever woke it)."""
    _poked_at: float | None = field(default=None, init=False, repr=False)
    _last_poke: str = field(default=POKES[0], init=False, repr=False)
    _partial: bytes = field(default=b"", init=False, repr=False)

    def __post_init__(self) -> None:
        self.at_last = progress(self.pid)

    def feed(self, data: bytes) -> None:
        """Take bytes read from the heartbeat port."""
        *lines, partial = (self._partial + data).split(b"\n")
        self._partial = partial[-_MAX_LINE:]
        for line in lines:
            if line.startswith(b"beat"):
                self.beats += 1
                now = time.monotonic()
                silence, self.last = now - self.last, now
                if self._poked_at is not None:
                    self.woken[self._last_poke] += 1
                    self.paused.append((self.activity, silence))
                    self._poked_at = None
                    self.silent_registers = ""
                text = line[5:_MAX_LINE].decode(errors="replace").strip()
                self.activity = "".join(c if c.isprintable() else "?" for c in text)  # the guest wrote it
                self.at_last = progress(self.pid)

    def needs_poke(self) -> bool:
        """Silent for POKE_AFTER seconds since the last beat or poke (never before the first beat: the boot)."""
        since = max(self.last, self._poked_at or 0.0)
        return self.beats > 0 and time.monotonic() - since >= POKE_AFTER

    def poke(self, monitor_socket: Path, port: socket.socket | None) -> None:
        """The first poke of a silence records the frozen machine's registers; later ones send a
        byte into the machine on its heartbeat ``port`` (:data:`POKES`)."""
        self._last_poke = POKES[0] if self._poked_at is None else POKES[1]
        self.pokes[self._last_poke] += 1
        silent = time.monotonic() - self.last
        self._poked_at = time.monotonic()
        if self._last_poke == POKES[0]:
            answer = monitor(monitor_socket, "info registers", timeout=1.0)
            self.silent_registers = f"{silent:.0f} s without a heartbeat:\n{answer}"
        elif port is not None:
            with contextlib.suppress(OSError):  # a full socket buffer: the machine reads nothing anyway
                port.send(b"\n", socket.MSG_DONTWAIT)

    def poke_summary(self) -> str:
        """One line on the pokes, or "" if there were none."""
        if not any(self.pokes.values()):
            return ""
        return (
            f"the heartbeat paused {POKE_AFTER:g} s or more {self.pokes[POKES[0]]} time(s); the machine was"
            " poked "
            + ", ".join(
                f"with {kind!r} {self.pokes[kind]} time(s), a beat following {self.woken[kind]}" for kind in POKES
            )
        )

    def pause_lines(self) -> list[str]:
        """One :data:`PAUSE_LINE` per silence that a beat ended."""
        return [PAUSE_LINE.format(seconds=seconds, activity=activity or "-") for activity, seconds in self.paused]

    def silent_for(self) -> float:
        """Host seconds since the last beat."""
        return time.monotonic() - self.last

    def frozen(self) -> bool:
        """No beat for the bound (the first beat, which waits for the boot: BOOT_ALLOWANCE more)."""
        return self.silent_for() >= self.bound + (0 if self.beats else BOOT_ALLOWANCE)

    def qemu_summary(self) -> str:
        """What QEMU did since the last beat, in a few words."""
        now = progress(self.pid)
        cpu, syscalls = now.cpu - self.at_last.cpu, now.io_syscalls - self.at_last.io_syscalls
        doing = {"T": "stopped", "t": "stopped", "R": "running", "D": "blocked in the host kernel"}.get(
            now.state, "idle"
        )
        return f"QEMU {doing} (state {now.state}; {cpu:.1f} s of CPU and {syscalls} read/write system calls since)"

    def headline(self) -> str:
        """The one line that says the machine froze, for how long, and what the job was doing."""
        running = self.activity or "(the job had not reported what it was doing)"
        since = "" if self.beats else " since QEMU started"
        return (
            f"the nested machine froze, not the command: no heartbeat for {self.silent_for():.0f} s{since} "
            f"({WATCHDOG_ENV}={self.bound:g}); {self.qemu_summary()}; it was running: {running}"
        )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError as exc:
        return f"({exc.strerror})"


def threads(pid: int) -> str:
    """One line per QEMU thread: id, name, state, CPU seconds, kernel wait channel, system call."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*"), key=lambda p: int(p.name)):
        stat = _read(task / "stat")
        fields = stat[stat.rfind(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS if len(fields) > 12 else 0.0
        state = fields[0] if fields else "?"
        syscall = _read(task / "syscall").split(" ", 1)[0]
        lines.append(
            f"{task.name} {_read(task / 'comm')} state={state} cpu={cpu:.1f}s "
            f"wchan={_read(task / 'wchan') or '-'} syscall={syscall}"
        )
    return "\n".join(lines)


def monitor(path: Path, command: str, timeout: float = 3.0) -> str:
    """``command``'s answer from QEMU's human monitor at ``path``, or why there was none."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            received = b""
            deadline = time.monotonic() + timeout
            sent = False
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
                if received.endswith(b"(qemu) "):
                    if sent:
                        break
                    sock.sendall(command.encode() + b"\n")
                    sent, received = True, b""
            if not sent:
                return "(the monitor did not answer)"
            text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]|\r", "", received.decode(errors="replace"))
            return text.partition("\n")[2].removesuffix("(qemu) ").strip()  # after the echo of the command
    except OSError as exc:
        return f"(the monitor did not answer: {exc})"


def evidence(headline: str, pid: int, console: Path, monitor_socket: Path, heartbeat: Heartbeat) -> str:
    """Everything the host can learn about a stopped nested machine whose QEMU ``pid`` still runs."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    proc = Path(f"/proc/{pid}")
    parts = [
        f"{when}: {headline}",
        f"heartbeats received: {heartbeat.beats}; the job's last activity: {heartbeat.activity or '(none reported)'}",
        f"pokes of the silent machine: {heartbeat.poke_summary() or 'none'}",
        f"--- QEMU (pid {pid}) threads ---\n{threads(pid)}",
        f"--- /proc/{pid}/stat ---\n{_read(proc / 'stat')}",
        f"--- /proc/{pid}/wchan ---\n{_read(proc / 'wchan')}",
        f"--- /proc/{pid}/status ---\n{_read(proc / 'status')}",
        f"--- QEMU monitor: info registers, during the silence ---\n{heartbeat.silent_registers or '(not asked)'}",
        f"--- QEMU monitor: info registers, now ---\n{monitor(monitor_socket, 'info registers')}",
        f"--- nested console (last 200 lines) ---\n{tail(console, 200)}",
    ]
    return "\n".join(parts) + "\n"


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a text file ("" if it does not exist)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""
