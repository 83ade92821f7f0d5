"""Whole-struct GET/SET ioctls, as the bytes of the KVM structure."""

from __future__ import annotations

from smolvmm.hypervisor.kvm.bindings import ffi
from smolvmm.hypervisor.kvm.ioctls import Ioctl
from smolvmm.hypervisor.kvm.system import ioctl


def get_struct(fd: int, request: Ioctl, ctype: str, **init: int) -> bytes:
    """Issue a GET ioctl into a fresh ``ctype`` and return its bytes."""
    obj = ffi.new(f"{ctype} *", init or None)
    ioctl(fd, request, obj)
    return bytes(ffi.buffer(obj))


def set_struct(fd: int, request: Ioctl, ctype: str, data: bytes) -> None:
    """Issue a SET ioctl with ``data`` laid out as ``ctype``."""
    obj = ffi.new(f"{ctype} *")
    if len(data) != ffi.sizeof(obj[0]):
        raise ValueError(f"{ctype} needs {ffi.sizeof(obj[0])} bytes, got {len(data)}")
    ffi.buffer(obj)[:] = data
    ioctl(fd, request, obj)
