"""Files a user names: opened only if they are regular files, replaced only where one is.

A FIFO opened for reading waits for a writer, and ``/dev/zero`` never ends; a rename over
``/dev/null`` replaces the device. Each is refused here as an ``OSError`` whose ``strerror`` says
why, the way a missing file is, so the caller's one-line message covers them too.
"""

from __future__ import annotations

import errno
import os
import stat

NOT_REGULAR = "not a regular file"


def open_regular(path: str | os.PathLike[str]) -> int:
    """``path`` opened for reading; a FIFO, device, socket or directory raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO would block without a writer
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, NOT_REGULAR, os.fspath(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike[str], limit: int) -> bytes:
    """The whole of the regular file ``path``, if it holds at most ``limit`` bytes (else OSError)."""
    fd = open_regular(path)
    try:
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(path))
    return data


def check_replaceable(target: str | os.PathLike[str]) -> None:
    """Refuse a new file at ``target`` where something other than a regular file is (a device, a
    FIFO, a socket, a directory): renaming over it would replace it."""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise OSError(errno.EEXIST, f"it exists and is {NOT_REGULAR}", os.fspath(target))


def new_file_mode() -> int:
    """The mode a new file gets from ``open`` (0666 less the umask): ``mkstemp`` gives 0600, which
    would keep a written bundle or a copied file from being shared as a user expects."""
    try:
        with open("/proc/self/status", "rb") as status:  # no umask(0) round trip, which other threads would see
            umask = next(int(line.split()[1], 8) for line in status if line.startswith(b"Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask
