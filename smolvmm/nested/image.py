"""The nested machine's image: Debian's generic kernel (it has 9p) and an init that runs one job.

The init mounts the host root read-only over 9p, overlays a tmpfs on it so writes succeed and are
discarded, loads kvm_amd (nested SVM), runs the job chrooted into that root with its stdout, stderr
and exit status going to three virtio-serial ports, and powers off.
"""

from __future__ import annotations

from pathlib import Path

from smolvmm.images import busybox
from smolvmm.images.cache import cache_key, cached_build
from smolvmm.images.debian import Package, dependency_of

MODULES = ["virtio_pci", "9pnet_virtio", "9p", "virtio_console", "kvm_amd", "tun", "veth", "overlay"]

# Console lines the harness looks for.
FAILED = "smolvmm-nested: failed:"
PORTS = ("smolvmm.stdout", "smolvmm.stderr", "smolvmm.status")
HOSTROOT_TAG = "hostroot"
NINEP = "trans=virtio,version=9p2000.L,msize=512000"

_INIT_START = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=@PATH@
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() {
    echo "@FAILED@ $*"
    poweroff -f
}
@LOAD_MODULES@
load_modules
[ -c /dev/kvm ] || fail "@NO_KVM@"
for word in $(cat /proc/cmdline); do
    case "$word" in smolvmm.job=*) job="${word#smolvmm.job=}" ;; esac
done
"""

_INIT_FINISH = r"""for port in /sys/class/virtio-ports/*; do
    case "$(cat "$port/name")" in
        smolvmm.stdout) stdout="/dev/${port##*/}" ;;
        smolvmm.stderr) stderr="/dev/${port##*/}" ;;
        smolvmm.status) status="/dev/${port##*/}" ;;
    esac
done
[ -n "$stdout" ] && [ -n "$stderr" ] && [ -n "$status" ] || fail "virtio-serial ports missing"
env -i @RUN@ /run/smolvmm/job </dev/null >"$stdout" 2>"$stderr"
echo "$?" >"$status"
sync
poweroff -f
"""


def init_script(path: str, no_kvm: str, body: str, run: str) -> str:
    """A machine's /init for the harness's job protocol.

    It mounts the kernel filesystems, loads the listed modules, fails with ``no_kvm`` unless
    /dev/kvm exists and sets ``$job`` from the command line; then runs ``body`` (shell that mounts
    the host root, copies the job to /run/smolvmm/job and mounts the ``--out`` directories), and
    finally ``env -i <run> /run/smolvmm/job`` with its output on the three ports, and powers off.
    """
    replacements = {
        "@PATH@": path, "@NO_KVM@": no_kvm, "@RUN@": run, "@LOAD_MODULES@": busybox.LOAD_MODULES,
        "@FAILED@": FAILED, "@NINEP@": NINEP, "@HOSTROOT@": HOSTROOT_TAG,
    }
    script = _INIT_START + body + _INIT_FINISH
    for marker, value in replacements.items():
        script = script.replace(marker, value)
    return script


INIT = init_script("/bin", "kvm_amd did not give /dev/kvm (no nested SVM?)", r"""mkdir -p /lower /upper /newroot
mount -t 9p -o @NINEP@,ro,cache=loose @HOSTROOT@ /lower || fail "could not mount the host root over 9p"
mkdir -p /job && cp "/lower$job/"* /job/ || fail "job $job not readable through 9p"
mount -t tmpfs -o mode=0755 tmpfs /upper && mkdir /upper/data /upper/work
if ! mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot; then
    echo "smolvmm-nested: overlayfs over 9p failed; the root stays read-only"
    mount --bind /lower /newroot
    readonly=1
fi
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/run
[ -n "$readonly" ] && mount -t tmpfs tmpfs /newroot/tmp
mkdir -p /newroot/run/smolvmm && cp /job/job /newroot/run/smolvmm/job
[ -n "$readonly" ] && touch /newroot/run/smolvmm/readonly
while read -r tag path; do
    mkdir -p "/newroot$path" && mount -t 9p -o @NINEP@ "$tag" "/newroot$path" || fail "could not mount --out $path"
done < /job/mounts
# Put the new root over / and enter it as switch_root does: a job under a plain chroot may not
# create user namespaces (EPERM), which passt's sandbox (user networking) needs. The redirections
# to the ports still resolve in the initramfs, whose root this shell keeps.
cd /newroot && mount --move . / || fail "could not move the new root over /"
""", "chroot . /bin/sh")


def nested_image() -> tuple[Path, Path]:
    """(kernel, initrd) of the nested machine, built into the image cache on first use."""
    kernel = Package.candidate(dependency_of("linux-image-amd64", "linux-image-") + "-unsigned")
    tools = Package.candidate("busybox-static")
    key = cache_key([f"{kernel.name}={kernel.version}", f"{tools.name}={tools.version}"], [Path(__file__)])
    directory = cached_build("nested-machine", key, lambda out: busybox.build(out, kernel, tools, MODULES, INIT))
    return directory / busybox.KERNEL, directory / busybox.INITRD
