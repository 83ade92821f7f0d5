"""What a virtio device type supplies to the transport: ids, features, config, its queue work."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from smolvmm.errors import BundleError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from smolvmm.devices.virtio.session import Session

# Device-independent feature bits (§6).
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32


def bit(n: int) -> int:
    return 1 << n


class VirtioDevice(ABC):
    """One virtio device type (block, net, ...), independent of the transport that carries it.

    The transport calls ``activate`` and then runs ``serve`` when the driver sets DRIVER_OK,
    cancels ``serve`` and calls ``reset`` when the driver resets the device, and only ever does
    so from the event-loop thread. ``serve`` must finish each request without awaiting (or in
    a thread that cancelling waits for: ``Session.process_in_thread``), so cancelling it at any
    await point leaves every taken chain completed in the used ring.
    """

    device_id: ClassVar[int]
    queue_sizes: ClassVar[tuple[int, ...]]

    @abstractmethod
    def features(self) -> int:
        """The device-type feature bits offered (the transport adds the ring and version bits)."""

    @abstractmethod
    def config(self) -> bytes:
        """The device-specific configuration space, little endian (§4.2.2 offset 0x100)."""

    def activate(self, features: int) -> None:
        """The driver accepted ``features`` and set DRIVER_OK; apply them to host resources."""

    @abstractmethod
    async def serve(self, session: Session) -> None:
        """Process the queues until cancelled."""

    def reset(self) -> None:
        """Forget per-driver state after the driver reset the device."""

    def save_state(self) -> DataclassInstance | None:
        """Device-specific state as a plain frozen dataclass (None when there is none)."""
        return None

    def restore_state(self, state: object) -> None:
        """Check ``state``. By default a device's state is the guest-visible configuration it was
        built with, so only a state equal to what it would save itself is accepted."""
        if state != self.save_state():
            raise BundleError(
                f"saved {type(self).__name__} state {state} does not match this device's {self.save_state()}"
            )

    def close(self) -> None:
        """Release host resources (files, sockets)."""
