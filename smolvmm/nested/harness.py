"""Run one command inside the nested KVM machine (QEMU TCG with emulated AMD-V) and report back.

The command's stdout and stderr come back live through two virtio-serial ports, its exit status
through a third, the machine's heartbeat through a fourth (see ``watchdog``); the kernel console goes
to a log whose tail explains a failure of the machine itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from smolvmm.errors import SmolvmmError
from smolvmm.nested.image import ACTIVITY_PATH, END_OF_STREAM, FAILED, HEARTBEAT, HOSTROOT_TAG, PORTS, nested_image
from smolvmm.nested.watchdog import ACTIVITY_ENV, Heartbeat, evidence, tail, threads, watchdog_bound

HARNESS_FAILURE = 125
NESTED_FROZE = 124
"""The exit status of tools/nested-kvm when its watchdog found the nested machine frozen."""
QEMU = "qemu-system-x86_64"
APPEND_ENV = "SMOLVMM_NESTED_APPEND"
"""Extra arguments for the nested machine's kernel command line (appended to the harness's)."""
QEMU_ARGS_ENV = "SMOLVMM_NESTED_QEMU_ARGS"
"""Extra QEMU options, split like a shell would (after the harness's; an ``-accel`` here replaces its own)."""
_FORWARDED = {"PATH", "HOME", "VIRTUAL_ENV", "XDG_CACHE_HOME", "TERM", "LANG", "LANGUAGE", "TZ", "USER", "CI"}
_FORWARDED_PREFIXES = ("SMOLVMM_", "PYTHON", "LC_")
_PR_SET_PDEATHSIG = 1


class HarnessError(SmolvmmError):
    """The nested machine itself failed; the message names the layer, ``console`` holds the log tail,
    ``evidence`` all the host could gather about the failure (for a log file)."""

    def __init__(self, message: str, console: str = "", evidence: str = "") -> None:
        super().__init__(message)
        self.console = console
        self.evidence = evidence or f"{message}\n--- nested console (tail) ---\n{console}\n"


class NestedMachineFroze(HarnessError):
    """The watchdog's heartbeat stopped: the nested machine froze (its kernel or QEMU), not the command.

    ``threads`` says what each QEMU thread was doing when it was killed.
    """

    def __init__(self, message: str, console: str, evidence: str, threads: str) -> None:
        super().__init__(message, console, evidence)
        self.threads = threads


@dataclass(frozen=True)
class MachineSettings:
    """Settings tried against the x86 nested machine's freezes without editing code (BENCHMARKS.md)."""

    append: str = ""
    """Appended to the nested kernel's command line as written."""
    qemu_args: tuple[str, ...] = ()


def machine_settings(env: Mapping[str, str] = os.environ) -> MachineSettings:
    """The extra settings ``$SMOLVMM_NESTED_APPEND`` and ``$SMOLVMM_NESTED_QEMU_ARGS`` ask for.

    Raises ValueError, with one line naming the variable, for a control character or unbalanced quotes.
    """
    append, qemu_args = env.get(APPEND_ENV, "").strip(), env.get(QEMU_ARGS_ENV, "")
    for name, text in ((APPEND_ENV, append), (QEMU_ARGS_ENV, qemu_args)):
        if not text.isprintable():
            raise ValueError(f"{name} holds a control character: {text!r}")
    try:
        return MachineSettings(append, tuple(shlex.split(qemu_args)))
    except ValueError as exc:
        raise ValueError(f"{QEMU_ARGS_ENV} cannot be split into arguments ({exc}): {qemu_args!r}") from None


@dataclass
class Job:
    """A command to run inside the nested machine."""

    command: Sequence[str]
    cwd: Path = field(default_factory=Path.cwd)
    outs: Sequence[Path] = ()
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    timeout: float = 1800.0
    watchdog: float = field(default_factory=watchdog_bound)
    """Seconds without a heartbeat after which the machine counts as frozen (``$SMOLVMM_NESTED_WATCHDOG``)."""
    settings: MachineSettings = field(default_factory=machine_settings)
    """Extra kernel arguments and QEMU options (``$SMOLVMM_NESTED_APPEND``, ``$SMOLVMM_NESTED_QEMU_ARGS``)."""


def forwarded_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables that make sense inside the nested machine, marked with SMOLVMM_NESTED=1, and
    $SMOLVMM_NESTED_ACTIVITY: the file whose first line each heartbeat reports (e.g. the test running)."""
    kept = {k: v for k, v in env.items() if k in _FORWARDED or k.startswith(_FORWARDED_PREFIXES)}
    return {**kept, "SMOLVMM_NESTED": "1", ACTIVITY_ENV: ACTIVITY_PATH}


def job_script(job: Job) -> str:
    """The shell script the nested machine's init runs chrooted into the host root."""
    lines = [f"export {name}={shlex.quote(value)}" for name, value in sorted(forwarded_env(job.env).items())]
    # On the overlay, bytecode lands in a tmpfs that is discarded: writing it only saves recompiling.
    lines.append(
        "if [ -e /run/smolvmm/readonly ]; then export PYTHONDONTWRITEBYTECODE=1; else unset PYTHONDONTWRITEBYTECODE; fi"
    )
    lines.append(f"cd {shlex.quote(str(job.cwd))} || exit {HARNESS_FAILURE}")
    lines.append("exec " + shlex.join(job.command))
    return "\n".join(lines) + "\n"


def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz (TCG's guest TSC runs at the host's rate)."""
    sysfs = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
    if sysfs.exists():
        return int(sysfs.read_text())
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    return round(float(match.group(1)) * 1000) if match else None


def qemu_command(
    kernel: Path, initrd: Path, workdir: Path, outs: Sequence[Path], settings: MachineSettings = MachineSettings()
) -> list[str]:
    """The QEMU invocation: q35, TCG with SVM + nested paging, host root over 9p, four ports.

    One vCPU: with two (multi-threaded TCG), QEMU 7.2's emulation corrupts memory under load:
    8 busy nested guests, smolvmm's or QEMU's own, triple-fault or panic the inner kernel
    within minutes; with one, none did (see BENCHMARKS.md, "The nested machine").
    6 GiB of RAM: the job's writes (the tests' bundles, images, registry blobs) live in the tmpfs
    under the overlay, which takes at most half of it; 2 GiB ran out of space in the suite.
    The inner kernel's lockup detectors panic (which ends QEMU: -no-reboot) so that a stuck
    kernel leaves its reason on the console instead of a silent freeze.
    ``nohz=off``: the inner kernel keeps its periodic tick when idle. The freezes were the idle CPU
    halted (in ``native_safe_halt``, interrupts on) waiting for a local APIC timer interrupt QEMU
    never raised: 5 of 7 runs of the device tests froze so on one host, 0 of 4 with ``nohz=off``,
    which still froze once in a later suite run; the watchdog's byte on the heartbeat port wakes
    such a machine (BENCHMARKS.md, "The freeze found").
    ``settings`` add kernel arguments and QEMU options; an ``-accel`` among them replaces ``-accel tcg``
    (QEMU would take a second one as a fallback, never used).
    """
    tsc = host_tsc_khz()
    cmdline = (
        "console=ttyS0 quiet panic=-1 mitigations=off oops=panic softlockup_panic=1 hung_task_panic=1"
        " nmi_watchdog=panic nohz=off" + (f" tsc_early_khz={tsc}" if tsc else "")
    )
    if settings.append:
        cmdline += " " + settings.append
    accel = [] if "-accel" in settings.qemu_args else ["-accel", "tcg"]
    args = [
        QEMU,
        "-M",
        "q35",
        *accel,
        "-cpu",
        "EPYC-Rome,+svm,+npt,-xsaves",
        "-m",
        "6144",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        f"{cmdline} smolvmm.job={workdir}/job",
    ]
    return args + job_devices(workdir, outs) + list(settings.qemu_args)


def job_devices(workdir: Path, outs: Sequence[Path]) -> list[str]:
    """QEMU arguments for the job protocol: console log, host root and ``outs`` over 9p, the four ports,
    and a human monitor on ``<workdir>/monitor`` for the watchdog's evidence."""
    args = [
        "-chardev",
        f"file,id=console,path={workdir}/console.log",
        "-serial",
        "chardev:console",
        "-chardev",
        f"socket,id=monitor,path={workdir}/monitor,server=on,wait=off",
        "-mon",
        "chardev=monitor",
        "-virtfs",
        f"local,path=/,mount_tag={HOSTROOT_TAG},security_model=none,readonly=on,multidevs=remap",
        "-device",
        "virtio-serial-pci",
    ]
    for index, out in enumerate(outs):
        args += ["-virtfs", f"local,path={out},mount_tag=out{index},security_model=none,multidevs=remap"]
    for port in PORTS:
        args += ["-chardev", f"socket,id={port},path={workdir}/{port}"]
        args += ["-device", f"virtserialport,chardev={port},name={port}"]
    return args


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _failure(workdir: Path, qemu_exit: int | None) -> HarnessError:
    console = tail(workdir / "console.log")
    message = "the nested machine stopped without reporting the command's exit status"
    qemu_error = tail(workdir / "qemu.stderr", 1)
    if qemu_exit and qemu_error:
        message = f"QEMU exited with status {qemu_exit}: {qemu_error}"
    for line in reversed(console.splitlines()):
        if FAILED in line:
            message = f"nested machine init: {line.split(FAILED, 1)[1].strip()}"
            break
        if "Kernel panic" in line:
            message = f"nested kernel panicked: {line.strip()}"
            break
    report = (
        f"{message}\n--- QEMU's stderr ---\n{tail(workdir / 'qemu.stderr')}\n"
        f"--- nested console (last 200 lines) ---\n{tail(workdir / 'console.log', 200)}\n"
    )
    return HarnessError(message, console, report)


def run(job: Job, stdout: int = 1, stderr: int = 2) -> int:
    """Run ``job`` in a fresh nested machine, copying its output to the given fds; return its exit status.

    Raises HarnessError when the machine rather than the command failed.
    """
    if shutil.which(QEMU) is None:
        raise HarnessError(f"{QEMU} not found: apt-get install qemu-system-x86")
    kernel, initrd = nested_image()
    return run_machine(
        job, lambda workdir: qemu_command(kernel, initrd, workdir, job.outs, job.settings), stdout, stderr
    )


def run_machine(job: Job, command: Callable[[Path], list[str]], stdout: int = 1, stderr: int = 2) -> int:
    """Run ``job`` in the QEMU machine ``command(workdir)`` describes; return the job's exit status.

    The machine's init follows this module's protocol: it reads ``<workdir>/job/{job,mounts,cwd}`` from
    the host root shared over 9p, reports through the four PORTS and marks its own failures
    with FAILED on the console, which ``command`` must send to ``<workdir>/console.log``.
    Raises NestedMachineFroze when the heartbeat stops for ``job.watchdog`` seconds.
    """
    with tempfile.TemporaryDirectory(prefix="smolvmm-nested-") as tmp:
        workdir = Path(tmp)
        (workdir / "job").mkdir()
        (workdir / "job" / "job").write_text(job_script(job))
        (workdir / "job" / "mounts").write_text("".join(f"out{i} {out}\n" for i, out in enumerate(job.outs)))
        (workdir / "job" / "cwd").write_text(f"{job.cwd}\n")
        listeners = []
        for port in PORTS:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(workdir / port))
            listener.listen(1)
            listeners.append(listener)
        with open(workdir / "qemu.stderr", "wb") as qemu_stderr:
            qemu = subprocess.Popen(
                command(workdir),
                stdin=subprocess.DEVNULL,
                stdout=qemu_stderr,
                stderr=qemu_stderr,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        heartbeat = Heartbeat(job.watchdog, qemu.pid)
        try:
            sinks = {PORTS[0]: stdout, PORTS[1]: stderr}
            status, stopped = _pump(qemu, listeners, sinks, job.timeout, heartbeat, workdir / "monitor")
            for line in heartbeat.pause_lines():
                os.write(stderr, f"{line}\n".encode())
            if heartbeat.poke_summary() and not stopped:  # a stopped machine's evidence says it
                os.write(stderr, f"nested-kvm: {heartbeat.poke_summary()}\n".encode())
            if stopped:
                message = heartbeat.headline() if stopped == "froze" else f"timed out after {job.timeout:g} s"
                report = evidence(message, qemu.pid, workdir / "console.log", workdir / "monitor", heartbeat)
                running = threads(qemu.pid)
        finally:
            if qemu.poll() is None:
                qemu.kill()
            qemu.wait()
            for listener in listeners:
                listener.close()
        console = tail(workdir / "console.log")
        if stopped == "froze":
            raise NestedMachineFroze(message, console, report, running)
        if stopped:
            raise HarnessError(message, console, report)
        if status is None:
            raise _failure(workdir, qemu.returncode)
        return status


class JobStream:
    """One of the job's output ports: its bytes up to END_OF_STREAM, holding back what may be the
    start of that mark."""

    def __init__(self) -> None:
        self.held = b""
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        """The bytes of ``data`` (after those held) that are surely the job's."""
        if self.ended:
            return b""
        data = self.held + data
        end = data.find(END_OF_STREAM)
        if end >= 0:
            self.ended, self.held = True, b""
            return data[:end]
        keep = next((n for n in range(len(END_OF_STREAM) - 1, 0, -1) if data.endswith(END_OF_STREAM[:n])), 0)
        self.held = data[len(data) - keep :]
        return data[: len(data) - keep]


def _pump(
    qemu: subprocess.Popen[bytes],
    listeners: list[socket.socket],
    sinks: dict[str, int],
    timeout: float,
    heartbeat: Heartbeat,
    monitor_socket: Path,
) -> tuple[int | None, str]:
    """Copy port data to ``sinks`` and beats to ``heartbeat`` until QEMU exits; return the reported exit
    status, if any, and "".

    On timeout return (None, "timed out"), when the heartbeat stops (None, "froze"), QEMU still running.
    """
    deadline = time.monotonic() + timeout
    status = b""
    streams = {port: JobStream() for port in sinks}
    status_port: socket.socket | None = None
    heartbeat_port: socket.socket | None = None
    acknowledged = False
    with selectors.DefaultSelector() as selector:
        for port, listener in zip(PORTS, listeners):
            selector.register(listener, selectors.EVENT_READ, (port, True))
        while True:
            exited = qemu.poll() is not None
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not exited:
                return None, "timed out"
            if heartbeat.frozen() and not exited:
                return None, "froze"
            if heartbeat.needs_poke() and not exited:
                heartbeat.poke(monitor_socket, heartbeat_port)
            events = selector.select(0 if exited else min(remaining, 0.5))
            if exited and not events:
                break
            for key, _ in events:
                port, listening = key.data
                if listening:
                    connection, _ = key.fileobj.accept()  # type: ignore[union-attr]  # only sockets are registered
                    if port == PORTS[2]:
                        status_port = connection
                    elif port == HEARTBEAT:
                        heartbeat_port = connection
                    selector.unregister(key.fileobj)
                    selector.register(connection, selectors.EVENT_READ, (port, False))
                    continue
                data = key.fileobj.recv(65536)  # type: ignore[union-attr]  # only sockets are registered
                if not data:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()  # type: ignore[union-attr]  # only sockets are registered
                elif port in sinks:
                    if job_bytes := streams[port].feed(data):
                        os.write(sinks[port], job_bytes)
                elif port == HEARTBEAT:
                    heartbeat.feed(data)
                else:
                    status += data[:64]
            if not acknowledged and status_port and status.endswith(b"\n") and all(s.ended for s in streams.values()):
                with contextlib.suppress(OSError):  # a machine that has gone needs no answer
                    status_port.sendall(b"\n")  # every byte is here: the machine may power off
                acknowledged = True
    for port, stream in streams.items():  # a machine that died mid-job: what it sent is still the job's
        if stream.held:
            os.write(sinks[port], stream.held)
    text = status.decode(errors="replace").strip()
    return (int(text) if text.isdigit() else None), ""
