"""One exception hierarchy: each class has one exact meaning.

A user sees ``str(exc)`` as one line; a developer sees the chain (``raise ... from``).
"""


class SmolvmmError(Exception):
    """Base of every error smolvmm raises on purpose."""


class ConfigError(SmolvmmError):
    """The machine configuration or a command-line value is invalid."""


class HypervisorError(SmolvmmError):
    """The hypervisor (KVM) refused an operation or is unusable on this host."""


class GuestError(SmolvmmError):
    """The guest did something the monitor cannot continue from (e.g. a KVM internal error)."""


class GuestTimeout(GuestError, TimeoutError):
    """The guest did not show what was awaited (e.g. a console pattern) in time."""


class GuestMemoryError(GuestError):
    """A guest-physical access fell outside guest RAM."""


class BundleError(SmolvmmError):
    """A .smolmachine bundle is malformed, unsupported or incompatible with this host."""


class ImageError(SmolvmmError):
    """A kernel, initrd or disk image is missing or invalid, or could not be built."""


class RegistryError(SmolvmmError):
    """A registry refused or failed a push or pull, or sent something that does not check out."""
