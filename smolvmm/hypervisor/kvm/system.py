"""The /dev/kvm file descriptor: capabilities, supported CPUID and MSRs, VM creation."""

from __future__ import annotations

import errno
import os
from functools import cached_property

from smolvmm.errors import HypervisorError
from smolvmm.hypervisor.kvm.bindings import ffi, libc
from smolvmm.hypervisor.kvm.ioctls import KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES, Cap, Ioctl


class KvmError(HypervisorError):
    """An ioctl failed; names the ioctl and the errno."""

    def __init__(self, request: Ioctl, err: int) -> None:
        self.request = request
        self.errno = err
        super().__init__(f"{request.name} failed: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")


def ioctl(fd: int, request: Ioctl, arg: object = 0) -> int:
    """Issue one ioctl; ``arg`` is a cffi pointer or an integer. Raises KvmError on failure."""
    if isinstance(arg, int):
        arg = ffi.cast("unsigned long", arg)
    ret: int = libc.ioctl(fd, ffi.cast("unsigned long", request), arg)
    if ret < 0:
        raise KvmError(request, ffi.errno)
    return ret


class Kvm:
    """An open /dev/kvm."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise HypervisorError(f"{path} does not exist: this host has no KVM (load kvm_intel or kvm_amd)") from None
        except PermissionError:
            raise HypervisorError(
                f"no permission to open {path}: add yourself to the 'kvm' group or run as root"
            ) from None
        version = ioctl(self.fd, Ioctl.KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            self.close()
            raise HypervisorError(f"unsupported KVM API version {version} (need {KVM_API_VERSION})")

    def check_extension(self, cap: Cap) -> int:
        return ioctl(self.fd, Ioctl.KVM_CHECK_EXTENSION, int(cap))

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, Ioctl.KVM_GET_VCPU_MMAP_SIZE)

    @cached_property
    def supported_cpuid(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """KVM_GET_SUPPORTED_CPUID as (function, index, flags, eax, ebx, ecx, edx) tuples."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": KVM_MAX_CPUID_ENTRIES, "entries": KVM_MAX_CPUID_ENTRIES})
        ioctl(self.fd, Ioctl.KVM_GET_SUPPORTED_CPUID, cpuid)
        return [
            (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (cpuid.entries[i] for i in range(cpuid.nent))
        ]

    @cached_property
    def msr_index_list(self) -> list[int]:
        """Every MSR KVM can save and restore for a vCPU (KVM_GET_MSR_INDEX_LIST)."""
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0, "indices": 0})
        try:
            ioctl(self.fd, Ioctl.KVM_GET_MSR_INDEX_LIST, probe)
        except KvmError as exc:
            if exc.errno != errno.E2BIG:
                raise
        count = probe.nmsrs
        msrs = ffi.new("struct kvm_msr_list *", {"nmsrs": count, "indices": count})
        ioctl(self.fd, Ioctl.KVM_GET_MSR_INDEX_LIST, msrs)
        return [msrs.indices[i] for i in range(msrs.nmsrs)]

    @cached_property
    def xsave_size(self) -> int:
        """Bytes of a vCPU's XSAVE area: KVM_CAP_XSAVE2's value, at least the legacy 4096."""
        return max(4096, self.check_extension(Cap.KVM_CAP_XSAVE2))

    def create_vm(self) -> int:
        """A new VM file descriptor."""
        return ioctl(self.fd, Ioctl.KVM_CREATE_VM, 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
