"""The local content store under ``${XDG_CACHE_HOME:-~/.cache}/smolvmm/oci``.

``blobs/sha256/HEX``: blobs whose digest was checked as they arrived, renamed into place whole, so
a killed pull keeps every blob it finished and loses only the ones in flight (``.HEX.PID.part``,
removed by the next store user once PID is gone). ``bundles/HEX.smolmachine``: bundles assembled
for ``run REF``, by manifest digest. ``pages/HEX``: the page hashes of raw chunks pushed (or
pulled, made when first needed), which a later push's patches match against. ``repositories.json``: per registry, the repository
last used (a source for cross-repository mounts), and per repository the manifest moved last (the
base of the next push's patches).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from smolformat.tempnames import owned_prefix, running
from smolvmm.config import cache_root
from smolvmm.errors import RegistryError
from smolvmm.registry.artifact import PAGE, page_hashes


def disk_error(exc: OSError, path: Path | str) -> RegistryError:
    """An OSError while writing ``path`` as one line."""
    return RegistryError(f"cannot write {path}: {exc.strerror or exc}")


class BlobStore:
    """Blobs by digest, plus assembled bundles; ``root`` defaults to the cache's ``oci`` directory."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root() / "oci"
        self.blobs = self.root / "blobs" / "sha256"
        self.bundles = self.root / "bundles"
        self.pages = self.root / "pages"
        try:
            for directory in (self.blobs, self.bundles, self.pages):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise disk_error(exc, self.root) from None
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        for part in self.blobs.glob(".*.part"):
            pid = part.name.rsplit(".", 2)[-2]
            if pid.isdigit() and not running(int(pid)):
                part.unlink(missing_ok=True)

    def path(self, digest: str) -> Path:
        """Where blob ``digest`` lives (whether or not it is there)."""
        return self.blobs / digest.removeprefix("sha256:")

    def has(self, digest: str, size: int) -> bool:
        """Whether the store holds ``digest`` (of ``size`` bytes)."""
        try:
            return self.path(digest).stat().st_size == size
        except FileNotFoundError:
            return False

    @contextlib.contextmanager
    def writing(self, digest: str) -> Iterator[BinaryIO]:
        """A file for blob ``digest``, renamed into place when the block ends without an error."""
        final = self.path(digest)
        part = final.with_name(owned_prefix(f".{final.name}") + "part")
        try:
            with open(part, "wb") as file:
                yield file
            os.replace(part, final)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise disk_error(exc, part) from None
        except BaseException:
            part.unlink(missing_ok=True)
            raise

    def bundle_path(self, manifest_digest: str) -> Path:
        """Where ``run REF`` keeps the bundle assembled from manifest ``manifest_digest``."""
        return self.bundles / (manifest_digest.removeprefix("sha256:") + ".smolmachine")

    def save_pages(self, digest: str, hashes: list[bytes]) -> None:
        """Keep the page hashes of raw chunk ``digest`` (a later push patches against them)."""
        path = self.pages / digest.removeprefix("sha256:")
        if not path.exists():
            with contextlib.suppress(OSError):
                _write_atomically(path, b"".join(hashes))

    def page_hashes(self, digest: str, size: int) -> list[bytes] | None:
        """The page hashes of chunk ``digest``: kept when it was pushed, or made from the blob when
        it was pulled; None when this store never saw it."""
        try:
            data = (self.pages / digest.removeprefix("sha256:")).read_bytes()
        except OSError:
            if not self.has(digest, size) or size % PAGE:
                return None
            hashes = page_hashes(self.path(digest).read_bytes())
            self.save_pages(digest, hashes)
            return hashes
        return [data[at : at + 16] for at in range(0, len(data), 16)]

    def _known(self) -> dict[str, Any]:
        try:
            known = json.loads((self.root / "repositories.json").read_text())
        except (OSError, ValueError):
            return {}
        return known if isinstance(known, dict) else {}

    def last_repository(self, registry: str) -> str | None:
        """The repository of ``registry`` used last, if any."""
        value = (self._known().get("last") or {}).get(registry)
        return value if isinstance(value, str) else None

    def last_manifest(self, registry: str, repository: str) -> str | None:
        """The digest of the manifest pushed to or pulled from ``registry/repository`` last, if any."""
        value = (self._known().get("manifests") or {}).get(f"{registry}/{repository}")
        return value if isinstance(value, str) else None

    def remember(self, registry: str, repository: str, manifest: str) -> None:
        """Note ``manifest`` as the last one moved through ``registry/repository`` (best effort: a cache)."""
        known = self._known()
        known.setdefault("last", {})[registry] = repository
        known.setdefault("manifests", {})[f"{registry}/{repository}"] = manifest
        with contextlib.suppress(OSError):
            _write_atomically(self.root / "repositories.json", json.dumps(known).encode())


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
