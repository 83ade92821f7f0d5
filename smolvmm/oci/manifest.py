"""OCI image documents, as every image source reads them: descriptors, indexes and manifests
(untrusted JSON, size-capped, checked field by field) and the resolved ``Image`` with its ``Layer``s.

``source`` resolves local sources (an OCI layout, a docker archive, a root filesystem) to these,
``registry`` an image pulled through the distribution API.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from smolvmm.errors import ImageError
from smolvmm.oci.imageconfig import PLATFORM, ImageConfig

MAX_DOCUMENT = 4 << 20  # manifests, indexes and configs
MAX_LAYERS = 256
INDEX_TYPES = {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"}
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about a blob."""

    media_type: str
    digest: str
    size: int
    platform: tuple[str, str] | None = None

    @classmethod
    def parse(cls, where: str, value: Any) -> Descriptor:
        if not isinstance(value, dict):
            raise ImageError(f"{where} is not a JSON object")
        digest, size, media = value.get("digest"), value.get("size"), value.get("mediaType", "")
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise ImageError(f"{where} has digest {str(digest)[:80]!r}, expected sha256:<64 hex digits>")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{where} has size {size!r}, expected a non-negative integer")
        if not isinstance(media, str):
            raise ImageError(f"{where} has a mediaType that is not a string")
        platform = value.get("platform")
        pair = (str(platform.get("os")), str(platform.get("architecture"))) if isinstance(platform, dict) else None
        return cls(media, digest, size, pair)


@dataclass(frozen=True)
class Layer:
    """One layer: ``open()`` gives its tar stream (maybe compressed); ``diff_id``, the image
    config's digest of the uncompressed stream, is checked as the layer is unpacked (for a docker
    archive, whose blobs have no other digest, it is the only check)."""

    name: str
    size: int
    open: Callable[[], IO[bytes]]
    diff_id: str | None = None


def file_opener(path: Path) -> Callable[[], IO[bytes]]:
    """A layer's ``open``: the file at ``path``, opened afresh at each call."""
    return lambda: open(path, "rb")


@dataclass(frozen=True)
class Image:
    """A resolved image: what to unpack, in order, and how to run it; ``key`` identifies its content."""

    key: str
    config: ImageConfig
    layers: tuple[Layer, ...] = ()
    directory: Path | None = None  # rootfs:DIR: the tree itself, used as it is


def load_json(where: str, data: bytes) -> Any:
    """A JSON document from untrusted bytes, capped at MAX_DOCUMENT."""
    if len(data) > MAX_DOCUMENT:
        raise ImageError(f"{where} is larger than {MAX_DOCUMENT >> 20} MiB")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{where} is not valid JSON: {exc}") from None


def check_digest(where: str, data: bytes, digest: str) -> None:
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise ImageError(f"{where} does not match its digest {digest}")


def pick_manifest(where: str, index: Any, tag: str | None = None) -> Descriptor:
    """The manifest for linux/amd64 (and ``tag``, for an OCI layout's index) in an index document."""
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or len(manifests) > 4096:
        raise ImageError(f"{where} has no list of manifests")
    candidates = []
    for number, entry in enumerate(manifests):
        descriptor = Descriptor.parse(f"{where} manifest {number}", entry)
        annotations = entry.get("annotations") if isinstance(entry.get("annotations"), dict) else {}
        if tag is not None and annotations.get("org.opencontainers.image.ref.name") != tag:
            continue
        candidates.append(descriptor)
    if tag is not None and not candidates:
        raise ImageError(f"{where} has no image tagged {tag!r}")
    if len(candidates) == 1 and candidates[0].platform is None:
        return candidates[0]
    for descriptor in candidates:
        if descriptor.platform in (PLATFORM, None) and descriptor.media_type not in INDEX_TYPES:
            return descriptor
    found = ", ".join(sorted({"/".join(d.platform) for d in candidates if d.platform})) or "none"
    raise ImageError(f"{where} has no linux/amd64 image (platforms: {found})")


def parse_manifest(where: str, manifest: Any) -> tuple[Descriptor, list[Descriptor]]:
    """(config, layers) of an image manifest."""
    if not isinstance(manifest, dict) or manifest.get("schemaVersion") != 2:
        raise ImageError(f"{where} is not a schema 2 image manifest")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise ImageError(f"{where} has no list of layers (or more than {MAX_LAYERS})")
    config = Descriptor.parse(f"{where} config", manifest.get("config"))
    return config, [Descriptor.parse(f"{where} layer {number}", layer) for number, layer in enumerate(layers)]


def diff_ids(where: str, config: Any, count: int) -> list[str]:
    """The image config's ``rootfs.diff_ids``: one sha256 digest for each of the ``count`` layers
    (the digest of its uncompressed tar, checked as the layer is unpacked)."""
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if (
        not isinstance(ids, list)
        or len(ids) != count
        or not all(isinstance(i, str) and DIGEST.fullmatch(i) for i in ids)
    ):
        raise ImageError(f"{where}: the config's rootfs.diff_ids do not list one sha256 digest per layer")
    return list(ids)
