"""The local content store under ``${XDG_CACHE_HOME:-~/.cache}/smolvmm/oci``.

``blobs/sha256/HEX``: blobs whose digest was checked as they arrived, renamed into place whole, so
a killed pull keeps every blob it finished and loses only the ones in flight (``.HEX.PID.part``,
removed by the next store user once PID is gone). ``bundles/HEX.smolmachine``: bundles assembled
for ``run REF``, by manifest digest. ``repositories.json``: per registry, the repository last used,
a source for cross-repository mounts.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import RegistryError
from ..images.cache import cache_root


def disk_error(exc: OSError, path: Path | str) -> RegistryError:
    """An OSError while writing ``path`` as one line."""
    return RegistryError(f"cannot write {path}: {exc.strerror or exc}")


class BlobStore:
    """Blobs by digest, plus assembled bundles; ``root`` defaults to the cache's ``oci`` directory."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root() / "oci"
        self.blobs = self.root / "blobs" / "sha256"
        self.bundles = self.root / "bundles"
        try:
            self.blobs.mkdir(parents=True, exist_ok=True)
            self.bundles.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise disk_error(exc, self.root) from None
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        for part in self.blobs.glob(".*.part"):
            pid = part.name.rsplit(".", 2)[-2]
            if pid.isdigit() and not _alive(int(pid)):
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
        part = final.with_name(f".{final.name}.{os.getpid()}.part")
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

    def _repositories_file(self) -> Path:
        return self.root / "repositories.json"

    def last_repository(self, registry: str) -> str | None:
        """The repository of ``registry`` used last, if any."""
        try:
            value = json.loads(self._repositories_file().read_text()).get(registry)
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    def remember_repository(self, registry: str, repository: str) -> None:
        """Note ``repository`` as the last one used on ``registry`` (best effort: a cache)."""
        path = self._repositories_file()
        try:
            known = json.loads(path.read_text())
            known = known if isinstance(known, dict) else {}
        except (OSError, ValueError):
            known = {}
        known[registry] = repository
        with contextlib.suppress(OSError):
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".repositories.", suffix=".tmp")
            with os.fdopen(fd, "w") as file:
                json.dump(known, file)
            os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
