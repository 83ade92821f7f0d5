"""Machine: a running VM inside the caller's anyio event loop (trio or asyncio).

Structure: one task group per machine holding a watcher task, one task per vCPU and one per
device. A vCPU's task drives a thread of its own, which runs the guest (the run call blocks),
and joins it when it ends. The first exit (guest poweroff/reboot, a crash, or ``stop()``)
stops every vCPU, cancels the device tasks and closes every fd, so nothing outlives the
``async with`` block; an error inside the block reaches the caller as itself, not wrapped in
an exception group.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from smolvmm.agent.channel import AGENT_LABEL, LABEL_V2, TOO_OLD, AgentPort, Identity
from smolvmm.agent.files import GuestFiles
from smolvmm.agent.process import DEFAULT_MAX_OUTPUT, ExecResult, Process, open_process, run
from smolvmm.config import MachineConfig, NetConfig, PortForward, check_environment
from smolvmm.devices.virtio.net import VirtioNet
from smolvmm.errors import AgentError, AgentTooOld, ConfigError, GuestError, UsageError, unwrapped_errors
from smolvmm.host.eventfd import EventFd
from smolvmm.host.memory import PAGE_SIZE
from smolvmm.monitor.console import Console
from smolvmm.monitor.dhcp import RENEW_TIMEOUT, STILL_ASKING, dhcp_interfaces, renewal
from smolvmm.monitor.exit import ExitReason, MachineExit
from smolvmm.monitor.timings import Timings
from smolvmm.monitor.usernet import PasstBackend
from smolvmm.monitor.vcpu import VcpuThread, install_kick_handler
from smolvmm.monitor.vm import VirtualMachine

AGENT_START_WAIT = 10.0  # seconds a snapshot waits for a guest's agent to announce itself (once per machine)

if TYPE_CHECKING:
    from smolvmm.host.jail import Jail
    from smolvmm.monitor.plan import MachinePlan

DeviceTask = tuple[str, Callable[[], Coroutine[Any, Any, None]]]


class Machine:
    """A running machine. Create it with ``Machine.boot(config)`` or ``Machine.restore(path)``."""

    def __init__(
        self,
        vm: VirtualMachine,
        plan: MachinePlan,
        timings: Timings,
        *,
        parent_digest: bytes = b"",
        agent: AgentPort | None = None,
        boot_files: Callable[[], tuple[bytes, bytes | None]] | None = None,
    ) -> None:
        """The machine ``plan`` describes, assembled into ``vm`` (see ``boot`` and ``restore``)."""
        self._vm = vm
        self._agent = agent
        self.config = plan.config
        self.console: Console = vm.console
        self.timings = timings
        self.snapshot_timings = Timings()
        self._passts = [
            transport.device.backend
            for transport in vm.transports
            if isinstance(transport.device, VirtioNet) and isinstance(transport.device.backend, PasstBackend)
        ]
        self.forwards: tuple[PortForward, ...] = tuple(forward for passt in self._passts for forward in passt.forwards)
        """The host ports forwarded to the guest (user networking), with the ports picked for 0."""
        if self.forwards:
            timings.note("forwards", " ".join(map(str, self.forwards)))
        self._cmdline = plan.cmdline
        self._parent_digest = parent_digest
        self._device_tasks: list[DeviceTask] = [
            (f"virtio-{t.device.__class__.__name__}{i}", t.run) for i, t in enumerate(vm.transports)
        ]
        self._exit: MachineExit | None = None
        self._exit_lock = threading.Lock()
        self._exited = EventFd()
        self._parked = EventFd()
        self._vcpu_done = [EventFd() for _ in vm.vcpus]
        self._vcpus_joined: list[anyio.Event] = []  # one per vCPU task started, set when its thread is joined
        self._finished = anyio.Event()
        self._devices_scope = anyio.CancelScope()
        self._devices_stopped = anyio.Event()
        self._devices_restart = anyio.Event()
        self._paused = False
        self._sync_agent_on_resume = False
        self._agent_absent = False  # a snapshot found no agent answering: later ones do not wait
        self._new_macs: dict[str, bytes] = {}
        self._renew_dhcp: tuple[str, ...] = ()  # a restored clone's user-mode interfaces, to renew
        self._snapshot_lock = anyio.Lock()
        # Reads the kernel and initrd this machine can be cold-booted from, where it knows them.
        self._boot_files = boot_files
        self._shutdown_lock = anyio.Lock()
        self._jail: tuple[Jail, bool] | None = None  # (user, keeps host network), entered before vCPUs run
        self._working_set: tuple[tuple[int, int], ...] = ()  # a restored bundle's, populated as vCPUs start
        self._prefetch: threading.Thread | None = None
        self.files = GuestFiles(self._agent_port)
        """Files inside the guest: ``write``, ``read``, ``upload``, ``download``."""

    def _record_exit(self, exit: MachineExit) -> None:
        """From any thread: the first exit wins and wakes the watcher."""
        with self._exit_lock:
            if self._exit is not None:
                return
            self._exit = exit
        self._exited.signal()

    @classmethod
    @asynccontextmanager
    async def boot(cls, config: MachineConfig, *, jail: Jail | None = None) -> AsyncIterator[Machine]:
        """Cold-boot ``config`` (the default guest where kernel is None); yields the running machine.

        With ``jail``, the monitor process enters the jail (``smolvmm.host.jail``) as that user once
        the machine is assembled, before the guest runs: it cannot be undone for the process.
        """
        from smolvmm.monitor.coldboot import prepare_boot

        identity = _identity(config.env, config.secrets, None)  # before the VM, which a failure would leak
        timings = Timings()
        holder: list[Machine] = []
        booting = prepare_boot(config, lambda exit: holder[0]._record_exit(exit) if holder else None, timings)
        try:
            machine = cls(
                booting.assembled.vm,
                booting.plan,
                timings,
                agent=booting.assembled.agent,
                boot_files=booting.read_boot_files,
            )
        except BaseException:
            booting.assembled.vm.close()
            raise
        holder.append(machine)
        machine._jail = (jail, bool(config.networks)) if jail else None
        if machine._agent is not None:
            machine._agent.identity = identity
        async with machine._running():
            await machine._networks_started()
            yield machine

    @classmethod
    @asynccontextmanager
    async def restore(
        cls,
        path: str | os.PathLike[str],
        *,
        networks: tuple[NetConfig, ...] = (),
        console_socket: Path | None = None,
        overlays: tuple[Path | None, ...] = (),
        paused: bool = False,
        trusted_keys: str | os.PathLike[str] | None = None,
        jail: Jail | None = None,
        env: dict[str, str] | None = None,
        secrets: dict[str, str] | None = None,
        hostname: str | None = None,
    ) -> AsyncIterator[Machine]:
        """Resume the machine saved in bundle ``path``; yields it running.

        Every ``exec`` then sees ``env`` and ``secrets`` as environment variables (a call's own
        ``env`` wins). Secrets reach the guest only through its agent after the resume, are held
        only in the agent's memory, and are overwritten there before any snapshot, so bundles
        saved from this machine do not contain them. The guest is given ``hostname`` (default
        ``smolvmm-`` and 8 random hex digits) and a fresh /etc/machine-id.

        ``networks`` gives the wire (TAP device or user networking with its forwards, and
        optionally a new MAC) for each saved network device (by default, a passt of its own for
        each card saved on user networking), ``console_socket`` the socket path of a saved
        console-socket device, and
        ``overlays`` an overlay file per disk (a fresh temporary one where None or absent).
        With ``paused`` the vCPUs wait for ``resume()`` before they run (and the guest agent
        is synced on that resume). With ``trusted_keys`` (a directory of ``*.pub`` Ed25519
        keys), a bundle that no trusted key signed, or whose content changed since, is refused
        with a BundleError before anything is created. ``jail`` is as for ``boot``.
        """
        from smolvmm.monitor.plan import RestoreOverrides
        from smolvmm.monitor.restore import restore_vm_from

        identity = _identity(env, secrets, hostname)
        timings = Timings()
        holder: list[Machine] = []
        overrides = RestoreOverrides(networks, console_socket, overlays)
        restored = restore_vm_from(
            path,
            overrides,
            lambda exit: holder[0]._record_exit(exit) if holder else None,
            timings,
            trusted_keys=_trusted(trusted_keys),
        )
        machine = cls(
            restored.vm,
            restored.plan,
            timings,
            parent_digest=restored.digest,
            agent=restored.agent,
            boot_files=lambda: _bundle_boot_files(path),
        )
        holder.append(machine)
        machine._jail = (jail, bool(networks)) if jail else None
        label = restored.labels.get(AGENT_LABEL)
        machine._sync_agent_on_resume = label in ("yes", LABEL_V2)
        if restored.agent is not None:
            restored.agent.protocol = 1 if label == "yes" else 2
            restored.agent.identity = identity
        if label == "yes" and (env or secrets or hostname):
            machine._close()
            raise AgentTooOld(f"env, secrets and hostname need protocol 2: {TOO_OLD}")
        machine._new_macs = restored.new_macs
        machine._working_set = restored.working_set
        if restored.plan.unplugged is None:
            machine._renew_dhcp = dhcp_interfaces(restored.plan.cmdline)
        else:
            machine.timings.note("unplugged", f"the network cards have no wire: {restored.plan.unplugged}")
        async with machine._running(paused):
            async with anyio.create_task_group() as tg:  # passt starts while the agent syncs
                tg.start_soon(machine._networks_started)
                if not paused:
                    tg.start_soon(machine._sync_agent)
            yield machine

    @classmethod
    async def prepare_restore(
        cls,
        path: str | os.PathLike[str],
        *,
        networks: tuple[NetConfig, ...] = (),
        console_socket: Path | None = None,
        trusted_keys: str | os.PathLike[str] | None = None,
    ) -> Timings:
        """Every step of a restore up to, not including, the first guest entry, then tear down.

        For measuring the host-side cost of a restore: the guest never runs, so a bundle made
        under another hypervisor flavour (e.g. hardware KVM, measured on a PVM host) is accepted.
        """
        from smolvmm.monitor.plan import RestoreOverrides
        from smolvmm.monitor.restore import restore_vm_from

        timings = Timings()
        overrides = RestoreOverrides(networks, console_socket)
        trusted = _trusted(trusted_keys)
        restore_vm_from(
            path, overrides, lambda exit: None, timings, same_flavour=False, trusted_keys=trusted
        ).vm.close()
        timings.mark("teardown")
        return timings

    async def _networks_started(self) -> None:
        """Wait until every passt of this machine serves its forwards."""
        for passt in self._passts:
            await passt.wait_started()
        if self._passts:
            self.timings.mark("passt_started")

    async def _sync_agent(self) -> None:
        """Before anyone talks to a resumed guest: set its clock and reseed its RNG (clone safety)."""
        if self._agent is None or not self._sync_agent_on_resume:
            return
        self._sync_agent_on_resume = False
        if await self._agent.sync(self._new_macs):
            self.timings.mark("agent_sync")
            await self._renew_networks()
        else:
            self.timings.note("agent", "no answer: guest clock and RNG not refreshed")

    async def _renew_networks(self) -> None:
        """A restored clone's user networks are a new passt's, maybe on another host: the guest
        takes each link down and up (dropping routes and neighbours of the old one) and takes its
        lease again, before anyone uses the machine."""
        interfaces, self._renew_dhcp = self._renew_dhcp, ()
        if not interfaces or self._agent is None or self._agent.protocol < 2:
            return
        # A lease not taken in 5 s (passt slow to answer on a loaded host) is asked for again in
        # the background: the guest must not stay without an address and route for good.
        try:
            result = await self.exec(renewal(self._cmdline, interfaces), timeout=RENEW_TIMEOUT)
        except GuestError as exc:
            self.timings.note("network", f"not renewed: {exc}")
            return
        if result.exit_code == STILL_ASKING:
            self.timings.note("network", "not renewed in 5 s: the guest asks for its lease again in the background")
        elif result.exit_code:
            self.timings.note("network", f"not renewed: the guest's udhcpc exited with {result.exit_code}")
        else:
            self.timings.mark("network_renewed")

    @asynccontextmanager
    async def _running(self, paused: bool = False) -> AsyncIterator[Machine]:
        self._paused = paused
        try:
            if self._jail is not None:
                from smolvmm.host.jail import enter

                user, network = self._jail
                self.timings.note("jail", enter(user, network=network))
            install_kick_handler()
            if self._working_set:  # after the jail, which admits no other thread
                self._prefetch = threading.Thread(target=self._populate, name="prefetch", daemon=True)
                self._prefetch.start()
            with unwrapped_errors():
                async with anyio.create_task_group() as tg:
                    try:
                        tg.start_soon(self._run_devices)
                        tg.start_soon(self._watch)
                        self.console.on_first_output(lambda: self.timings.mark("first_output"))
                        threads = self._vm.vcpu_threads(
                            self._parked.signal, [d.signal for d in self._vcpu_done], paused
                        )
                        self.timings.mark("first_kvm_run")
                        for thread, done in zip(threads, self._vcpu_done):
                            await tg.start(self._drive_vcpu, thread, done, name=f"vcpu{thread.vcpu.id}")
                        yield self
                    finally:
                        # Not through the watcher: a cancelled caller's scope has cancelled it too.
                        self._record_exit(MachineExit(ExitReason.STOPPED))
                        with anyio.CancelScope(shield=True):
                            await self._shutdown()
        finally:
            self._close()

    async def _drive_vcpu(
        self, thread: VcpuThread, done: EventFd, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """One vCPU's task: start its thread and join it when it ends (stopping it first if cancelled)."""
        joined = anyio.Event()
        self._vcpus_joined.append(joined)
        thread.start()
        task_status.started()
        ended = False
        try:
            await done.wait()
            ended = True
        finally:
            with anyio.CancelScope(shield=True):
                if not ended:
                    thread.stop()
                    await done.wait()
                thread.join()
                joined.set()

    async def _run_devices(self) -> None:
        """Run the device tasks; after a quiesce, wait to be restarted (or for the end)."""
        while True:
            with self._devices_scope:
                async with anyio.create_task_group() as tg:
                    for name, run in self._device_tasks:
                        tg.start_soon(self._guard_device, name, run)
            self._devices_stopped.set()
            if self._exit is not None:
                return
            await self._devices_restart.wait()
            if self._exit is not None:
                return  # the machine ended while the devices were stopped: its shutdown saw the old scope
            self._devices_scope = anyio.CancelScope()
            self._devices_stopped = anyio.Event()
            self._devices_restart = anyio.Event()

    async def _guard_device(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await run()
        except Exception as exc:  # a device bug ends this machine, never the caller's event loop
            self._record_exit(MachineExit(ExitReason.CRASH, f"{name}: {exc}"))

    async def _watch(self) -> None:
        await self._exited.wait()
        await self._shutdown()

    async def _shutdown(self) -> None:
        """Stop and join every vCPU thread, then the device tasks (once; later calls wait for it)."""
        async with self._shutdown_lock:
            if self._finished.is_set():
                return
            for thread in self._vm.threads:
                thread.stop()
            for joined in self._vcpus_joined:
                await joined.wait()
            self._devices_scope.cancel()
            self._devices_restart.set()
            self.console.end_output()
            if self._agent is not None:  # an exec or process waiting on the guest ends with it
                self._agent.fail("the machine has stopped")
            self._finished.set()

    async def wait(self) -> MachineExit:
        """Wait until the machine ends; says how (powered off, rebooted, crashed, stopped)."""
        await self._finished.wait()
        assert self._exit is not None
        return self._exit

    async def stop(self) -> MachineExit:
        """Stop the machine now (if it is still running) and wait until everything has stopped."""
        self._record_exit(MachineExit(ExitReason.STOPPED))
        return await self.wait()

    async def pause(self) -> None:
        """Take every vCPU out of the guest and park it (devices keep running).

        The guest's clock stops with it: after ``resume`` its kernel sees no gap, and the guest
        agent (where the guest has answered one) then sets its wall clock to the host's.
        """
        if self._paused:
            return
        self._paused = True
        for thread in self._vm.threads:
            thread.pause()
        while not all(thread.parked or not thread.alive for thread in self._vm.threads):
            with anyio.move_on_after(0.05):  # also notices a vCPU that ended instead of parking
                await self._parked.wait()
        self._vm.hold_clock()
        if self._agent is not None and self._agent.answered:
            self._sync_agent_on_resume = True

    async def resume(self) -> None:
        """Let parked vCPUs run again."""
        if not self._paused:
            return
        self._paused = False
        self._vm.release_clock()
        for thread in self._vm.threads:
            thread.resume()
        await self._sync_agent()

    async def snapshot(
        self,
        path: str | os.PathLike[str],
        *,
        encoding: str = "raw",
        labels: dict[str, str] | None = None,
        bootable: bool = False,
    ) -> bytes:
        """Save the running machine to bundle ``path`` (atomically) and carry on; returns its digest.

        vCPUs are parked and device tasks stopped with every request completed while the state is
        read; the bundle is written from a worker thread so the event loop keeps serving others.
        With ``bootable`` the bundle also carries the kernel and initrd, so that it can be
        cold-booted (``MachineConfig.from_bundle``) where its saved state cannot run.
        ``snapshot_timings`` then holds where the time went.
        """
        from smolvmm.monitor import snapshot

        if encoding not in ("raw", "zstd"):
            raise ConfigError(f"encoding {encoding!r}: 'raw' (mapped at resume) or 'zstd' (smaller)")
        boot_files: tuple[bytes, bytes | None] = (b"", None)
        if bootable:
            if self._boot_files is None:
                raise ConfigError("this machine does not know the kernel it was booted from")
            boot_files = await anyio.to_thread.run_sync(self._boot_files)
        if self._paused and self._agent is not None and self._agent.holds_secrets:
            raise UsageError("resume this machine before saving it: its agent holds secrets it must overwrite first")
        async with self._snapshot_lock:
            timings = self.snapshot_timings = Timings()
            labels = dict(labels or {})
            port = None if self._paused else self._agent
            if port is not None and await self._agent_started() and await port.sync():
                # the guest runs the agent: resumes will sync it, in the protocol it speaks
                labels[AGENT_LABEL] = "yes" if port.protocol == 1 else LABEL_V2
            elif port is not None:
                timings.note("agent", "no answer: the bundle's restores will not sync it or run commands")
            timings.mark("agent_sync")
            if self._agent is not None and not self._paused and not await self._agent.scrub():
                raise AgentError("the guest agent did not confirm it overwrote its secrets: not saving them")
            timings.mark("agent_scrubbed")
            was_paused = self._paused
            await self.pause()
            timings.mark("vcpus_parked")
            self._devices_scope.cancel()
            await self._devices_stopped.wait()
            timings.mark("devices_stopped")
            try:
                with snapshot.capture(self._vm, self._cmdline, self._parent_digest, labels) as contents:
                    if bootable:
                        contents = dataclasses.replace(contents, kernel=boot_files[0], initrd=boot_files[1])
                    timings.mark("state_and_disks_captured")
                    digest = await anyio.to_thread.run_sync(snapshot.write, path, contents, encoding)
                    timings.mark("bundle_written")
            finally:
                self._devices_restart.set()
                if not was_paused:
                    await self.resume()
            timings.mark("resumed")
        if self._jail is not None:
            from smolvmm.host.jail import publish

            await anyio.to_thread.run_sync(publish, path)
        return digest

    async def _agent_started(self) -> bool:
        """Before a snapshot's sync: whether the guest runs an agent, letting one that has not
        announced itself yet start (a guest starts it as it gets ready, and what is sent before
        it opens its port is lost). A guest without one costs this wait once."""
        assert self._agent is not None
        if self._agent_absent:
            return False
        try:
            await self._agent.wait_ready(AGENT_START_WAIT)
        except AgentTooOld:
            return True  # protocol 1 announces nothing: its sync says
        except AgentError:
            self._agent_absent = True
            return False
        return True

    def _agent_port(self) -> AgentPort:
        if self._agent is None:
            raise AgentError("this machine has no guest agent port (it was booted without one)")
        return self._agent

    async def exec(
        self,
        cmd: str | list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        """Run ``cmd`` in the guest and return its ``ExecResult`` once it ends.

        ``cmd`` is an argv list (no shell) or a string run by ``/bin/sh -c``. The process gets
        the machine's env and secrets plus ``env``, starts in ``cwd`` and reads ``stdin``. A
        nonzero exit is a result; killed by signal N, ``exit_code`` is 128+N and ``signal`` N.
        After ``timeout`` seconds its process group is killed and ``GuestTimeout`` raised (the
        machine stays usable). More than ``max_output`` bytes (default 16 MiB) on stdout or
        stderr kills it and raises ``OutputLimitError``; stream big output with ``process``.
        An agent too old for exec raises ``AgentTooOld``.
        """
        return await run(self._agent_port(), cmd, env, cwd, stdin, timeout, max_output)

    @asynccontextmanager
    async def process(
        self, cmd: str | list[str], *, env: dict[str, str] | None = None, cwd: str | None = None
    ) -> AsyncIterator[Process]:
        """Start ``cmd`` in the guest and stream it: ``stdin.send``/``stdin.aclose``, ``async for``
        over ``stdout``/``stderr``, ``wait()``, ``kill()``. Leaving the block kills it if it runs."""
        async with open_process(self._agent_port(), cmd, env, cwd) as process:
            yield process

    def _read_at_random(self) -> None:
        """A trial resume's: no read-ahead, so that the pages mapped are the pages touched."""
        self._vm.memory.read_at_random()

    def _touched(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (gpa, pages) runs of guest RAM within ``ranges`` mapped so far (a trial resume's working set)."""
        return self._vm.memory.mapped_pages(ranges)

    def _populate(self) -> None:
        """The prefetch thread: the bundle's working set read in while the vCPUs start."""
        pages = self._vm.memory.populate(self._working_set)
        self.timings.note("prefetch", f"{pages} of {sum(n for _, n in self._working_set) // PAGE_SIZE} pages")
        self.timings.mark("prefetched")

    def _close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.join()  # before the memory it populates is unmapped
        self._vm.close()
        for eventfd in (self._exited, self._parked, *self._vcpu_done):
            eventfd.close()
        if self._jail is not None:
            from smolvmm.host.jail import leave

            leave()


def _identity(env: dict[str, str] | None, secrets: dict[str, str] | None, hostname: str | None) -> Identity:
    """A clone's identity, checked now so a bad name fails the restore, not a later exec."""
    from smolvmm.agent.protocol import setup_payload

    identity = Identity(
        check_environment("env", {} if env is None else env),
        check_environment("secrets", {} if secrets is None else secrets),
        hostname or f"smolvmm-{os.urandom(4).hex()}",
        os.urandom(16).hex(),
    )
    if not 0 < len(identity.hostname.encode()) <= 64 or any(c.isspace() for c in identity.hostname):
        raise ConfigError(f"hostname {identity.hostname!r}: 1 to 64 bytes, no spaces")
    try:
        setup_payload(identity.hostname, identity.machine_id, identity.env, identity.secrets)
    except ValueError as exc:
        raise ConfigError(f"env/secrets: {exc}") from None
    return identity


def _bundle_boot_files(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    """The kernel and initrd a bootable bundle carries, for saving its machine bootable again."""
    from smolvmm.config import open_bundle

    with open_bundle(path) as bundle:
        kernel = bundle.kernel
        if kernel is None:
            raise ConfigError(
                f"this machine was restored from {path}, which has no kernel: it cannot be saved bootable"
            )
        return kernel, bundle.initrd


def _trusted(directory: str | os.PathLike[str] | None) -> Any:
    """The trusted public keys of ``directory`` (None: no signature required)."""
    if directory is None:
        return None
    from smolvmm.monitor.signing import load_trusted_keys

    return load_trusted_keys(directory)
