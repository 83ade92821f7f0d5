"""Machine: a running VM inside the caller's anyio event loop (trio or asyncio).

Structure: one task group per machine holding a watcher task and the device tasks; one
thread per vCPU, each blocked in KVM_RUN. The first exit (guest poweroff/reboot, a crash,
or ``stop()``) stops every vCPU, cancels the device tasks and closes every fd, so nothing
outlives the ``async with`` block.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import anyio

from .config import MachineConfig
from .console import Console
from .eventfd import EventFd
from .vcpu import ExitReason, MachineExit, install_kick_handler
from .vm import VirtualMachine

DeviceTask = tuple[str, Callable[[], Coroutine[Any, Any, None]]]


class Machine:
    """A running machine. Create it with ``Machine.boot(config)`` or ``Machine.restore(path)``."""

    def __init__(self, vm: VirtualMachine, config: MachineConfig, device_tasks: list[DeviceTask]) -> None:
        self._vm = vm
        self.config = config
        self.console: Console = vm.console
        self._device_tasks = device_tasks
        self._exit: MachineExit | None = None
        self._exit_lock = threading.Lock()
        self._exited = EventFd()
        self._parked = EventFd()
        self._threads_done = EventFd()
        self._finished = anyio.Event()
        self._devices_scope = anyio.CancelScope()
        self._paused = False

    def _record_exit(self, exit: MachineExit) -> None:
        """From any thread: the first exit wins and wakes the watcher."""
        with self._exit_lock:
            if self._exit is not None:
                return
            self._exit = exit
        self._exited.signal()

    @classmethod
    @asynccontextmanager
    async def boot(cls, config: MachineConfig) -> AsyncIterator[Machine]:
        """Cold-boot ``config`` (the default guest where kernel is None); yields the running machine."""
        from .coldboot import create_for_boot

        machine = create_for_boot(cls, config)
        async with machine._running():
            yield machine

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[Machine]:
        try:
            install_kick_handler()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._run_devices)
                tg.start_soon(self._watch)
                self._vm.start_vcpus(self._parked.signal, self._threads_done.signal)
                try:
                    yield self
                finally:
                    with anyio.CancelScope(shield=True):
                        await self.stop()
        finally:
            self._close()

    async def _run_devices(self) -> None:
        with self._devices_scope:
            async with anyio.create_task_group() as tg:
                for name, run in self._device_tasks:
                    tg.start_soon(self._guard_device, name, run)

    async def _guard_device(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await run()
        except Exception as exc:  # a device bug ends this machine, never the caller's event loop
            self._record_exit(MachineExit(ExitReason.CRASH, f"{name}: {exc}"))

    async def _watch(self) -> None:
        await self._exited.wait()
        for thread in self._vm.threads:
            thread.stop()
        done = 0
        while done < len(self._vm.threads):
            done += await self._threads_done.wait()
        for thread in self._vm.threads:
            thread.join()
        self._devices_scope.cancel()
        self.console.end_output()
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
        """Take every vCPU out of the guest and park it."""
        if self._paused:
            return
        self._paused = True
        for thread in self._vm.threads:
            thread.pause()
        while not all(thread.parked or not thread.alive for thread in self._vm.threads):
            with anyio.move_on_after(0.05):
                await self._parked.wait()

    async def resume(self) -> None:
        """Let parked vCPUs run again."""
        if not self._paused:
            return
        self._paused = False
        for thread in self._vm.threads:
            thread.resume()

    def _close(self) -> None:
        self._vm.close()
        for eventfd in (self._exited, self._parked, self._threads_done):
            eventfd.close()
