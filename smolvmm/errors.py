"""One exception hierarchy: each class has one exact meaning.

A user sees ``str(exc)`` as one line; a developer sees the chain (``raise ... from``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def unwrapped_errors() -> Iterator[None]:
    """Re-raise the one error of an exception group as itself (a task group wraps even one)."""
    try:
        yield
    except BaseExceptionGroup as group:
        while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
            group = group.exceptions[0]
        if isinstance(group, BaseExceptionGroup):
            raise
        raise group from group.__cause__


class SmolvmmError(Exception):
    """Base of every error smolvmm raises on purpose."""


class ConfigError(SmolvmmError):
    """A machine configuration, an argument or a command-line value is invalid, or asks for what cannot be."""

    def naming(self, names: dict[str, str]) -> ConfigError:
        """This error with the configuration fields it names (``MachineConfig.vcpus``,
        ``MachineConfig.disks[0].path``, ``ImageRecipe.env``) called as ``names`` says: the flag or
        the key the user wrote."""
        return ConfigError(_FIELD.sub(lambda m: names.get(m[0].split("[")[0], m[0]), str(self)))


_FIELD = re.compile(r"\b(?:\w+Config|ImageRecipe)\.\w+(?:\[\d+\]\.path)?")


class UsageError(SmolvmmError, RuntimeError):
    """The API was called where or when it cannot work (e.g. a first machine started off the main
    thread, a jail entered while other threads run): a bug in the calling program."""


class HypervisorError(SmolvmmError):
    """The hypervisor (KVM) refused an operation or is unusable on this host, or the host could not
    confine the monitor in the jail it asked for."""


class GuestError(SmolvmmError):
    """The guest did something the monitor cannot continue from (e.g. a KVM internal error)."""


class GuestTimeout(GuestError, TimeoutError):
    """The guest did not show what was awaited (e.g. a console pattern, an exec's exit) in time."""


class AgentError(GuestError):
    """The guest agent is unreachable or broke its protocol; the machine's agent calls fail."""


class AgentTooOld(AgentError):
    """The guest's agent predates protocol 2 (exec, files): its bundle must be rebuilt."""


class GuestFileError(GuestError):
    """A file operation failed inside the guest; the message is the guest's (path: reason)."""


class OutputLimitError(GuestError):
    """A command's output or a file read went past the caller's byte limit and was refused."""


class GuestMemoryError(GuestError):
    """A guest-physical access (e.g. a device's descriptor address) fell outside guest RAM."""


class BundleError(SmolvmmError):
    """A .smolmachine bundle is malformed, unsupported or incompatible with this host."""


class ImageError(SmolvmmError):
    """A kernel, initrd or disk image is missing or invalid, or could not be built."""


class RegistryError(SmolvmmError):
    """A registry refused or failed a push or pull, or sent something that does not check out."""
