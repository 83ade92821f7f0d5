"""The vCPU loop's cost per served exit, against KVM_RUN alone.

Run: ``python bench/bench_exits.py [--seconds 1] [--runs 5]`` on a host with /dev/kvm (PVM included:
the guest is six bytes of real-mode code, ``mov dx, 0x3fd; l: in al, dx; jmp l``, spinning on the
UART's line status register, so every instruction of its loop is an exit).

- **smolvmm**: ``KvmVcpu.run`` with the 16550A UART on the port bus, as a machine has it: exits served
  per second, read from the UART's own count of register reads.
- **virtio-mmio InterruptStatus**: a guest reading it in a loop (``mov eax, [base + 0x60]``,
  counting its reads in its own memory) from a virtio-rng's transport, served by the transport's
  Python as without a C compiler, then by the vCPU loop's C as a machine has it (``Bus.add_word``):
  the two exits each interrupt costs a virtio driver.
- **KVM_RUN alone, Python**: ``run_once`` in a loop, serving nothing.
- **KVM_RUN alone, C**: the same loop compiled with gcc (skipped without gcc), the floor.

Wall time, one thread, the other CPUs idle or not: compare the columns of one run. Prints a Markdown
table: µs per exit, min / median / max.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import machine_info, summary

from smolvmm.devices.bus import Bus
from smolvmm.devices.uart import Uart16550
from smolvmm.devices.virtio.mmio import MMIO_SIZE, MmioTransport
from smolvmm.devices.virtio.rng import VirtioRng
from smolvmm.host.memory import GuestMemory
from smolvmm.hypervisor.kvm.bindings import ffi
from smolvmm.hypervisor.kvm.system import Kvm
from smolvmm.hypervisor.kvm.vcpu import KvmVcpu
from smolvmm.hypervisor.kvm.vm import KvmVm

CODE_ADDR = 0x1000
CODE = bytes.fromhex("bafd03ecebfd")  # mov dx, 0x3fd; l: in al, dx; jmp l
RAM, STATUS_CODE_ADDR, COUNT_ADDR, VIRTIO_BASE = 0x8000, 0x3000, 0x2000, 0xA000  # the device past RAM
STATUS_CODE = bytes.fromhex("66a160a066ff060020ebf5")  # l: mov eax, [0xa060]; inc dword [0x2000]; jmp l
C_LOOP = r"""
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
int main(int argc, char **argv) {
    long exits = atol(argv[1]);
    int kvm = open("/dev/kvm", O_RDWR), vm = ioctl(kvm, KVM_CREATE_VM, 0);
    unsigned char *ram = mmap(0, 0x10000, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memcpy(ram + 0x1000, "\xba\xfd\x03\xec\xeb\xfd", 6);
    struct kvm_userspace_memory_region slot = {0, 0, 0, 0x10000, (unsigned long)ram};
    ioctl(vm, KVM_SET_USER_MEMORY_REGION, &slot);
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    struct kvm_run *run = mmap(0, ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    struct kvm_sregs sregs;
    ioctl(vcpu, KVM_GET_SREGS, &sregs);
    sregs.cs.base = sregs.cs.selector = 0;
    ioctl(vcpu, KVM_SET_SREGS, &sregs);
    struct kvm_regs regs = {.rip = 0x1000, .rflags = 2};
    ioctl(vcpu, KVM_SET_REGS, &regs);
    struct timespec began, ended;
    clock_gettime(CLOCK_MONOTONIC, &began);
    for (long i = 0; i < exits; i++)
        if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_IO) return 1;
    clock_gettime(CLOCK_MONOTONIC, &ended);
    printf("%f\n", ((ended.tv_sec - began.tv_sec) * 1e9 + (ended.tv_nsec - began.tv_nsec)) / 1e3 / exits);
    return 0;
}
"""


def spinning_vcpu(kvm: Kvm, rip: int = CODE_ADDR) -> tuple[KvmVm, KvmVcpu, GuestMemory]:
    """A vCPU at the start of the spinning loop (or of the code at ``rip``)."""
    vm = KvmVm(kvm.create_vm(), kvm)
    memory = GuestMemory.anonymous([(0, RAM)])
    vm.map_memory(0, 0, RAM, memory.regions[0].host_address)
    memory.write(CODE_ADDR, CODE)
    memory.write(STATUS_CODE_ADDR, STATUS_CODE)
    vcpu = vm.create_vcpu(0)
    sregs = ffi.new("struct kvm_sregs *")
    ffi.buffer(sregs)[:] = vcpu.get_sregs()
    sregs.cs.base = sregs.cs.selector = 0
    vcpu.set_sregs(bytes(ffi.buffer(sregs)))
    regs = ffi.new("struct kvm_regs *")
    regs.rip, regs.rflags = rip, 0x2
    vcpu.set_regs(bytes(ffi.buffer(regs)))
    return vm, vcpu, memory


def served(vcpu: KvmVcpu, seconds: float) -> float:
    """µs per exit of ``vcpu.run`` serving the UART for ``seconds``."""
    reads = 0
    uart = Uart16550(lambda: None, lambda data: None, lambda: None)

    def read(offset: int, size: int) -> int:
        nonlocal reads
        reads += 1
        return uart.read(offset, size)

    pio = Bus("port I/O")
    pio.add(0x3F8, 8, read, uart.write)
    stopper = threading.Timer(seconds, vcpu.interrupt)
    began = time.perf_counter()
    stopper.start()
    vcpu.run(pio, Bus("MMIO"))
    elapsed = time.perf_counter() - began
    vcpu.clear_interrupt()
    return elapsed / reads * 1e6


def status_reads(kvm: Kvm, seconds: float, in_c: bool) -> float:
    """µs per InterruptStatus read of ``KvmVcpu.run`` for ``seconds`` (a VM of its own), the
    transport's Python serving each or (``in_c``) the vCPU loop's C."""
    vm, vcpu, memory = spinning_vcpu(kvm, STATUS_CODE_ADDR)
    transport = MmioTransport(VirtioRng(), memory)
    mmio = Bus("MMIO")
    mmio.add(VIRTIO_BASE, MMIO_SIZE, transport.mmio_read, transport.mmio_write)
    if in_c:
        for address, word, clears in transport.interrupt_words(VIRTIO_BASE):
            mmio.add_word(address, word, clears)
    stopper = threading.Timer(seconds, vcpu.interrupt)
    began = time.perf_counter()
    stopper.start()
    vcpu.run(Bus("port I/O"), mmio)
    elapsed = time.perf_counter() - began
    reads = int.from_bytes(memory.read(COUNT_ADDR, 4), "little")
    transport.close()
    vcpu.close()
    vm.close()
    memory.close()
    return elapsed / reads * 1e6


def bare(vcpu: KvmVcpu, exits: int) -> float:
    """µs per exit of ``run_once`` alone."""
    began = time.perf_counter()
    for _ in range(exits):
        vcpu.run_once()
    return (time.perf_counter() - began) / exits * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each smolvmm run (default 1)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = parser.parse_args()
    kvm = Kvm()
    vm, vcpu, memory = spinning_vcpu(kvm)
    columns: dict[str, list[float]] = {
        "smolvmm `KvmVcpu.run` + UART": [],
        "virtio-mmio InterruptStatus, the transport's Python": [],
        "virtio-mmio InterruptStatus, the vCPU loop's C": [],
        "`run_once` alone": [],
        "C loop": [],
    }
    with tempfile.TemporaryDirectory(prefix="smolbench-exits-") as work:
        program = Path(work) / "exits"
        compiler = shutil.which("gcc")
        if compiler:
            (Path(work) / "exits.c").write_text(C_LOOP)
            subprocess.run([compiler, "-O2", "-o", str(program), str(Path(work) / "exits.c")], check=True)
        try:
            for _ in range(args.runs):
                columns["virtio-mmio InterruptStatus, the transport's Python"].append(
                    status_reads(kvm, args.seconds, in_c=False)
                )
                columns["virtio-mmio InterruptStatus, the vCPU loop's C"].append(
                    status_reads(kvm, args.seconds, in_c=True)
                )
                per_exit = served(vcpu, args.seconds)
                columns["smolvmm `KvmVcpu.run` + UART"].append(per_exit)
                exits = int(args.seconds * 1e6 / per_exit)
                columns["`run_once` alone"].append(bare(vcpu, exits))
                if compiler:
                    done = subprocess.run([str(program), str(exits)], capture_output=True, text=True, check=True)
                    columns["C loop"].append(float(done.stdout))
        finally:
            vcpu.close()
            vm.close()
            memory.close()
            kvm.close()
    results = {"machine": machine_info(), **{name: summary(v) for name, v in columns.items() if v}}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print("| loop | µs per exit |\n|---|---|")
    for name, values in columns.items():
        if values:
            print(f"| {name} | {min(values):.1f} / {sorted(values)[len(values) // 2]:.1f} / {max(values):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
