"""The jailed monitor's system calls, in one place: the seccomp filter of ``smolvmm.host.jail``
allows ``ALLOWED_SYSCALLS`` (those of ``ARGUMENT_RULES`` only with that first argument), refuses
``DENIED_SYSCALLS`` with EPERM, answers ``NOT_IMPLEMENTED`` with ENOSYS and kills the process on
any other call.

``MEASURED`` is what ``strace -f`` saw a jailed monitor call once its filter was loaded (boot,
snapshot from the jail, stop; trio and asyncio), completed by ``tools/jail-syscalls``, which runs
a jailed monitor through a machine's life in the nested machine (boot and restore, on trio and
asyncio and through the CLI: console, exec with stdin, file upload and download, user
networking, pause, snapshot, stop) with the filter logging instead of killing, and prints every
call the lists lack. ``MARGIN`` names calls the same code makes on paths that run seldom
(signals, errors, timeouts) and a measurement may miss. Rerun the tool after changing what the
monitor does once jailed.
"""

from __future__ import annotations

MEASURED = (
    "clone",  # see ARGUMENT_RULES
    "close",
    "epoll_ctl",
    "epoll_wait",
    "exit",
    "exit_group",
    "fchmod",
    "fcntl",
    "fsync",
    "ftruncate",
    "futex",
    "getdents64",
    "getgid",
    "getpid",
    "getppid",
    "getrandom",
    "gettid",
    "getuid",
    "ioctl",
    "lseek",
    "madvise",
    "mkdir",
    "mmap",
    "mprotect",
    "munmap",
    "newfstatat",
    "openat",
    "prctl",  # see ARGUMENT_RULES
    "pwrite64",
    "pwritev2",
    "read",
    "recvfrom",
    "rename",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sendto",
    "set_robust_list",
    "sync_file_range",
    "tgkill",
    "umask",
    "wait4",  # reaping passt (tools/jail-syscalls)
    "write",
)
"""The measured calls (x86_64; Python 3.11, glibc 2.36)."""

MARGIN = (
    "restart_syscall",  # the kernel's, resuming a call a signal interrupted
    "sched_yield",
    "nanosleep",
    "clock_nanosleep",  # time.sleep
    "clock_gettime",  # outside the vDSO's clocks
    "gettimeofday",
    "brk",
    "mremap",  # malloc growing a large block
    "sigaltstack",  # faulthandler, on a crash report
    "kill",
    "getcwd",
    "readlink",
    "lstat",
    "statx",
    "fstat",
    "dup",
    "dup3",
    "unlink",
    "unlinkat",  # removing a stale temporary file, a snapshot's scratch directory
    "fdatasync",
    "pread64",
    "preadv2",
    "readv",
    "writev",
    "pwritev",
    "sendmsg",
    "recvmsg",
    "shutdown",
    "accept4",  # a detached machine's console and control listeners, made before the jail
    "getsockname",
    "getpeername",
    "getsockopt",
    "setsockopt",
    "poll",
    "ppoll",
    "epoll_pwait",
    "eventfd2",
    "pipe2",
    "fallocate",
    "sysinfo",
    "sched_getaffinity",
    "uname",
)
"""Calls on the same paths that the measurement may not meet (see the module)."""

ALLOWED_SYSCALLS = tuple(sorted({*MEASURED, *MARGIN}))
CLONE_THREAD = 0x00010000
PR_SET_NAME = 15
ARGUMENT_RULES = (
    ("clone", CLONE_THREAD, CLONE_THREAD),  # threads only, never a new process
    ("prctl", 0xFFFF_FFFF, PR_SET_NAME),  # naming a thread (trio's thread cache), nothing else
)
"""Calls allowed only when their first argument, masked, has a value: (name, mask, value)."""
NOT_IMPLEMENTED = ("clone3",)  # its flags are out of a filter's reach; ENOSYS makes glibc use clone

DENIED_SYSCALLS = (
    "execve",
    "execveat",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "open_by_handle_at",
    "name_to_handle_at",
    "fanotify_init",
    "quotactl",
    "swapon",
    "swapoff",
    "acct",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "personality",
    "syslog",
    "iopl",
    "ioperm",
    "keyctl",
    "add_key",
    "request_key",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
)
"""Calls refused with EPERM rather than killed: the ones an escape would start with, so that the
jail can prove it refuses them (``jail._prove``) and a stray attempt is an error, not a crash."""
