"""Building a bundle from a container image, and running an image bundle's commands.

``build_image``: resolve the source (``smolvmm.oci``), unpack it into a cached ext4 base disk,
cold-boot it as the root of the image-root guest, copy files in, run the build steps (their
changes are saved in the bundle's disk), run the warm-up commands, wait until ready, save.
The image's Env, WorkingDir, User, Entrypoint and Cmd go into the bundle as a label.
"""

from __future__ import annotations

import base64
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, get_args

import anyio

from smolformat.files import open_regular
from smolvmm.config import (
    IMAGE_NETWORKS,
    MIB,
    DiskConfig,
    MachineConfig,
    NetConfig,
    check_environment,
    check_memory,
    check_vcpus,
)
from smolvmm.errors import ConfigError, GuestTimeout, ImageError
from smolvmm.images.guestpaths import BUSYBOX
from smolvmm.images.imageroot import image_guest
from smolvmm.monitor.machine import Machine
from smolvmm.monitor.timings import Timings
from smolvmm.monitor.usernet import user_networking_unavailable
from smolvmm.monitor.workingset import record_working_set
from smolvmm.oci.console_exec import command_script, console_run
from smolvmm.oci.imageconfig import LABEL, ImageConfig
from smolvmm.oci.rootdisk import DEFAULT_HEADROOM, root_disk
from smolvmm.oci.source import open_source

MAX_COPIED_FILE = 64 * MIB
_FILE_CHUNK = 2400  # bytes per console line once base64-encoded (under console_exec.MAX_LINE)


ReadyKind = Literal["port", "exec", "marker"]
READY_KINDS: tuple[ReadyKind, ...] = get_args(ReadyKind)


@dataclass(frozen=True)
class ReadyCondition:
    """When the warmed machine is ready to save: a TCP port listening in the guest, a command
    that succeeds, or a line on the console."""

    kind: ReadyKind
    value: str

    def __post_init__(self) -> None:
        if self.kind == "port" and not (self.value.isdigit() and 0 < int(self.value) < 65536):
            raise ConfigError(f"the ready port must be a number from 1 to 65535, not {self.value!r}")
        if not self.value:
            raise ConfigError(f"the ready {self.kind} must not be empty")


@dataclass(frozen=True)
class ImageRecipe:
    """What ``build --image`` or a Smolfile asks for. ``env`` adds to the image's Env; ``workdir``,
    ``user``, ``entrypoint`` and ``cmd`` replace the image's when not None; ``files`` are
    (host path, guest path) pairs copied in before ``steps`` run (each a /bin/sh command line),
    each inside ``context`` when that is set (a Smolfile's directory), checked on the opened file.
    ``networks`` None is the default: ``IMAGE_NETWORKS`` (user networking) where this host can
    give it, else none, with a note; ``()`` is none."""

    image: str
    insecure: bool = False
    disk_headroom: int = DEFAULT_HEADROOM
    vcpus: int = 1
    memory: int = 512 * MIB
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    files: tuple[tuple[Path, str], ...] = ()
    context: Path | None = None
    steps: tuple[str, ...] = ()
    warm: tuple[str, ...] = ()
    ready: ReadyCondition | None = None
    timeout: float = 600
    kernel: Literal["minimal"] | None = None  # the minimal guest kernel (smolvmm kernel build), not Debian's
    networks: tuple[NetConfig, ...] | None = None

    def __post_init__(self) -> None:
        # As MachineConfig will check them, but before the image is fetched and unpacked.
        check_vcpus("ImageRecipe.vcpus", self.vcpus)
        check_memory("ImageRecipe.memory", self.memory)
        object.__setattr__(self, "env", check_environment("ImageRecipe.env", self.env))
        if self.kernel not in (None, "minimal"):
            raise ConfigError(f"ImageRecipe.kernel must be 'minimal' or None, not {self.kernel!r}")
        if self.networks is not None and not (
            isinstance(self.networks, tuple) and all(isinstance(n, NetConfig) for n in self.networks)
        ):
            raise ConfigError("ImageRecipe.networks must be None or a tuple of NetConfig")


def _write_to(stream: BinaryIO) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return write


async def _run_checked(
    machine: Machine, what: str, script: str, timeout: float, output: Callable[[bytes], None] | None
) -> None:
    status = await console_run(machine, script, output, timeout)
    if status:
        raise ImageError(f"{what} failed with exit status {status}")


def _read_source(source: Path, context: Path | None) -> tuple[bytes, int]:
    """The bytes and permission bits of copy source ``source``, from one open: a file swapped since
    it was checked for a FIFO, a larger file or a symlink out of ``context`` is refused."""
    try:
        fd = open_regular(source)
    except OSError as exc:
        raise ImageError(f"cannot copy {source}: {exc.strerror}") from None
    try:
        if context is not None and not Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(context):
            raise ImageError(f"cannot copy {source}: it now leads outside {context}, the Smolfile's directory")
        mode = os.fstat(fd).st_mode & 0o777
        data = os.read(fd, MAX_COPIED_FILE + 1)
    except OSError as exc:
        raise ImageError(f"cannot copy {source}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_COPIED_FILE:
        raise ImageError(f"{source} is larger than {MAX_COPIED_FILE >> 20} MiB: add it to the image instead")
    return data, mode


async def _copy_file(machine: Machine, source: Path, target: str, context: Path | None, timeout: float) -> None:
    data, mode = _read_source(source, context)
    if not target.startswith("/"):
        raise ImageError(f"the guest path for {source} must be absolute, not {target!r}")
    quoted = f"'{target}'" if "'" not in target else None
    if quoted is None:
        raise ImageError(f"the guest path {target!r} may not hold a single quote")
    await _run_checked(
        machine,
        f"copying {source}",
        f'{BUSYBOX} mkdir -p "$({BUSYBOX} dirname {quoted})" && : > {quoted}',
        timeout,
        None,
    )
    for offset in range(0, len(data), _FILE_CHUNK):
        chunk = base64.b64encode(data[offset : offset + _FILE_CHUNK]).decode()
        await _run_checked(
            machine, f"copying {source}", f"{BUSYBOX} echo {chunk} | {BUSYBOX} base64 -d >> {quoted}", timeout, None
        )
    await _run_checked(machine, f"copying {source}", f"{BUSYBOX} chmod {mode:o} {quoted}", timeout, None)


def _ready_script(ready: ReadyCondition, config: ImageConfig) -> str:
    if ready.kind == "port":
        # /proc/net/tcp{,6}: local address:port (hex), remote address:0, state 0A (LISTEN)
        port = f":{int(ready.value):04X} [0-9A-F]+:0000 0A"
        return f"until {BUSYBOX} grep -qsiE '{port}' /proc/net/tcp /proc/net/tcp6; do {BUSYBOX} sleep 0.1; done"
    check = command_script([ready.value], config.environment(), config.workdir, config.user, shell=True)
    return f"until {check} >/dev/null 2>&1; do {BUSYBOX} sleep 0.2; done"


def resolved_config(base: ImageConfig, recipe: ImageRecipe) -> ImageConfig:
    """The image's config with the recipe's changes."""
    changes: dict[str, object] = {}
    if recipe.env:
        kept = [item for item in base.env if item.partition("=")[0] not in recipe.env]
        changes["env"] = (*kept, *(f"{k}={v}" for k, v in recipe.env.items()))
    for name in ("workdir", "user", "entrypoint", "cmd"):
        if getattr(recipe, name) is not None:
            changes[name] = getattr(recipe, name)
    return base.with_changes(**changes)


def recipe_networks(recipe: ImageRecipe, notes: list[str]) -> tuple[NetConfig, ...]:
    """The networks ``recipe``'s machine is built with on this host (see ``ImageRecipe``); a
    default this host cannot give adds a note to ``notes``."""
    if recipe.networks is not None:
        return recipe.networks
    why = user_networking_unavailable()
    if why is None:
        return IMAGE_NETWORKS
    notes.append(f"built without a network card: {why} (--net none says so; --net user requires one)")
    return ()


async def build_image(
    recipe: ImageRecipe,
    output: Path,
    *,
    encoding: str = "raw",
    progress: Callable[[str], None] | None = None,
    note: Callable[[str], None] | None = None,
    timings: dict[str, float] | None = None,
) -> bytes:
    """Build bundle ``output`` from ``recipe``; returns its digest. On any error nothing is written.

    ``progress`` is called with each step's description; ``note`` with what the build left out or
    changed (the image's device nodes, owners it could not keep, a network this host cannot give).
    ``timings`` receives the ms since the build began at the end of each phase: ``disk`` (the
    image unpacked), ``up`` (its guest booted), ``steps`` (files and build steps), ``ready``
    (warm-up and ready condition), ``saved`` and ``working_set``.
    """
    clock = Timings()
    say = progress or (lambda text: None)
    show = _write_to(sys.stderr.buffer) if progress else None
    with tempfile.TemporaryDirectory(prefix="smolvmm-build-") as scratch:
        say(f"opening {recipe.image}")
        notes: list[str] = []
        networks = recipe_networks(recipe, notes)

        def unpacking(text: str) -> None:  # in the worker thread: a cancelled build stops at the next layer
            anyio.from_thread.check_cancelled()
            say(text)

        def prepare() -> tuple[Path, ImageConfig]:
            blobs = Path(scratch) / "blobs"
            checkpoint = anyio.from_thread.check_cancelled  # polled as a pull runs: a cancel stops it mid-layer
            with open_source(
                recipe.image, blobs, insecure=recipe.insecure, progress=say, checkpoint=checkpoint
            ) as image:
                disk = root_disk(image, Path(scratch), recipe.disk_headroom, progress=unpacking, notes=notes)
                return disk, image.config

        disk, base = await anyio.to_thread.run_sync(prepare)
        clock.mark("disk")
        if note is not None:
            for text in notes[:20]:
                note(text)
        config = resolved_config(base, recipe)
        guest = await anyio.to_thread.run_sync(lambda: image_guest(minimal=recipe.kernel == "minimal"))
        machine_config = MachineConfig(
            kernel=guest.kernel,
            initrd=guest.initrd,
            cmdline=guest.cmdline,
            vcpus=recipe.vcpus,
            memory=recipe.memory,
            disks=(DiskConfig(disk),),
            networks=networks,
        )
        say("booting")
        async with Machine.boot(machine_config) as machine:
            try:
                await machine.console.wait_for(guest.ready_marker, recipe.timeout)
            except TimeoutError:
                raise GuestTimeout(f"the image guest did not come up within {recipe.timeout:g} s") from None
            clock.mark("up")
            env, cwd = config.environment(), config.workdir
            if cwd:  # as container runtimes do, the working directory exists
                await _run_checked(
                    machine,
                    f"creating WorkingDir {cwd}",
                    f"{BUSYBOX} mkdir -p {shlex.quote(cwd)}",
                    recipe.timeout,
                    None,
                )
            for source, target in recipe.files:
                say(f"copying {source} to {target}")
                await _copy_file(machine, source, target, recipe.context, recipe.timeout)
            for number, step in enumerate(recipe.steps, 1):
                say(f"step {number}/{len(recipe.steps)}: {step}")
                await _run_checked(
                    machine,
                    f"build step {number} ({step})",
                    command_script([step], env, cwd, config.user, shell=True),
                    recipe.timeout,
                    show,
                )
            clock.mark("steps")
            seen = bytearray()

            def keep(data: bytes) -> None:
                seen.extend(data[-4096:])
                if show:
                    show(data)

            for command in recipe.warm:
                say(f"warming: {command}")
                await _run_checked(
                    machine,
                    f"warm-up command ({command})",
                    command_script([command], env, cwd, config.user, shell=True),
                    recipe.timeout,
                    keep,
                )
            if recipe.ready is not None:
                say(f"waiting until ready ({recipe.ready.kind} {recipe.ready.value})")
                try:
                    if recipe.ready.kind == "marker":
                        if recipe.ready.value.encode() not in seen:
                            await machine.console.wait_for(recipe.ready.value, recipe.timeout)
                    else:
                        await console_run(machine, _ready_script(recipe.ready, config), None, recipe.timeout)
                except TimeoutError:
                    raise GuestTimeout(
                        f"the machine was not ready ({recipe.ready.kind} {recipe.ready.value})"
                        f" within {recipe.timeout:g} s"
                    ) from None
            clock.mark("ready")
            await _run_checked(machine, "sync", f"{BUSYBOX} sync", recipe.timeout, None)
            say(f"saving {output}")
            digest = await machine.snapshot(output, encoding=encoding, labels={LABEL: config.to_json()})
        clock.mark("saved")
        if encoding == "raw":
            digest = await record_working_set(output, say, networks=networks) or digest
            clock.mark("working_set")
        if timings is not None:
            timings.update(clock.phases)
        return digest
