"""Least privilege for the monitor process, after it has opened what it needs (``--jail``).

Modelled on Firecracker's jailer, for a process that is already running: once the machine is
assembled (``/dev/kvm``, the VM and its vCPUs, guest RAM, the bundle, disks and overlays, TAP
devices, sockets are open) and before any vCPU thread exists, ``enter`` makes the process

1. keep no new privileges (``PR_SET_NO_NEW_PRIVS``),
2. enter new mount, IPC and UTS namespaces, and a new network namespace when it has no TAP
   device, and ``pivot_root`` into an empty read-only tmpfs: no host file is visible any more,
   but for the directories it may write (``Jail.writable``, bound as they are) and the staging
   directories of the files it is to produce (``Jail.outputs``, bound at their directory's path,
   and published by a keeper left outside, ``smolvmm.host.keeper``: see :func:`publish`),
3. limit its resources (``RLIMIT_NOFILE`` to the descriptors it holds plus a margin,
   ``RLIMIT_CORE`` 0, ``RLIMIT_AS`` to its size plus a margin),
4. drop every group and switch to an unprivileged uid and gid (all threads, via glibc),
5. load a seccomp filter (libseccomp, all threads) that allows only the calls the monitor was
   measured to make (``smolvmm.host.syscalls.ALLOWED_SYSCALLS``; ``clone`` only for threads),
   fails those an escape starts with (``execve``, ``ptrace``, mounts and namespaces, module
   loading, kexec, bpf, ...) with EPERM, and kills the process on any other call.

Then it checks that it holds (fail closed): the host's ``/etc`` is gone, ``execve`` and
``ptrace`` are refused. Like Firecracker's, the filter is a measured allow list; unlike it, one
list serves every thread (Python's threads share the interpreter's calls), and there is no PID
namespace: after ``unshare(CLONE_NEWPID)`` a process can
no longer create threads, and the monitor creates its vCPU threads afterwards (the monitor never
forks, and exec is refused).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import pkgutil
import pwd
import resource
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from smolvmm.errors import ConfigError, HypervisorError, SmolvmmError, UsageError
from smolvmm.host.ffi import declare
from smolvmm.host.keeper import Keeper, KeeperError
from smolvmm.host.syscalls import ALLOWED_SYSCALLS, ARGUMENT_RULES, DENIED_SYSCALLS, NOT_IMPLEMENTED

_ffi = declare(
    "jail",
    """
    int unshare(int flags);
    int mount(const char *source, const char *target, const char *fstype, unsigned long flags, const void *data);
    int umount2(const char *target, int flags);
    long syscall(long number, ...);
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5);

    typedef void *scmp_filter_ctx;
    scmp_filter_ctx seccomp_init(uint32_t def_action);
    int seccomp_rule_add(scmp_filter_ctx ctx, uint32_t action, int syscall, unsigned int arg_cnt, ...);
    struct scmp_arg_cmp { unsigned int arg; int op; uint64_t datum_a; uint64_t datum_b; };
    int seccomp_rule_add_array(scmp_filter_ctx ctx, uint32_t action, int syscall, unsigned int arg_cnt,
                               const struct scmp_arg_cmp *arg_array);
    int seccomp_attr_set(scmp_filter_ctx ctx, int attr, uint32_t value);
    int seccomp_load(scmp_filter_ctx ctx);
    void seccomp_release(scmp_filter_ctx ctx);
    int seccomp_syscall_resolve_name(const char *name);
    """,
)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155  # x86_64
SYS_PTRACE = 101  # x86_64
PR_SET_NO_NEW_PRIVS = 38
PTRACE_ATTACH = 16
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_CMP_MASKED_EQ = 7
SCMP_FLTATR_CTL_TSYNC = 4
FILE_MARGIN = 256
ADDRESS_SPACE_MARGIN = 4 << 30
DEFAULT_USER = "nobody"
# Where the empty root is built: a private tmpfs mounted over it in the new mount namespace.
JAIL_MOUNT = "/tmp"
_keeper: Keeper | None = None
"""The keeper of this process's jail outputs, once it has entered a jail that has some."""


# Imported before the host's files disappear, since the running monitor imports lazily: these
# packages whole (but their tests and plugins), and these modules of the standard library.
PRELOAD_PACKAGES = ("anyio", "smolvmm", "smolformat", "construct", "zstandard", "sniffio")
# trio, and anyio's backend for it, only in a process that has imported trio: a monitor driven on
# asyncio (the CLI's) never loads them, and they were half of the preload.
PRELOAD_TRIO_PACKAGES = ("trio", "outcome")
PRELOAD_TRIO_MODULES = ("anyio._backends._trio",)
PRELOAD_SKIP = (
    *("__main__", "tests", "_tests", "testing", "pytest_plugin", "_tools", "nested", "arm64", "_trio"),
    # what only runs before a jail, or in commands that never enter one: building images and
    # kernels, registries, signature checks
    *("images", "kernel", "build", "rootdisk", "source", "layers", "smolfile", "registry", "signing"),
    # commands whose module the CLI imports before anything can enter a jail, or that never enter
    # one (image's pulls in the image builder: 10 ms), and the format's test and benchmark data
    *("smolvmm.cli.image", "smolvmm.cli.demo", "smolvmm.cli.doctor", "smolvmm.cli.sign", "smolvmm.cli.cache"),
    *("smolvmm.cli.helper", "smolformat.samples", "smolformat.crafting"),
    # zstandard's cffi backend, which its package imports itself when asked to use it
    *("zstandard.backend_cffi", "zstandard._cffi"),
)
# Modules whose C extension is loaded (built) on first use, by their ``native_module()``: the snapshot
# writer's page scanner, virtio-blk's request loop, the vCPU loop's and the words it serves.
PRELOAD_NATIVE = (
    "smolformat.pagescan",
    "smolvmm.devices.virtio.blk_native",
    "smolvmm.hypervisor.kvm.vcpu",
    "smolvmm.host.words",
)
PRELOAD_MODULES = (
    "json",
    "traceback",
    "linecache",
    "tokenize",
    "encodings.idna",
    "concurrent.futures.thread",
    "asyncio",
    "selectors",
    "signal",
    "tempfile",
    "shutil",
    "ctypes",  # the bundle writer's sync_file_range
)


@dataclass(frozen=True)
class Jail:
    """How to confine the monitor: the unprivileged uid and gid it runs as, the host
    directories it may still write (bind-mounted at the same path; they must be writable by
    that uid), and the files it is to produce (absolute paths, e.g. where snapshots go:
    written in a staging directory of that uid's, then moved into place with :func:`publish`,
    whoever owns their directory)."""

    uid: int
    gid: int
    writable: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    discard: tuple[str, ...] = ()
    """Host files written before the jail, removed (from outside it) once the machine ends."""

    @staticmethod
    def preload() -> None:
        """Import now every module a jailed monitor may still load (what entering a jail does
        first): a process that forks monitors pays for it once."""
        _preload()

    @classmethod
    def parse(
        cls,
        spec: str | None,
        writable: tuple[str, ...] = (),
        outputs: tuple[str, ...] = (),
        discard: tuple[str, ...] = (),
    ) -> Jail:
        """``NAME``, ``UID`` or ``UID:GID`` (default: the ``nobody`` user, or 65534)."""
        if any(not os.path.isabs(path) for path in outputs):
            raise ConfigError(f"the jail's outputs must be absolute paths, not {outputs}")
        if not spec:
            try:
                entry = pwd.getpwnam(DEFAULT_USER)
                return cls(entry.pw_uid, entry.pw_gid, writable, outputs, discard)
            except KeyError:
                return cls(65534, 65534, writable, outputs, discard)
        uid_text, _, gid_text = spec.partition(":")
        try:
            if uid_text.isdigit():
                uid = int(uid_text)
                gid = int(gid_text) if gid_text else uid
            else:
                entry = pwd.getpwnam(uid_text)
                uid, gid = entry.pw_uid, int(gid_text) if gid_text else entry.pw_gid
        except (KeyError, ValueError):
            raise ConfigError(f"--jail-user {spec}: not a user name, UID or UID:GID") from None
        if uid == 0 or gid == 0:
            raise ConfigError(f"--jail-user {spec}: the jail drops root; give an unprivileged user")
        return cls(uid, gid, writable, outputs, discard)

    @staticmethod
    def keep(path: str | os.PathLike[str]) -> None:
        """Once this process is jailed: leave ``path``, one of its jail's discards, in place when
        the machine ends (a log that explains a failure). Nothing if not jailed with it."""
        keep(path)


@cache
def _libc() -> Any:
    return _ffi.dlopen(None)


@cache
def _libseccomp() -> Any:
    try:
        return _ffi.dlopen("libseccomp.so.2")
    except OSError as exc:
        raise HypervisorError(
            f"the jail (the default as root) needs libseccomp (Debian: libseccomp2), or --no-jail: {exc}"
        ) from None


def _check(result: int, what: str) -> None:
    if result < 0:
        err = _ffi.errno
        raise HypervisorError(f"cannot enter the jail: {what} failed: {os.strerror(err)}")


def _check_rc(result: int, what: str) -> None:
    """libseccomp returns a negative errno."""
    if result < 0:
        raise HypervisorError(f"cannot enter the jail: {what} failed: {os.strerror(-result)}")


def _long(value: int | bytes) -> Any:
    """A variadic argument of syscall(): a long, or a string's address."""
    return _ffi.new("char[]", value) if isinstance(value, bytes) else _ffi.cast("long", value)


def _errno(value: int) -> int:
    return 0x00050000 | value  # SCMP_ACT_ERRNO(value)


_filter: Any = None  # built once per process, by the preload: a forked monitor loads its parent's


def _seccomp_filter() -> Any:
    """The filter for every thread: ``ALLOWED_SYSCALLS`` pass (those of ``ARGUMENT_RULES`` only with
    that first argument), ``DENIED_SYSCALLS`` fail with EPERM, ``clone3`` with ENOSYS, and any
    other call kills the process (smolvmm.host.syscalls)."""
    global _filter
    if _filter is not None:
        return _filter
    seccomp = _libseccomp()
    ctx = seccomp.seccomp_init(SCMP_ACT_KILL_PROCESS)
    if ctx == _ffi.NULL:
        raise HypervisorError("cannot enter the jail: seccomp_init failed")
    conditional = {name: (mask, value) for name, mask, value in ARGUMENT_RULES}
    rules = [(name, SCMP_ACT_ALLOW) for name in ALLOWED_SYSCALLS]
    rules += [(name, _errno(errno.EPERM)) for name in DENIED_SYSCALLS]
    rules += [(name, _errno(errno.ENOSYS)) for name in NOT_IMPLEMENTED]
    for name, action in rules:
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            continue  # not a call on this architecture
        if name in conditional:
            first = _ffi.new("struct scmp_arg_cmp[1]", [(0, SCMP_CMP_MASKED_EQ, *conditional[name])])
            _check_rc(seccomp.seccomp_rule_add_array(ctx, action, number, 1, first), f"the rule for {name}")
        else:
            _check_rc(seccomp.seccomp_rule_add(ctx, action, number, 0), f"the rule for {name}")
    _check_rc(seccomp.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_TSYNC, 1), "seccomp thread sync")
    _filter = ctx
    return ctx


def _import_tree(name: str) -> None:
    """Import module ``name`` and, for a package, its modules, but those named in PRELOAD_SKIP (by
    their last name, or their dotted one) and what is below them (``pkgutil.walk_packages`` would
    import every package it passes)."""
    try:
        module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - another platform's module (trio's Windows parts)
        return
    for child in pkgutil.iter_modules(getattr(module, "__path__", [])):
        dotted = f"{name}.{child.name}"
        if child.name not in PRELOAD_SKIP and dotted not in PRELOAD_SKIP:
            _import_tree(dotted)


_preloaded = False  # once per process: walking the packages again lists their directories again
_preloaded_trio = False


def _preload() -> None:
    global _preloaded, _preloaded_trio
    if not _preloaded:
        for name in PRELOAD_MODULES:
            importlib.import_module(name)
        for package_name in PRELOAD_PACKAGES:
            _import_tree(package_name)
        for name in PRELOAD_NATIVE:
            importlib.import_module(name).native_module()
        with contextlib.suppress(HypervisorError):  # no libseccomp: entering the jail says so
            _seccomp_filter()
        _preloaded = True
    if not _preloaded_trio and "trio" in sys.modules:
        for package_name in PRELOAD_TRIO_PACKAGES:
            _import_tree(package_name)
        for name in PRELOAD_TRIO_MODULES:
            importlib.import_module(name)
        _preloaded_trio = True


def _open_fds() -> int:
    return max(int(fd) for fd in os.listdir("/proc/self/fd"))


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def enter(jail: Jail, *, network: bool) -> str:
    """Jail this process (see the module); ``network`` keeps the host's network namespace (a TAP
    device is in use). Returns one line describing the jail. Must run before any other thread."""
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise UsageError("cannot enter the jail: the monitor already runs other threads")
    _preload()
    libc = _libc()
    ctx = _seccomp_filter()
    global _keeper, _filter
    if jail.outputs or jail.discard:
        try:
            _keeper = Keeper(jail.outputs, jail.uid, jail.gid, jail.discard)
        except OSError as exc:
            raise HypervisorError(f"cannot enter the jail: staging its outputs failed: {exc}") from None
    bound = {directory: directory for directory in jail.writable} | (_keeper.staging if _keeper else {})
    highest_fd, size = _open_fds(), _vm_size()
    try:
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | (0 if network else CLONE_NEWNET)), "unshare")
        _check(libc.mount(b"none", b"/", _ffi.NULL, MS_REC | MS_PRIVATE, _ffi.NULL), "making mounts private")
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        _check(
            libc.mount(b"jail", JAIL_MOUNT.encode(), b"tmpfs", flags, _ffi.new("char[]", b"size=16k,mode=0755")),
            "mounting tmpfs",
        )
        os.mkdir(f"{JAIL_MOUNT}/old", 0o700)
        _check(
            libc.syscall(SYS_PIVOT_ROOT, _long(JAIL_MOUNT.encode()), _long(f"{JAIL_MOUNT}/old".encode())), "pivot_root"
        )
        os.chdir("/")
        for directory, source in bound.items():
            os.makedirs(directory, exist_ok=True)
            _check(
                libc.mount(f"/old{source}".encode(), directory.encode(), _ffi.NULL, MS_BIND | MS_REC, _ffi.NULL),
                f"binding {directory}",
            )
        _check(libc.umount2(b"/old", MNT_DETACH), "detaching the host's root")
        os.rmdir("/old")
        _check(libc.mount(b"none", b"/", _ffi.NULL, MS_REMOUNT | MS_RDONLY | flags, _ffi.NULL), "read-only root")
        files = highest_fd + FILE_MARGIN
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_AS, (size + ADDRESS_SPACE_MARGIN, size + ADDRESS_SPACE_MARGIN))
        os.setgroups([])
        os.setresgid(jail.gid, jail.gid, jail.gid)
        os.setresuid(jail.uid, jail.uid, jail.uid)
        _check_rc(_libseccomp().seccomp_load(ctx), "loading the seccomp filter")
    finally:
        _filter = None  # loaded or refused, this copy is done with
        _libseccomp().seccomp_release(ctx)
    _prove()
    if bound:  # temporary files (a snapshot's scratch disks) go where the jail may write
        tempfile.tempdir = next(iter(bound))
    return (
        f"jailed: uid {jail.uid} gid {jail.gid}, read-only root holding {list(bound)},"
        f" {'host' if network else 'no'} network,"
        f" seccomp allows {len(ALLOWED_SYSCALLS)} calls, at most {files} files"
    )


def publish(path: str | os.PathLike[str]) -> None:
    """Move ``path``, one of the jail's outputs that the monitor has just written, into place
    (outside the jail, by its keeper); nothing if this process is not jailed with that output.
    SmolvmmError if the keeper cannot."""
    path = os.fspath(path)
    if _keeper is not None and path in _keeper.outputs:
        _ask_keeper(_keeper.publish, path)


def keep(path: str | os.PathLike[str]) -> None:
    """Leave ``path``, one of the jail's discards, in place when the machine ends (a log that
    explains a failure); nothing if this process is not jailed with it. SmolvmmError if the
    keeper cannot be asked."""
    if _keeper is not None:
        _ask_keeper(_keeper.keep, os.fspath(path))


def _ask_keeper(request: Callable[[str], None], path: str) -> None:
    try:
        request(path)
    except (KeeperError, OSError) as exc:
        raise SmolvmmError(str(exc)) from None


def leave() -> None:
    """Once the jailed machine has ended: let the keeper remove what the jail did not publish."""
    global _keeper
    if _keeper is not None:
        _keeper.close()
        _keeper = None


def _prove() -> None:
    """Fail closed: the jail must hide the host's files and refuse exec and ptrace."""
    if os.path.exists("/etc") or os.path.exists("/proc/self"):
        raise HypervisorError("the jail still shows the host's files")
    try:
        os.execv("/", ["/"])
    except OSError as exc:
        if exc.errno != errno.EPERM:
            raise HypervisorError(f"the jail lets execve through ({exc.strerror})") from None
    if _libc().syscall(SYS_PTRACE, *map(_long, (PTRACE_ATTACH, 0x3FFF_FFFF, 0, 0))) != -1 or _ffi.errno != errno.EPERM:
        raise HypervisorError("the jail lets ptrace through")
