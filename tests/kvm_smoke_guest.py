"""A tiny real-mode guest on /dev/kvm: five instructions that write "ok" to port 0x3f8, then hlt.

Runs as a test natively and, as a script, inside tools/nested-kvm (the harness smoke test):
``python tests/kvm_smoke_guest.py`` prints what the guest wrote and exits 0 on success.
"""

from __future__ import annotations

from smolvmm.host.memory import GuestMemory
from smolvmm.hypervisor.kvm.bindings import ffi
from smolvmm.hypervisor.kvm.ioctls import KVM_EXIT_IO_OUT, Exit
from smolvmm.hypervisor.kvm.system import Kvm
from smolvmm.hypervisor.kvm.vm import KvmVm

CODE_ADDR = 0x1000
# mov dx, 0x3f8; mov al, 'o'; out dx, al; mov al, 'k'; out dx, al; hlt
CODE = bytes.fromhex("baf803b06feeb06beef4")


def run_guest() -> bytes:
    """Run the program; returns the bytes it wrote to the port before halting."""
    kvm = Kvm()
    vm = KvmVm(kvm.create_vm(), kvm)
    memory = GuestMemory.anonymous([(0, 0x10000)])
    vcpu = None
    try:
        vm.map_memory(0, 0, 0x10000, memory.regions[0].host_address)
        memory.write(CODE_ADDR, CODE)
        vcpu = vm.create_vcpu(0)
        sregs = ffi.new("struct kvm_sregs *")
        ffi.buffer(sregs)[:] = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        vcpu.set_sregs(bytes(ffi.buffer(sregs)))
        regs = ffi.new("struct kvm_regs *")
        regs.rip, regs.rflags = CODE_ADDR, 0x2
        vcpu.set_regs(bytes(ffi.buffer(regs)))
        output = bytearray()
        for _ in range(10):
            reason = vcpu.run_once()
            if reason == Exit.KVM_EXIT_HLT:
                return bytes(output)
            io = vcpu.kvm_run.io
            if reason != Exit.KVM_EXIT_IO or io.direction != KVM_EXIT_IO_OUT or io.port != 0x3F8:
                raise RuntimeError(f"unexpected exit {reason.name}")
            output += vcpu.io_data()
        raise RuntimeError("the guest did not halt")
    finally:
        if vcpu is not None:
            vcpu.close()
        vm.close()
        memory.close()
        kvm.close()


if __name__ == "__main__":
    written = run_guest()
    print(f"guest wrote {written.decode()!r} to port 0x3f8")
    raise SystemExit(0 if written == b"ok" else 1)
