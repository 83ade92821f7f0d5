"""The default guest: Debian's cloud kernel with a busybox initramfs that loads the virtio drivers."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from smolvmm import progress
from smolvmm.images import agent, busybox
from smolvmm.images.cache import cache_key, cached_build
from smolvmm.images.debian import Package, dependency_of
from smolvmm.kernel.build import minimal_kernel

READY_MARKER = "smolvmm: guest ready"
DEFAULT_CMDLINE = (
    "console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce init_on_free=1 quiet"
)
# The default command line without the i8042.* words: the minimal kernel has no i8042 driver to take them.
MINIMAL_CMDLINE = " ".join(word for word in DEFAULT_CMDLINE.split() if not word.startswith("i8042."))
# A prebuilt default guest directory (vmlinuz + initrd.img); the test plugin sets it for the
# nested machine so the guest is not resolved with apt or rebuilt there.
PREBUILT_ENV = "SMOLVMM_DEFAULT_GUEST"
PREBUILT_MINIMAL_ENV = "SMOLVMM_MINIMAL_GUEST"  # the same for the minimal guest (kernel="minimal")

MODULES = [
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "ext4",
]

INIT = (
    r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
"""
    + busybox.LOAD_MODULES
    + r"""
load_modules
# With console=hvc0 the console did not exist when the kernel started us; now it does.
exec 0<>/dev/console 1>&0 2>&0
if [ -b /dev/vda ]; then
    mount -t ext4 /dev/vda /mnt || echo "smolvmm: could not mount /dev/vda on /mnt" >&2
fi
ip link set lo up
for word in $(cat /proc/cmdline); do
    case "$word" in smolvmm.ip=*) address="${word#smolvmm.ip=}" ;; esac
done
if [ -n "$address" ]; then
    ip addr add "$address" dev eth0 && ip link set eth0 up || echo "smolvmm: could not configure eth0" >&2
fi
for word in $(cat /proc/cmdline); do
    case "$word" in smolvmm.dhcp=*)
        for interface in $(echo "${word#smolvmm.dhcp=}" | tr , ' '); do
            ip link set "$interface" up
            udhcpc -i "$interface" -s /etc/smolvmm/udhcpc.script -n -q -t 10 -T 1 >/dev/null 2>&1 ||
                echo "smolvmm: no DHCP answer on $interface" >&2
        done ;;
    esac
done
for word in $(cat /proc/cmdline); do
    case "$word" in smolvmm.agent=*) /bin/smolvmm-agent "/dev/${word#smolvmm.agent=}" & ;; esac
done
echo "$READY"
setsid cttyhack sh
poweroff -f
""".replace("$READY", READY_MARKER)
)


# udhcpc's hook (busybox passes the lease in the environment): address, MTU, default route, DNS.
UDHCPC_SCRIPT = r"""#!/bin/sh
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    for gateway in $router; do
        ip route replace default via "$gateway" dev "$interface"
        break
    done
    : > /etc/resolv.conf
    for server in $dns; do echo "nameserver $server" >> /etc/resolv.conf; done
    [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf ;;
esac
exit 0
"""
UDHCPC_SCRIPT_PATH = "etc/smolvmm/udhcpc.script"


def udhcpc_script(busybox: str | None = None) -> str:
    """udhcpc's hook, run by the guest's ``/bin/sh`` with its ``ip``, or with ``busybox`` (a
    path) as both, for a guest whose root is not its own (the image guest)."""
    if busybox is None:
        return UDHCPC_SCRIPT
    return re.sub(r"(?m)(^ *|&& )ip ", rf"\1{busybox} ip ", UDHCPC_SCRIPT.replace("#!/bin/sh", f"#!{busybox} sh", 1))


@dataclass(frozen=True)
class GuestImage:
    """What a VMM needs to boot a guest: kernel, initrd, command line, and the line that says it is up."""

    kernel: Path
    initrd: Path
    cmdline: str
    ready_marker: str


def default_guest() -> GuestImage:
    """The default guest, built into the cache on first use (needs apt-get; downloads ~28 MB)."""
    prebuilt = os.environ.get(PREBUILT_ENV)
    directory = Path(prebuilt) if prebuilt else _build()
    return GuestImage(directory / busybox.KERNEL, directory / busybox.INITRD, DEFAULT_CMDLINE, READY_MARKER)


def minimal_guest() -> GuestImage:
    """The default guest's userland, with no modules to load, on the minimal kernel (both built
    into the cache on first use: ``smolvmm kernel build``)."""
    prebuilt = os.environ.get(PREBUILT_MINIMAL_ENV)
    directory = Path(prebuilt) if prebuilt else _build_minimal()
    return GuestImage(directory / busybox.KERNEL, directory / busybox.INITRD, MINIMAL_CMDLINE, READY_MARKER)


def kernel_package() -> Package:
    """The Debian cloud kernel package apt would pick now (the default guest's and the image guest's)."""
    return Package.candidate(dependency_of("linux-image-cloud-amd64", "linux-image-"))


def _programs() -> dict[str, bytes]:
    """What the guest's initramfs holds besides busybox: the agent and the DHCP hook."""
    return {agent.GUEST_PATH: agent.build_agent(), UDHCPC_SCRIPT_PATH: udhcpc_script().encode()}


def _build() -> Path:
    with progress.task("looking up the default guest's Debian packages"):
        kernel = kernel_package()
        tools = Package.candidate("busybox-static")
    key = cache_key([f"{kernel.name}={kernel.version}", f"{tools.name}={tools.version}"], [agent.SOURCE])

    def build(out: Path) -> None:
        kernel.download()
        tools.download()
        with progress.task("building the default guest (kernel modules, busybox, agent, initramfs)"):
            busybox.build(out, kernel, tools, MODULES, INIT, _programs())

    return cached_build("default-guest", key, build)


def _build_minimal() -> Path:
    kernel = minimal_kernel()
    with progress.task("looking up the minimal guest's Debian packages"):
        tools = Package.candidate("busybox-static")
    key = cache_key([str(kernel.kernel), f"{tools.name}={tools.version}"], [agent.SOURCE])

    def build(out: Path) -> None:
        tools.download()
        with progress.task("building the minimal guest (busybox, agent, initramfs)"):
            busybox.build(out, None, tools, [], INIT, _programs())
        shutil.copyfile(kernel.kernel, out / busybox.KERNEL)

    return cached_build("minimal-guest", key, build)
