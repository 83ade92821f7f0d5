"""Restoring a machine from a .smolmachine bundle, up to (not including) the first guest entry.

Guest RAM is the bundle's raw pages mapped ``MAP_PRIVATE`` (never read in whole), or a zstd
bundle decoded into anonymous memory. Base disks are materialised once into the cache, keyed
by the bundle's digest, and every instance writes to its own fresh overlay. The machine is
planned from the bundle and assembled as a cold boot's is (``smolvmm.monitor.plan``); then its
saved state, admitted by ``smolvmm.monitor.boundary``, is loaded into it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from smolvmm.agent.channel import AgentPort
from smolvmm.arch.machines import arch_named, host_arch_name
from smolvmm.config import format_errors, open_bundle
from smolvmm.devices.virtio.net import NetState, VirtioNet
from smolvmm.errors import BundleError, HypervisorError
from smolvmm.host.memory import PAGE_SIZE, GuestMemory
from smolvmm.hypervisor import open_hypervisor
from smolvmm.hypervisor.interface import Hypervisor
from smolvmm.monitor import boundary
from smolvmm.monitor.exit import MachineExit
from smolvmm.monitor.plan import MachinePlan, RestoreOverrides, assemble
from smolvmm.monitor.timings import Timings
from smolvmm.monitor.vm import StartedVm, VirtualMachine, start_vm

if TYPE_CHECKING:
    from smolvmm.monitor.signing import TrustedKeys


@dataclass(frozen=True)
class Restored:
    """A VM rebuilt from a bundle, paused before its first guest entry."""

    vm: VirtualMachine
    plan: MachinePlan
    digest: bytes
    labels: dict[str, str]
    agent: AgentPort | None
    new_macs: dict[str, bytes]  # guest interface name -> the MAC this instance was asked to use
    working_set: tuple[tuple[int, int], ...]  # (gpa, length) of mapped RAM to populate ahead of the guest


RESTORES_ON: dict[str, frozenset[str]] = {
    "kvm-hardware": frozenset({"kvm-hardware"}),
    "kvm-pvm": frozenset({"kvm-pvm"}),
}
"""The hypervisor flavours a bundle's state is known to run on, by the flavour that saved it
(``METADATA.hypervisor``). Only the same flavour: PVM and hardware KVM differ in CPU state
(MSRs, CPUID). A flavour not listed here, or none recorded, restores nowhere."""


def check_flavour(saved: str, host: str) -> None:
    """Refuse state saved under ``saved`` unless ``RESTORES_ON`` says it runs on ``host``."""
    if host in RESTORES_ON.get(saved, ()):
        return
    if not saved:
        raise BundleError(f"the bundle does not record the hypervisor that saved it, so it may not run on {host}")
    why = "their CPU state is not compatible" if saved in RESTORES_ON else f"smolvmm does not know {saved}"
    raise BundleError(f"the bundle was saved under {saved} and this host is {host}: {why}")


def restore_vm_from(
    path: str | os.PathLike[str],
    overrides: RestoreOverrides,
    on_exit: Callable[[MachineExit], None],
    timings: Timings,
    *,
    same_flavour: bool = True,
    trusted_keys: TrustedKeys | None = None,
) -> Restored:
    """Rebuild a paused VM from ``path``.

    ``same_flavour=False`` skips the hypervisor-flavour check, for a restore that never runs.
    With ``trusted_keys``, a bundle whose content no trusted key signed is refused first.
    """
    early = _EarlyVm()
    try:
        bundle = open_bundle(path, on_config=early.start)
    except BaseException:
        early.close()
        raise
    with bundle, format_errors(path):  # zstd RAM is decoded and base disks materialised in here
        try:
            if trusted_keys is not None:
                from smolvmm.monitor.signing import check_signature  # cryptography: signed restores only

                check_signature(bundle, trusted_keys)
                timings.mark("signature")
            arch, host = arch_named(bundle.config.arch), host_arch_name()
            if arch.name != host:
                raise BundleError(f"the bundle is for {arch.name}; this host runs {host} guests")
            saved_devices = boundary.admit_devices(arch, bundle.config.devices, bundle.devices)
            timings.mark("parse")
            memory, hypervisor, started = early.ready(bundle.config)
            if same_flavour:
                check_flavour(bundle.metadata.hypervisor if bundle.metadata else "", hypervisor.flavour)
            plan = MachinePlan.from_bundle(bundle, overrides)
        except BaseException:
            early.close()
            raise
        early.hand_over()  # assemble owns them from here
        # Guest RAM's slots register on a thread (``start_vm``), from as soon as the bundle's RAM
        # layout was known: the reserved RAM is registered, and KVM follows the bundle's pages as
        # they are mapped over it.
        assembled = assemble(plan, memory, on_exit, saved_devices.uart, hypervisor, started)
        vm = assembled.vm
        try:
            if bundle.memory_encoding == "raw":
                memory.map_file(bundle.fileno(), bundle.memory_extents())
            else:
                bundle.read_memory_into([memory.region_view(i) for i in range(len(memory.regions))])
            timings.mark("memory_map")
            # Everything from the bundle is admitted before any of it reaches an ioctl or a device.
            offer = vm.hypervisor.offer
            vm_state, vcpu_states = boundary.admit_state(
                arch, bundle.vm_state, bundle.vcpus, offer, strict=same_flavour
            )
            new_macs: dict[str, bytes] = {}
            renamed = []
            for transport, (_, instance, state) in zip(vm.transports, saved_devices.virtio, strict=True):
                device, saved = transport.device, state.device
                if isinstance(device, VirtioNet) and isinstance(saved, NetState) and device.mac != saved.mac:
                    # A new MAC for this clone: the device reports it, the guest agent applies it.
                    new_macs[f"eth{instance}"] = device.mac
                    state = dataclasses.replace(state, device=dataclasses.replace(saved, mac=device.mac))
                    renamed.append(transport)
                transport.restore_state(state)  # checked, then loaded: no ioctl, nothing runs yet
            timings.mark("devices")
            refused = f"{path}: this host's hypervisor refused the saved state"
            try:
                # What names no guest page is loaded while guest RAM's slots are still being registered.
                vm.vm.restore_state(vm_state)
                pairs = zip(vm.vcpus, vcpu_states, strict=True)
                with_guest_ram = [vcpu.restore_state(s.state, strict=same_flavour) for vcpu, s in pairs]
            except HypervisorError as exc:  # a value the boundary admitted but the hypervisor checks further
                raise BundleError(f"{refused}: {exc}") from exc
            for transport in renamed:  # its interrupt reaches the irqchips restored above
                transport.config_changed()
            vm.ready()
            try:
                skipped = sum(step() for step in with_guest_ram) + sum(s.dropped for s in vcpu_states)
            except HypervisorError as exc:
                raise BundleError(f"{refused}: {exc}") from exc
            timings.mark("vm_vcpu_state")
            if skipped:
                timings.note("msrs_skipped", skipped)
        except BaseException:
            vm.close()
            assembled.agent.close()  # if no console device took it (closing twice is harmless)
            raise
        agent = assembled.agent if plan.has_agent else None
        # Only mapped RAM gains from it: decoded (zstd) RAM is all in memory already.
        working_set = bundle.working_set if bundle.memory_encoding == "raw" else []
        ranges = tuple((r.address, r.pages * PAGE_SIZE) for r in working_set)
        return Restored(vm, plan, bundle.digest, bundle.labels, agent, new_macs, ranges)


class _EarlyVm:
    """Guest RAM reserved and its VM started (``start_vm``) from within ``open_bundle``, once the
    RAM layout is checked, while the other sections are read: registering RAM with KVM takes
    milliseconds of kernel time (6.7 ms for 256 MiB on a PVM host), which the parsing now hides.

    Another architecture's bundle starts nothing. Where starting fails (no /dev/kvm), nothing is
    kept and ``ready`` raises the error: after the bundle was checked, whose errors come first.
    """

    def __init__(self) -> None:
        self._memory: GuestMemory | None = None
        self._hypervisor: Hypervisor | None = None
        self._started: StartedVm | None = None
        self._error: Exception | None = None

    def start(self, config: Any) -> None:
        if config.arch != host_arch_name():  # not host_arch(): its module is imported meanwhile
            return
        try:
            memory, hypervisor = self._reserve(config)
            self._started = start_vm(hypervisor, memory)
        except Exception as exc:
            self._error = exc
            self.close()

    def ready(self, config: Any) -> tuple[GuestMemory, Hypervisor, StartedVm | None]:
        """The RAM, hypervisor and started VM for ``config`` (the first two made now if need be),
        still released by ``close`` until ``hand_over``; or what starting them raised."""
        if self._error is not None:
            raise self._error
        return (*self._reserve(config), self._started)

    def _reserve(self, config: Any) -> tuple[GuestMemory, Hypervisor]:
        """Guest RAM and the hypervisor, made if not yet, kept for ``close``."""
        if self._memory is None:
            self._memory = GuestMemory.anonymous([(r.gpa, r.size) for r in config.ram])
        if self._hypervisor is None:
            self._hypervisor = open_hypervisor()
        return self._memory, self._hypervisor

    def hand_over(self) -> None:
        """Forget what ``ready`` gave: its caller owns it now."""
        self._memory = self._hypervisor = self._started = None

    def close(self) -> None:
        """Release what was started and not handed over."""
        if self._started is not None:
            self._started.close()
        if self._memory is not None:
            self._memory.close()
        if self._hypervisor is not None:
            self._hypervisor.close()
        self._memory = self._hypervisor = self._started = None
