"""The OCI artifact of a bundle (spec/registry.md): how a bundle file is cut into a state layer and
chunks, the manifest and config that describe it, and the checks a pulled manifest must pass.

Everything here is pure: a plan is made from an open ``smolformat.Bundle``; manifests and configs
from a registry are parsed and bounded here, in one place, before anything is fetched.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import smolformat
from smolformat.layout import Encoding, SectionKind

from ..errors import RegistryError
from .reference import is_digest

ARTIFACT_TYPE = "application/vnd.smolvmm.machine.v1"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.smolvmm.machine.config.v1+json"
STATE_TYPE = "application/vnd.smolvmm.machine.state.v1"
CHUNK_TYPE = "application/vnd.smolvmm.machine.chunk.v1"
OFFSET_KEY = "dev.smolvmm.offset"
SECTION_KEY = "dev.smolvmm.section"

WINDOW = 2 << 20  # guest-address window that cuts RAM and disks
BLOB_CUT = 4 << 20  # kernel, initrd and oversized pieces are cut every this many bytes
OVERSIZED = 8 << 20
MAX_CHUNK = 16 << 20
MAX_MANIFEST = 4 << 20
MAX_CONFIG = 1 << 20
MAX_LAYERS = 65536
MAX_STATE = 1 << 30  # the state layer holds STRUCT sections and indexes: megabytes, not gigabytes
_SMALL_UNKNOWN = 1 << 20


@dataclass(frozen=True)
class Chunk:
    """``size`` bytes of the bundle file at ``offset``; ``section`` says what they hold."""

    offset: int
    size: int
    section: str


@dataclass(frozen=True)
class Plan:
    """How one bundle file is cut: chunks in file order; the state layer is everything else."""

    file_size: int
    chunks: tuple[Chunk, ...]
    facts: dict[str, Any]

    def state_ranges(self) -> list[tuple[int, int]]:
        """The ``(offset, size)`` ranges of the file that form the state layer, in file order."""
        ranges, at = [], 0
        for chunk in self.chunks:
            if chunk.offset > at:
                ranges.append((at, chunk.offset - at))
            at = chunk.offset + chunk.size
        if at < self.file_size:
            ranges.append((at, self.file_size - at))
        return ranges


def _window(address: int) -> int:
    return address // WINDOW


def image_cuts(image: Any) -> list[int]:
    """Cut points inside an image's data section (offsets from its start), spec/registry.md §4."""
    cuts: list[int] = []
    high_water = 0
    last_window = None
    for extent in image.extents:
        if extent.offset < high_water:
            continue  # points back at pages stored earlier: no bytes of its own
        if last_window is not None and _window(extent.address) != last_window:
            cuts.append(extent.offset)
        if image.encoding == Encoding.RAW_PAGES:
            for window in range(_window(extent.address) + 1, _window(extent.address + extent.length - 1) + 1):
                cuts.append(extent.offset + window * WINDOW - extent.address)
        last_window = _window(extent.address + extent.length - 1)
        high_water = extent.offset + extent.stored
    return cuts


def _pieces(start: int, length: int, cuts: Sequence[int], section: str) -> list[Chunk]:
    """The section ``[start, start+length)`` cut at ``cuts`` (relative), oversized pieces cut again."""
    bounds = sorted({0, length, *(c for c in cuts if 0 < c < length)})
    chunks = []
    for begin, end in zip(bounds, bounds[1:], strict=False):
        if end - begin > OVERSIZED:
            for at in range(begin, end, BLOB_CUT):
                chunks.append(Chunk(start + at, min(BLOB_CUT, end - at), section))
        else:
            chunks.append(Chunk(start + begin, end - begin, section))
    return chunks


def plan(bundle: smolformat.Bundle, file_size: int) -> Plan:
    """Cut an open bundle into chunks (spec/registry.md §4)."""
    chunks: list[Chunk] = []
    images = bundle.images()
    for data, image in images:
        name = "ram" if data.kind == SectionKind.MEMORY_DATA else f"disk{data.index}"
        chunks += _pieces(data.offset, data.length, image_cuts(image), name)
    for section in bundle.sections:
        if section.kind in (SectionKind.KERNEL, SectionKind.INITRD) or (
            not isinstance(section.kind, SectionKind) and section.length > _SMALL_UNKNOWN
        ):
            name = section.kind.name.lower() if isinstance(section.kind, SectionKind) else f"section{section.kind}"
            chunks += _pieces(section.offset, section.length, range(BLOB_CUT, section.length, BLOB_CUT), name)
    chunks.sort(key=lambda c: c.offset)
    config = bundle.config
    metadata = bundle.metadata
    facts = {
        "bundleDigest": "blake2b-256:" + bundle.digest.hex(),
        "fileSize": file_size,
        "version": "%d.%d" % bundle.version,
        "arch": str(config.arch),
        "vcpus": config.vcpu_count,
        "ram": sum(r.size for r in config.ram),
        "hypervisor": metadata.hypervisor if metadata else "",
        "memoryEncoding": bundle.memory_encoding,
        "disks": [data.logical_length for data, _ in images[1:]],
        "bootable": any(s.kind == SectionKind.KERNEL for s in bundle.sections),
    }
    return Plan(file_size, tuple(chunks), facts)


def descriptor(media_type: str, digest: str, size: int, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """An OCI content descriptor."""
    value: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if annotations:
        value["annotations"] = annotations
    return value


def config_blob(facts: dict[str, Any]) -> bytes:
    """The config blob (spec/registry.md §2): canonical JSON, so equal facts give an equal digest."""
    return json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()


def manifest_blob(
    config: dict[str, Any], state: dict[str, Any], chunks: Sequence[tuple[Chunk, str]]
) -> bytes:
    """The image manifest: the config, the state layer, then each chunk with its offset."""
    layers = [state] + [
        descriptor(CHUNK_TYPE, digest, c.size, {OFFSET_KEY: str(c.offset), SECTION_KEY: c.section})
        for c, digest in chunks
    ]
    value = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": config,
        "layers": layers,
        "annotations": {"org.opencontainers.image.created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Blob:
    """A blob a pull needs: its digest and size, and for a chunk its offset in the file."""

    digest: str
    size: int
    offset: int = -1


@dataclass(frozen=True)
class Artifact:
    """A checked manifest: the config descriptor, the state layer and the chunks in file order."""

    config: Blob
    state: Blob
    chunks: tuple[Blob, ...]


def _descriptor(value: Any, what: str, limit: int) -> Blob:
    if not isinstance(value, dict):
        raise RegistryError(f"the manifest's {what} is not a descriptor")
    digest, size = value.get("digest"), value.get("size")
    if not isinstance(digest, str) or not is_digest(digest):
        raise RegistryError(f"the manifest's {what} has no sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= limit:
        raise RegistryError(f"the manifest's {what} {digest} has a bad size {size!r} (at most {limit})")
    return Blob(digest, size)


def parse_manifest(data: bytes, reference: str) -> Artifact:
    """Check a manifest fetched from a registry (spec/registry.md §5, steps 1 and 3 but fileSize)."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{reference}: the manifest is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise RegistryError(f"{reference}: the manifest is not a JSON object")
    kind = value.get("artifactType") or (value.get("config") or {}).get("mediaType")
    if value.get("mediaType", MANIFEST_TYPE) != MANIFEST_TYPE or kind != ARTIFACT_TYPE:
        raise RegistryError(f"{reference} is not a smolvmm machine (artifact type {str(kind)[:100]!r}, not {ARTIFACT_TYPE})")
    layers = value.get("layers")
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS:
        raise RegistryError(f"{reference}: the manifest needs 1 to {MAX_LAYERS} layers")
    if (value.get("config") or {}).get("mediaType") != CONFIG_TYPE:
        raise RegistryError(f"{reference}: the manifest's config is not a {CONFIG_TYPE}")
    config = _descriptor(value["config"], "config", MAX_CONFIG)
    if not isinstance(layers[0], dict) or layers[0].get("mediaType") != STATE_TYPE:
        raise RegistryError(f"{reference}: the manifest's first layer is not the state layer")
    state = _descriptor(layers[0], "state layer", MAX_STATE)
    chunks = []
    end = 0
    for number, layer in enumerate(layers[1:], 1):
        blob = _descriptor(layer, f"layer {number}", MAX_CHUNK)
        if layer.get("mediaType") != CHUNK_TYPE:
            raise RegistryError(f"{reference}: layer {number} ({blob.digest}) is not a chunk")
        offset = (layer.get("annotations") or {}).get(OFFSET_KEY)
        if not isinstance(offset, str) or not offset.isdigit() or len(offset) > 20:
            raise RegistryError(f"{reference}: chunk {blob.digest} has no file offset")
        at = int(offset)
        if blob.size == 0 or at < end:
            raise RegistryError(f"{reference}: chunk {blob.digest} is empty or overlaps the one before")
        end = at + blob.size
        chunks.append(Blob(blob.digest, blob.size, at))
    return Artifact(config, state, tuple(chunks))


def parse_config(data: bytes, artifact: Artifact, reference: str) -> dict[str, Any]:
    """Check the config blob and the layout against its ``fileSize`` (spec/registry.md §5, step 3)."""
    try:
        facts = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{reference}: the config is not JSON ({exc})") from None
    if not isinstance(facts, dict):
        raise RegistryError(f"{reference}: the config is not a JSON object")
    size, digest = facts.get("fileSize"), facts.get("bundleDigest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(f"{reference}: the config has no fileSize")
    if not isinstance(digest, str) or not digest.startswith("blake2b-256:") or len(digest) != 12 + 64:
        raise RegistryError(f"{reference}: the config has no bundleDigest")
    try:
        bytes.fromhex(digest[12:])
    except ValueError:
        raise RegistryError(f"{reference}: the config's bundleDigest is not hex") from None
    covered = artifact.state.size + sum(c.size for c in artifact.chunks)
    last_end = artifact.chunks[-1].offset + artifact.chunks[-1].size if artifact.chunks else 0
    if covered != size or last_end > size:
        raise RegistryError(f"{reference}: the layers hold {covered} bytes, but the bundle has {size}")
    return facts
