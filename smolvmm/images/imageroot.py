"""The guest that boots a container image's disk as its root: the default kernel and an initramfs
that mounts /dev/vda as ``/`` and switches into it.

The image's files stay as they were: what smolvmm adds (busybox, tini as the PID 1 that reaps,
the agent, the second-stage script) lives in a tmpfs on ``/run/smolvmm``. After the switch
the second stage reads one shell command line at a time from the console (echo off), which
is how ``build`` runs warm-up and build steps and ``run`` runs commands (``console_exec``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from smolvmm.images import agent, busybox
from smolvmm.images.cache import cache_key, cached_build
from smolvmm.images.debian import Package
from smolvmm.images.guest import (
    DEFAULT_CMDLINE,
    MINIMAL_CMDLINE,
    MODULES,
    UDHCPC_SCRIPT_PATH,
    GuestImage,
    kernel_package,
    udhcpc_script,
)
from smolvmm.images.guestpaths import BUSYBOX, TOOLS, TOOLS_ARG
from smolvmm.kernel.build import minimal_kernel

READY_MARKER = "smolvmm: image ready"
RUNAS_SOURCE = Path(__file__).with_name("runas.c")
# A prebuilt image-root guest directory (the test plugin sets it for the nested machine).
PREBUILT_IMAGE_ENV = "SMOLVMM_IMAGE_GUEST"
PREBUILT_MINIMAL_IMAGE_ENV = "SMOLVMM_MINIMAL_IMAGE_GUEST"  # the same on the minimal kernel

INIT = (
    r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
"""
    + busybox.LOAD_MODULES
    + r"""
load_modules
exec 0<>/dev/console 1>&0 2>&0
fail() { echo "smolvmm: $*" >&2; poweroff -f; }
mkdir -p /newroot
mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount the image's disk /dev/vda as /"
for point in proc sys dev run tmp; do
    [ -d "/newroot/$point" ] || mkdir -p "/newroot/$point" || fail "the image has no /$point directory"
done
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run
mkdir /newroot/run/smolvmm
cp /bin/busybox /bin/tini /bin/smolvmm-agent /bin/smolvmm-runas /etc/smolvmm/stage2 /etc/smolvmm/udhcpc.script \
    /newroot/run/smolvmm/
for point in dev proc sys; do mount --move "/$point" "/newroot/$point"; done
exec switch_root /newroot /run/smolvmm/tini -- /run/smolvmm/busybox sh /run/smolvmm/stage2
"""
)

STAGE2 = r"""B=/run/smolvmm/busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
$B mkdir -p /dev/pts /dev/shm
$B mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
$B mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
[ -e /dev/fd ] || $B ln -s /proc/self/fd /dev/fd
$B ip link set lo up
for word in $($B cat /proc/cmdline); do
    case "$word" in
        smolvmm.ip=*) $B ip addr add "${word#smolvmm.ip=}" dev eth0 && $B ip link set eth0 up ;;
        smolvmm.agent=*) /run/smolvmm/smolvmm-agent "/dev/${word#smolvmm.agent=}" & ;;
        smolvmm.dhcp=*)
            for interface in $(echo "${word#smolvmm.dhcp=}" | $B tr , ' '); do
                $B ip link set "$interface" up
                $B udhcpc -i "$interface" -s /run/smolvmm/udhcpc.script -n -q -t 10 -T 1 >/dev/null 2>&1 ||
                    echo "smolvmm: no DHCP answer on $interface" >&2
            done ;;
    esac
done
$B stty -echo
echo "$READY"
while :; do
    IFS= read -r line || { $B sleep 1; continue; }
    eval "$line"
done
""".replace("$READY", READY_MARKER)


def image_guest(*, minimal: bool = False) -> GuestImage:
    """The image-root guest on the Debian cloud kernel, or with ``minimal`` on the minimal kernel
    (``smolvmm kernel build``; its initramfs loads no modules), built into the cache on first use
    (needs apt-get, like the default guest)."""
    prebuilt = os.environ.get(PREBUILT_MINIMAL_IMAGE_ENV if minimal else PREBUILT_IMAGE_ENV)
    directory = Path(prebuilt) if prebuilt else _build(minimal)
    cmdline = f"{MINIMAL_CMDLINE if minimal else DEFAULT_CMDLINE} {TOOLS_ARG}={TOOLS}"
    return GuestImage(directory / busybox.KERNEL, directory / busybox.INITRD, cmdline, READY_MARKER)


def _build(minimal: bool) -> Path:
    built = minimal_kernel() if minimal else None
    kernel = None if built else kernel_package()
    tools = Package.candidate("busybox-static")
    tini = Package.candidate("tini")
    inputs = [str(built.kernel) if built else f"{kernel.name}={kernel.version}" if kernel else ""]
    inputs += [f"{p.name}={p.version}" for p in (tools, tini)]

    def build(out: Path) -> None:
        work = out / "tini"
        tini.unpack(work)
        programs = {
            agent.GUEST_PATH: agent.build_agent(),
            "bin/tini": (work / "usr/bin/tini-static").read_bytes(),
            "bin/smolvmm-runas": agent.build_agent(RUNAS_SOURCE),
            "etc/smolvmm/stage2": STAGE2.encode(),
            UDHCPC_SCRIPT_PATH: udhcpc_script(BUSYBOX).encode(),
        }
        busybox.build(out, kernel, tools, [] if minimal else MODULES, INIT, programs)
        if built:
            shutil.copyfile(built.kernel, out / busybox.KERNEL)
        shutil.rmtree(work)

    name = "minimal-image-guest" if minimal else "image-guest"
    return cached_build(name, cache_key(inputs, [agent.SOURCE, RUNAS_SOURCE]), build)
