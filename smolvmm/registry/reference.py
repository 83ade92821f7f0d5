"""Registry references: ``REGISTRY/REPO:TAG`` or ``REGISTRY/REPO@sha256:HEX``, parsed in one place."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from smolvmm.errors import ConfigError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?")
MAX_REFERENCE = 4096


def is_digest(value: str) -> bool:
    """Whether ``value`` is a ``sha256:`` digest of 64 lowercase hex digits."""
    return _DIGEST.fullmatch(value) is not None


@dataclass(frozen=True)
class Reference:
    """A parsed reference: the registry (host[:port]), the repository, and a tag or a digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse ``REGISTRY/REPO[:TAG][@sha256:HEX]`` (no tag and no digest means ``:latest``)."""
        bad = f"bad reference {text[:200]!r}: expected REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:HEX"
        if len(text) > MAX_REFERENCE or "/" not in text:
            raise ConfigError(bad)
        registry, _, rest = text.partition("/")
        if not _HOST.fullmatch(registry) or not ("." in registry or ":" in registry or registry == "localhost"):
            raise ConfigError(bad + " (the registry's host name comes first)")
        name, _, digest = rest.partition("@")
        tag = None
        if ":" in name:
            name, _, tag = name.rpartition(":")
            if not _TAG.fullmatch(tag):
                raise ConfigError(f"{bad} (bad tag {tag[:140]!r})")
        if not _REPOSITORY.fullmatch(name) or len(name) > 255:
            raise ConfigError(f"{bad} (repository names are lowercase, e.g. team/app)")
        if digest and not is_digest(digest):
            raise ConfigError(f"{bad} (bad digest {digest[:80]!r})")
        return cls(registry, name, tag if tag or digest else "latest", digest or None)

    @property
    def manifest_reference(self) -> str:
        """What goes after ``/manifests/``: the digest if there is one, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def is_loopback(self) -> bool:
        """Whether the registry is on this machine (plain HTTP is allowed there)."""
        host = self.registry.rsplit(":", 1)[0] if not self.registry.startswith("[") else self.registry[1:].split("]")[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def with_digest(self, digest: str) -> Reference:
        """The same repository at ``digest``."""
        return Reference(self.registry, self.repository, None, digest)

    def __str__(self) -> str:
        tail = f":{self.tag}" if self.tag else ""
        return f"{self.registry}/{self.repository}{tail}" + (f"@{self.digest}" if self.digest else "")
