"""The nested machine's image: Debian's generic kernel (it has 9p) and an init that runs one job.

The init loads kvm_amd (nested SVM), starts the heartbeat (a line on its own virtio-serial port every
second, see ``watchdog``), mounts the host root read-only over 9p, overlays a tmpfs on it so writes
succeed and are discarded, runs the job chrooted into that root with its stdout, stderr and exit
status going to three more virtio-serial ports, and powers off.
"""

from __future__ import annotations

from pathlib import Path

from smolvmm.images import busybox
from smolvmm.images.cache import cache_key, cached_build
from smolvmm.images.debian import Package, dependency_of

MODULES = ["virtio_pci", "9pnet_virtio", "9p", "virtio_console", "kvm_amd", "tun", "vhost_net", "veth", "overlay"]

# Console lines the harness looks for.
FAILED = "smolvmm-nested: failed:"
HEARTBEAT = "smolvmm.heartbeat"
PORTS = ("smolvmm.stdout", "smolvmm.stderr", "smolvmm.status", HEARTBEAT)
HOSTROOT_TAG = "hostroot"
END_OF_STREAM = b"\x1esmolvmm-nested: end of stream\x1e"
"""What the init writes on the stdout and stderr ports after the job: the host answers on the status
port once it has both, and only then does the machine power off."""
ACTIVITY_PATH = "/run/smolvmm/activity"
"""Where, inside the machine, a job writes what it is doing: each heartbeat carries the first line."""
INIT_SOURCE = Path(__file__)
"""This module, whose text makes up the machines' init: the image cache keys cover it."""
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
for attempt in $(seq 100); do  # the ports may appear a moment after the modules load (arm64)
    for port in /sys/class/virtio-ports/*; do
        case "$(cat "$port/name" 2>/dev/null)" in
            smolvmm.stdout) stdout="/dev/${port##*/}" ;;
            smolvmm.stderr) stderr="/dev/${port##*/}" ;;
            smolvmm.status) status="/dev/${port##*/}" ;;
            @HEARTBEAT@) heartbeat="/dev/${port##*/}" ;;
        esac
    done
    [ -n "$stdout" ] && [ -n "$stderr" ] && [ -n "$status" ] && [ -n "$heartbeat" ] && break
    sleep 0.1
done
[ -n "$heartbeat" ] && [ -c "$stdout" ] && [ -c "$stderr" ] && [ -c "$status" ] && [ -c "$heartbeat" ] \
    || fail "virtio-serial ports missing"
beat() {
    while :; do
        activity=
        read -r activity 2>/dev/null <"$1"
        echo "beat $activity"
        sleep 1
    done
}
beat "@JOBROOT@@ACTIVITY@" >"$heartbeat" 2>/dev/null &
echo -1000 >"/proc/$!/oom_score_adj"
[ -c /dev/kvm ] || fail "@NO_KVM@"
for word in $(cat /proc/cmdline); do
    case "$word" in smolvmm.job=*) job="${word#smolvmm.job=}" ;; esac
done
"""

# The job writes into pipes that cat copies to the ports: a port takes at most 32 KiB a write, and
# a program that ignores a short write (Python's text streams with PYTHONUNBUFFERED) lost the rest.
_INIT_FINISH = r"""{ { env -i @RUN@ /run/smolvmm/job </dev/null; echo "$?" >/run/smolvmm/status; } 2>&1 1>&3 \
    | cat >"$stderr"; } 3>&1 | cat >"$stdout"
cat /run/smolvmm/status >"$status"
printf '@END@' >"$stdout"
printf '@END@' >"$stderr"
sync
read -r -t 60 ack <"$status"  # the host has every byte of both streams (a port drops what QEMU still holds)
poweroff -f
"""


def init_script(path: str, no_kvm: str, body: str, run: str, job_root: str = "") -> str:
    """A machine's /init for the harness's job protocol.

    It mounts the kernel filesystems, loads the listed modules, starts the heartbeat (reporting the
    job's activity file, which it finds under ``job_root``), fails with ``no_kvm`` unless /dev/kvm
    exists and sets ``$job`` from the command line; then runs ``body`` (shell that mounts the host
    root, copies the job to /run/smolvmm/job and mounts the ``--out`` directories), and finally
    ``env -i <run> /run/smolvmm/job`` with its output on the ports, and powers off.
    """
    replacements = {
        "@PATH@": path,
        "@NO_KVM@": no_kvm,
        "@RUN@": run,
        "@LOAD_MODULES@": busybox.LOAD_MODULES,
        "@FAILED@": FAILED,
        "@NINEP@": NINEP,
        "@HOSTROOT@": HOSTROOT_TAG,
        "@HEARTBEAT@": HEARTBEAT,
        "@JOBROOT@": job_root,
        "@END@": "".join(f"\\{byte:03o}" if byte < 32 else chr(byte) for byte in END_OF_STREAM),
        "@ACTIVITY@": ACTIVITY_PATH,
    }
    script = _INIT_START + body + _INIT_FINISH
    for marker, value in replacements.items():
        script = script.replace(marker, value)
    return script


INIT = init_script(
    "/bin",
    "kvm_amd did not give /dev/kvm (no nested SVM?)",
    r"""mkdir -p /lower /upper /newroot
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
# create user namespaces (EPERM), which passt's sandbox (user networking) needs. This shell and the
# heartbeat keep the initramfs as their root: the redirections to the ports still resolve there,
# and the job's /run is bound at the initramfs's /run for the heartbeat to read the activity.
mkdir -p /run && mount --bind /newroot/run /run || fail "could not bind the job's /run"
cd /newroot && mount --move . / || fail "could not move the new root over /"
""",
    "chroot . /bin/sh",
)


def nested_image() -> tuple[Path, Path]:
    """(kernel, initrd) of the nested machine, built into the image cache on first use."""
    kernel = Package.candidate(dependency_of("linux-image-amd64", "linux-image-") + "-unsigned")
    tools = Package.candidate("busybox-static")
    key = cache_key([f"{kernel.name}={kernel.version}", f"{tools.name}={tools.version}"], [INIT_SOURCE])
    directory = cached_build("nested-machine", key, lambda out: busybox.build(out, kernel, tools, MODULES, INIT))
    return directory / busybox.KERNEL, directory / busybox.INITRD
