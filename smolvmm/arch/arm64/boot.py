"""Booting arm64 Linux directly: where the Image, device tree and initrd go, and the boot vCPU's
registers (Documentation/arch/arm64/booting.rst).

Placement, bottom to top of RAM:
- the Image at the 2 MiB-aligned start of RAM plus its text_offset (that suits both placement
  flags: "as close as possible to the base of DRAM" and "anywhere"), followed by image_size
  bytes the kernel may use for its BSS;
- the initrd, page aligned, just below the device tree;
- the device tree in the last 2 MiB block of RAM, alone in it: the kernel maps the DTB with
  cacheable 2 MiB blocks, and the DTB may be at most 2 MiB.
Secondary vCPUs start powered off and are brought up by the guest through PSCI CPU_ON.
"""

from __future__ import annotations

from dataclasses import dataclass

from smolvmm.arch.arm64.image import ImageHeader
from smolvmm.arch.arm64.layout import MIB, Layout
from smolvmm.errors import ConfigError, ImageError
from smolvmm.host.memory import GuestMemory

KERNEL_ALIGN = 2 * MIB
DTB_SLOT = 2 * MIB
INITRD_ALIGN = 4096

# PSTATE: EL1 using SP_EL1 (M[3:0] = 0b0101), with Debug, SError, IRQ and FIQ masked.
PSTATE_EL1H = 0x5
PSTATE_DAIF = 0xF << 6
BOOT_PSTATE = PSTATE_DAIF | PSTATE_EL1H


@dataclass(frozen=True)
class BootPlan:
    """Guest-physical addresses of everything the loader writes."""

    kernel: int  # load address; also the entry point
    kernel_end: int  # kernel + image_size: nothing else may lie below this
    dtb: int
    initrd: int
    initrd_size: int


def plan_boot(layout: Layout, header: ImageHeader, initrd_size: int) -> BootPlan:
    """Place the kernel, initrd and device tree in ``layout``'s RAM, or ConfigError if RAM is too small."""
    ram_start = layout.ram_end - layout.ram_size
    kernel = ram_start + header.text_offset
    kernel_end = kernel + header.image_size
    dtb = (layout.ram_end - DTB_SLOT) & ~(KERNEL_ALIGN - 1)
    initrd = (dtb - initrd_size) & ~(INITRD_ALIGN - 1)
    if initrd < kernel_end:
        raise ConfigError(
            f"{layout.ram_size // MIB} MiB of RAM cannot hold the kernel ({-(-header.image_size // MIB)} MiB "
            f"running), the initrd ({-(-initrd_size // MIB)} MiB) and the {DTB_SLOT // MIB} MiB device tree"
        )
    return BootPlan(kernel, kernel_end, dtb, initrd, initrd_size)


def load_linux(memory: GuestMemory, plan: BootPlan, kernel: bytes, initrd: bytes, dtb: bytes) -> None:
    """Write the images where ``plan`` says; the DTB is built after planning (it names the initrd)."""
    if len(kernel) > plan.kernel_end - plan.kernel:
        raise ImageError(f"kernel is {len(kernel)} bytes, larger than the {plan.kernel_end - plan.kernel} planned")
    if len(initrd) != plan.initrd_size:
        raise ImageError(f"initrd is {len(initrd)} bytes, not the {plan.initrd_size} planned")
    if len(dtb) > DTB_SLOT:
        raise ImageError(f"device tree is {len(dtb)} bytes; the arm64 boot protocol allows at most 2 MiB")
    memory.write(plan.kernel, kernel)
    memory.write(plan.initrd, initrd)
    memory.write(plan.dtb, dtb)


def boot_registers(plan: BootPlan) -> dict[str, int]:
    """Core register values of the boot vCPU: x0 = DTB address, x1..x3 = 0 (reserved), pc = entry."""
    return {"x0": plan.dtb, "x1": 0, "x2": 0, "x3": 0, "pc": plan.kernel, "pstate": BOOT_PSTATE}
