"""CLI commands that run machines: ``boot``, ``build`` and ``run``; only the public API is used."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

import anyio

import smolvmm
from smolvmm import MINIMAL_KERNEL, ConfigError, DiskConfig, Machine, MachineConfig, NetConfig
from smolvmm.cli import control as cli_control
from smolvmm.cli import detach as cli_detach
from smolvmm.cli import output as cli_output
from smolvmm.cli import progress as cli_progress
from smolvmm.cli import ps as cli_ps
from smolvmm.cli import status as cli_status
from smolvmm.cli.args import as_flags, new_file, output_file, positive_float, positive_int, size
from smolvmm.cli.signals import until_signal

if TYPE_CHECKING:
    from smolvmm import ImageConfig, Jail

# The CLI drives its machine on asyncio: anyio already pays for much of it, while importing trio
# took ~40 % of a `run`'s imports. The library runs on both backends.
BACKEND = "asyncio"
READY_MARKER_LABEL = "smolvmm.ready-marker"  # the line `build` waited for, kept for `boot --bundle`
_NET_HELP = (
    "user networking through a passt of its own (no root), forwarding host ports to"
    " guest ports (HOST 0 picks a free port), or an existing TAP device; [,mac=MAC] sets its address"
)


def _add_machine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kernel",
        type=_kernel,
        metavar="BZIMAGE|minimal",
        help="bzImage to boot, or 'minimal': the demo guest on the minimal kernel (smolvmm kernel"
        " build) (default: the built-in demo guest)",
    )
    parser.add_argument("--initrd", type=Path, help="initramfs to pass to the kernel")
    parser.add_argument("--cmdline", help="kernel command line (default: the demo guest's)")
    parser.add_argument("--cpus", type=positive_int, help="number of vCPUs (default 1)")
    parser.add_argument(
        "--mem", type=size, help="guest RAM, e.g. 256M or 1G (default 256M; 512M for build --image or -f)"
    )
    parser.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="PATH[,ro][,overlay=PATH]",
        help="virtio-blk disk; writes go to a copy-on-write overlay (repeatable)",
    )
    parser.add_argument(
        "--net",
        action="append",
        default=[],
        metavar="user[,forward=HOST:GUEST[/udp]]...|tap=NAME[,vhost=on|off]|none",
        help="a network card: " + _NET_HELP + " (repeatable; default: none for the demo guest)",
    )
    parser.add_argument(
        "--console-socket", type=Path, metavar="PATH", help="a virtio-console port reachable as a Unix socket at PATH"
    )
    parser.add_argument(
        "--console",
        choices=["serial", "virtio"],
        default="serial",
        help="the guest's console: the 16550 UART (ttyS0, default) or virtio-console (hvc0)",
    )


def _kernel(text: str) -> Path | str:
    """``--kernel``: a bzImage's path, or the word ``minimal``."""
    return text if text == MINIMAL_KERNEL else Path(text)


def _guest_marker(kernel: Path | str | None) -> str | None:
    """The ready line of the demo guest on the default or minimal kernel; None for the user's own kernel."""
    if isinstance(kernel, Path):
        return None
    from smolvmm.images.guest import default_guest, minimal_guest

    return (default_guest() if kernel is None else minimal_guest()).ready_marker


def _config(args: argparse.Namespace) -> MachineConfig:
    networks = NetConfig.parse_flags(args.net)
    if getattr(args, "bundle", None) is not None:
        given = [
            flag
            for flag, value in (
                ("--kernel", args.kernel),
                ("--initrd", args.initrd),
                ("--cmdline", args.cmdline),
                ("--cpus", args.cpus),
                ("--mem", args.mem),
                ("--disk", args.disk),
            )
            if value is not None and value != []
        ]
        if given:
            raise ConfigError(
                f"--bundle brings its own kernel, command line, vCPUs, RAM and disks: drop {', '.join(given)}"
            )
        return MachineConfig.from_bundle(args.bundle, networks=networks, console_socket=args.console_socket)
    try:
        return MachineConfig(
            kernel=args.kernel,
            initrd=args.initrd,
            cmdline=args.cmdline,
            vcpus=1 if args.cpus is None else args.cpus,
            memory=256 << 20 if args.mem is None else args.mem,
            disks=tuple(DiskConfig.parse(spec) for spec in args.disk),
            networks=networks,
            console_socket=args.console_socket,
            console=args.console,
        )
    except ConfigError as exc:  # say which flag, as the user wrote it
        raise as_flags(exc) from None


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    if name in ("boot", "build"):
        _add_machine_flags(parser)
        parser.add_argument(
            "--ready-marker",
            help="console text that says the guest is ready; boot forwards stdin"
            " only after it (default: the demo guest's, or the one a --bundle was built with)",
        )
    if name == "boot":
        parser.add_argument(
            "--bundle",
            type=Path,
            metavar="BUNDLE",
            help="cold-boot BUNDLE's own kernel, initrd and disks (a bundle built with --bootable)",
        )
    if name == "build":
        from smolvmm.cli.image import add_build_arguments

        add_build_arguments(parser)
        parser.add_argument("-o", "--output", type=Path, required=True, help="the .smolmachine file to write")
        parser.add_argument(
            "--bootable",
            action="store_true",
            help="also store the kernel and initrd, so the bundle can be cold-booted (boot --bundle)",
        )
        parser.add_argument(
            "--zstd", action="store_true", help="compress RAM and disks (for shipping; `pack --raw` to map)"
        )
        parser.add_argument(
            "--timeout", type=positive_float, default=600, help="seconds to wait for the ready marker (default 600)"
        )
        parser.add_argument(
            "--json", action="store_true", help="print the bundle's path, digest, sizes and timings as JSON on stdout"
        )
    if name == "run":
        parser.add_argument(
            "bundle", type=Path, help="the .smolmachine file to resume, or REGISTRY/REPO:TAG to pull and resume"
        )
        parser.add_argument(
            "--insecure", action="store_true", help="with a REF: allow plain HTTP to a registry that is not on loopback"
        )
        parser.add_argument(
            "--net",
            action="append",
            default=[],
            metavar="user[,forward=HOST:GUEST[/udp]]...|tap=NAME[,vhost=on|off]",
            help="the wire for each saved network card: "
            + _NET_HELP
            + " (default: a passt of its own for each card saved on user networking)",
        )
        parser.add_argument(
            "--console-socket", type=Path, metavar="PATH", help="socket path for a saved console-socket device"
        )
        parser.add_argument(
            "--save",
            type=Path,
            metavar="OUT",
            help="on SIGUSR1, save the running instance to OUT (a new bundle) and carry on",
        )
        parser.add_argument(
            "--prepare-only",
            action="store_true",
            help="do every restore step up to the first guest entry, then tear down",
        )
        parser.add_argument(
            "--require-signature",
            action="store_true",
            help="refuse a bundle whose content no key of --trusted-keys signed (`smolvmm sign`)",
        )
        parser.add_argument(
            "--trusted-keys",
            metavar="DIR",
            help="directory of trusted Ed25519 public keys (*.pub, PEM); implies --require-signature",
        )
        parser.add_argument(
            "--detach",
            action="store_true",
            help="run in the background and print the machine's id (smolvmm attach ID, stop ID)",
        )
        parser.add_argument("--detached-as", metavar="ID", help=argparse.SUPPRESS)  # what --detach starts
        import smolvmm.cli.exec as cli_exec

        cli_exec.add_arguments(parser)
    if name in ("boot", "run"):
        parser.add_argument(
            "--timings",
            action="store_true",
            help="at exit, print how long each phase took (ms) as one JSON line on stderr",
        )
        parser.add_argument(
            "--json",
            action="store_true",
            help="print --timings/--prepare-only as one JSON line on stdout (else on stderr)",
        )
        jail = parser.add_mutually_exclusive_group()
        jail.add_argument(
            "--jail",
            action="store_true",
            help="once the machine is assembled, confine the monitor: new mount/IPC/UTS (and, without"
            " --net, network) namespaces, an empty read-only root, an unprivileged user, no new"
            " privileges, resource limits, a seccomp filter (needs root; the default when run as root;"
            " see docs/THREAT_MODEL.md)",
        )
        jail.add_argument("--no-jail", action="store_true", help="do not confine the monitor, even as root")
        parser.add_argument(
            "--jail-user", metavar="USER|UID[:GID]", help="who the jailed monitor runs as (default: nobody)"
        )


def _on_pvm_host() -> bool:
    """Whether /dev/kvm is PVM (asked before a jail hides /dev/kvm and /sys)."""
    from smolvmm.host.kvmprobe import probe

    return probe().kind == "pvm"


def _note_pvm_host(on_pvm: bool) -> None:
    """Say once, as a guest starts, that standard guests cannot run on a PVM host, and where to read why."""
    if on_pvm:
        cli_output.message(
            "note: this host's /dev/kvm is PVM, on which standard guest kernels die in early boot;"
            " see README, 'PVM hosts and the nested machine'"
        )


async def _pump_output(machine: Machine, ready: anyio.Event, marker: bytes | None) -> None:
    out = sys.stdout.buffer
    tail = b""
    async for chunk in machine.console:
        out.write(chunk)
        out.flush()
        if marker and not ready.is_set():
            tail = (tail + chunk)[-len(marker) - 4096 :]
            if marker in tail:
                ready.set()


async def _pump_input(machine: Machine, ready: anyio.Event, interactive: bool) -> None:
    await ready.wait()
    while True:
        data = await cli_output.read_stdin()
        if not data:
            return  # EOF on stdin: the guest keeps running
        if interactive and cli_output.ESCAPE_KEY in data:
            await machine.stop()
            return
        await machine.console.send(data)


async def console_session(machine: Machine, ready_marker: str | None) -> int:
    """Connect the machine's console to stdin/stdout until it ends; returns the exit status."""
    ready = anyio.Event()
    with cli_output.raw_terminal() as interactive:
        if interactive or not ready_marker:
            ready.set()
        if interactive:
            print("smolvmm: console attached; press Ctrl-] to stop the machine\r", file=sys.stderr)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_pump_input, machine, ready, interactive)
            await _pump_output(machine, ready, ready_marker.encode() if ready_marker else None)
            tg.cancel_scope.cancel()
        end = await machine.wait()
    return cli_status.for_exit(end)


class _Timings(Protocol):
    phases: dict[str, float]
    notes: dict[str, int | str]

    def json(self) -> str: ...


def _jail(
    args: argparse.Namespace, machine_id: str | None = None, detached: cli_detach.Sockets | None = None
) -> Jail | None:
    """The jail ``boot``/``run`` enter: asked for with --jail, or by default as root. It publishes
    --save and --copy-out files, and removes the ``smolvmm ps`` entry of ``machine_id`` and a
    ``detached`` machine's sockets and log at the end."""
    if args.no_jail or not (args.jail or os.geteuid() == 0):
        if args.jail_user:
            raise ConfigError("--jail-user needs the jail (--jail, or the default as root)")
        return None
    from smolvmm import Jail
    from smolvmm.cli.exec import copy_out_files

    outputs = [str(args.save)] if getattr(args, "save", None) else []
    outputs += [host for _, host in copy_out_files(args)] if getattr(args, "copy_out", None) else []
    entry = cli_ps.entry_file(machine_id) if machine_id else None
    left = [entry] if entry else []
    left += [*detached.paths, detached.log] if detached else []
    discard = tuple(str(path) for path in left)
    return Jail.parse(args.jail_user, outputs=tuple(outputs), discard=discard)


def report_timings(timings: _Timings, as_json: bool) -> None:
    """``--timings``: the phases (ms since the start) and notes as one JSON line, on stdout with
    ``--json`` (the machine-readable result), else on stderr (beside what the guest printed)."""
    if as_json:
        cli_output.result(timings.json())
    else:
        print(timings.json(), file=sys.stderr, flush=True)


def listed(command: str, what: str, detached_as: str | None = None) -> AbstractContextManager[str]:
    """List the machine about to start with ``smolvmm ps`` until the block ends; yields its id.
    Entered before the machine is assembled, while no jail hides the runtime directory."""
    console = cli_detach.console_path(detached_as) if detached_as else None
    return cli_ps.registered(command, what, detached_as, console)


async def serve(
    machine: Machine,
    machine_id: str,
    marker: str | None,
    save: Path | None = None,
    detached: cli_detach.Sockets | None = None,
) -> int:
    """The console session (on stdin/stdout, or ``detached`` on its console socket, with exec on
    its control socket) of the machine ``listed`` as ``machine_id``, ended by ``smolvmm stop``
    (SIGTERM), and with ``save``, saved to it on SIGUSR1; returns the exit status."""
    if cli_output.is_terminal(sys.stderr):
        cli_output.message(f"machine {machine_id} (`smolvmm stop {machine_id}` ends it)")
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, machine)
        if save is not None:
            tg.start_soon(_save_on_signal, machine, save)
        if detached is None:
            status = await console_session(machine, marker)
        else:
            tg.start_soon(cli_control.serve, machine, detached.control)
            await cli_detach.serve_console(machine, detached.console)
            status = cli_status.for_exit(await machine.wait())
        tg.cancel_scope.cancel()
    return status


async def _stop_on_signal(machine: Machine, received: list[int] | None = None) -> None:
    """Stop ``machine`` on SIGTERM or SIGHUP (appended to ``received``)."""
    await until_signal(received)
    await machine.stop()


async def _boot(config: MachineConfig, marker: str | None, args: argparse.Namespace) -> int:
    what = f"bundle {args.bundle}" if args.bundle else f"kernel {args.kernel}" if args.kernel else "the demo guest"
    with listed("boot", what) as machine_id:
        jail, on_pvm = _jail(args, machine_id), _on_pvm_host()
        async with Machine.boot(config, jail=jail) as machine:
            _note_pvm_host(on_pvm)
            cli_output.report_network(machine)
            cli_ps.started(machine_id, machine.forwards)
            status = await serve(machine, machine_id, marker)
    if args.timings:
        report_timings(machine.timings, args.json)
    return status


def _boot_marker(args: argparse.Namespace) -> str | None:
    """What ``boot`` waits for before forwarding stdin: the flag's, a bundle's, or the demo guest's."""
    if args.ready_marker is not None:
        marker: str = args.ready_marker
        return marker
    if args.bundle is not None:
        import smolformat

        with smolformat.open_bundle(args.bundle) as bundle:
            labels = bundle.labels
        return labels.get(READY_MARKER_LABEL)
    return _guest_marker(args.kernel)


async def _build(config: MachineConfig, args: argparse.Namespace) -> int:
    output, marker = args.output, args.ready_marker
    if marker is None:
        marker = _guest_marker(config.kernel)
        if marker is None:
            raise ConfigError("--ready-marker is needed with --kernel: say what the guest prints when it is ready")
    async with Machine.boot(config) as machine:
        _note_pvm_host(_on_pvm_host())
        cli_output.report_network(machine)
        ready_ms = await wait_ready(machine, marker, args.timeout)
        encoding = "zstd" if args.zstd else "raw"
        labels = {READY_MARKER_LABEL: marker}
        digest = await machine.snapshot(output, encoding=encoding, labels=labels, bootable=args.bootable)
        if args.ready_marker is None:  # the demo guest, which runs the agent: a bundle must answer exec
            _check_agent_saved(output, machine)
    if encoding == "raw":
        digest = await smolvmm.record_working_set(output, cli_output.message, networks=config.networks) or digest
    if not args.json:
        cli_output.result(f"{output}: {digest.hex()[:16]}")
        return cli_status.OK
    from smolvmm.cli.bundle import sizes

    cli_output.result_json(
        {
            "path": str(output),
            "digest": digest.hex(),
            "encoding": encoding,
            "bootable": args.bootable,
            "sizes": sizes(output),
            "timings": {
                "boot": machine.timings.phases,
                "ready": ready_ms,
                "save": machine.snapshot_timings.phases,
            },
        }
    )
    return cli_status.OK


def _check_agent_saved(output: Path, machine: Machine) -> None:
    """Refuse (and remove) a bundle of a guest whose agent did not answer the save's sync: its
    restores would not run commands. Quotes what the guest's kernel last said of its virtio devices."""
    if "agent" not in machine.snapshot_timings.notes:
        return
    output.unlink(missing_ok=True)
    said = re.findall(rb"virtio\w* virtio\d+: [^\r\n]*", machine.console.recent())
    kernel = f"; the guest's kernel said: {said[-1].decode(errors='replace')}" if said else ""
    raise smolvmm.AgentError(f"the guest agent did not answer before the save: {output} not kept{kernel}")


async def wait_ready(machine: Machine, marker: str, timeout: float) -> float:
    """Wait until the guest prints ``marker``, showing on a terminal the time so far and the
    console's last line; returns the ms since the boot began."""
    deadline = time.monotonic() + timeout
    line_or_marker = re.compile(re.escape(marker.encode()) + rb"|\n")
    with cli_progress.bar(f"booting, waiting for {marker!r}") as shown:
        while True:
            try:
                seen = await machine.console.wait_for(line_or_marker, max(deadline - time.monotonic(), 0))
            except TimeoutError:
                raise smolvmm.GuestTimeout(f"the guest did not print {marker!r} within {timeout:g} s") from None
            if seen.endswith(marker.encode()):
                break
            if shown is not None and seen.strip():
                shown.status(seen.decode(errors="replace"))
    return round((time.perf_counter() - machine.timings.start) * 1000, 3)


async def _run(args: argparse.Namespace) -> int:
    if "none" in args.net:
        raise ConfigError(
            "--net none is for boot and build: a restored machine keeps the network cards it was saved with"
        )
    networks = NetConfig.parse_flags(args.net)
    if args.require_signature and args.trusted_keys is None:
        raise ConfigError("--require-signature needs --trusted-keys DIR: the public keys a signature may be by")
    restore_args = {"networks": networks, "console_socket": args.console_socket, "trusted_keys": args.trusted_keys}
    if args.prepare_only:
        timings = await Machine.prepare_restore(args.bundle, **restore_args)
        report_timings(timings, args.json)
        return cli_status.OK
    import smolvmm.cli.exec as cli_exec

    image = cli_exec.image_config(args.bundle)
    if image is not None and not args.command and not (image.entrypoint or image.cmd):
        raise ConfigError("the image sets no Entrypoint or Cmd: give a command after --")  # before a resume
    command = bool(args.command) or image is not None
    if not command and (args.copy_in or args.copy_out):
        raise ConfigError("--copy-in and --copy-out go with a command: run BUNDLE [flags] -- CMD [ARGS...]")
    if command and args.save is not None:
        raise ConfigError("--save is for a console session (SIGUSR1 saves it): a command's clone ends with the command")
    env, secrets = cli_exec.identity(args)
    copy_out = cli_exec.copy_out_files(args)
    with listed("run", str(args.bundle), args.detached_as) as machine_id, ExitStack() as opened:
        copy_in = cli_exec.copy_in_files(args, opened)
        detached = await cli_detach.Sockets.open(machine_id) if args.detached_as else None
        status = cli_status.ERROR
        try:
            jail, on_pvm = _jail(args, machine_id, detached), _on_pvm_host()
            async with Machine.restore(args.bundle, **restore_args, env=env, secrets=secrets, jail=jail) as machine:
                _note_pvm_host(on_pvm)
                cli_output.report_network(machine)
                cli_ps.started(machine_id, machine.forwards)  # what `run --detach` waits for
                if command:
                    status = await _command_session(machine, args, copy_in, copy_out, image)
                else:
                    status = await serve(machine, machine_id, None, args.save, detached)
        finally:
            if detached is not None:  # its sockets go; its log stays when it explains a failure
                detached.ended(clean=status == cli_status.OK)
    if args.timings:
        report_timings(machine.timings, args.json)
    return status


async def _command_session(
    machine: Machine,
    args: argparse.Namespace,
    copy_in: list[tuple[BinaryIO, str]],
    copy_out: list[tuple[str, str]],
    image: ImageConfig | None,
) -> int:
    """``run BUNDLE -- CMD``: the command's exit status, or 128+N when ``smolvmm stop`` (SIGTERM)
    or a hangup (SIGHUP) ended its machine first."""
    import smolvmm.cli.exec as cli_exec

    stopped_by: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, machine, stopped_by)
        try:
            status = await cli_exec.run_command(machine, args, copy_in, copy_out, image)
        except Exception:  # the machine stopped under the command: what failed is why
            if not stopped_by:
                raise
        tg.cancel_scope.cancel()
    return 128 + stopped_by[0] if stopped_by else status


async def _save_on_signal(machine: Machine, output: Path) -> None:
    # On a terminal the console holds in raw mode, a line needs its carriage return, and a new line
    # of its own after the guest's unfinished one; stderr to a file gets plain lines.
    raw = os.isatty(0)
    with anyio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            try:
                digest = await machine.snapshot(output)
            except smolvmm.SmolvmmError as exc:  # e.g. a full disk: this save failed, the machine is fine
                cli_output.error(f"{exc}; the machine runs on" + "\r" * raw)
                continue
            print("\r\n" * raw + f"smolvmm: saved {output} ({digest.hex()[:16]})" + "\r" * raw, file=sys.stderr)


def _resolved(args: argparse.Namespace) -> Path:
    """``run REF``'s bundle, pulled in an event loop of its own, whose worker threads have ended
    before the machine's loop starts: a jail takes a process of one thread."""
    from smolvmm.cli.registry import resolve_bundle

    bundle: Path = anyio.run(resolve_bundle, args.bundle, args.insecure, backend=BACKEND)
    for thread in threading.enumerate():
        if thread is not threading.main_thread():
            thread.join(timeout=10)
    return bundle


def run(name: str, args: argparse.Namespace) -> int:
    if name == "boot":
        return anyio.run(_boot, _config(args), _boot_marker(args), args, backend=BACKEND)
    if name == "build":
        from smolvmm.cli.image import build_from_image, image_build_requested

        new_file(args.output)  # before an image is fetched or a guest booted
        if image_build_requested(args):
            return anyio.run(build_from_image, args, backend=BACKEND)
        return anyio.run(_build, _config(args), args, backend=BACKEND)
    if args.save is not None:
        args.save = Path(output_file(args.save))  # as the jail stages it (its root is empty)
    args.bundle = _resolved(args)
    if args.detach:
        if args.prepare_only or args.timings or args.command or args.copy_in or args.copy_out:
            raise ConfigError(
                "--detach runs the machine in the background: it cannot be combined with"
                " --prepare-only, --timings, --copy-in/--copy-out or a command (-- CMD)"
            )
        return cli_detach.start(args)
    return anyio.run(_run, args, backend=BACKEND)
