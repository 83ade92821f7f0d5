"""The OCI artifact of a bundle (spec/registry.md): how a bundle file is cut into a state layer and
chunks, the manifest and config that describe it, and the checks a pulled manifest must pass.

Everything here is pure: a plan is made from an open ``smolformat.Bundle``; manifests and configs
from a registry are parsed and bounded here, in one place, before anything is fetched.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import smolformat
from smolformat.layout import Encoding, SectionKind
from smolvmm.errors import RegistryError
from smolvmm.registry.client import wrong_manifest
from smolvmm.registry.reference import is_digest

ARTIFACT_TYPE = "application/vnd.smolvmm.machine.v1"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.smolvmm.machine.config.v1+json"
STATE_TYPE = "application/vnd.smolvmm.machine.state.v1"
CHUNK_TYPE = "application/vnd.smolvmm.machine.chunk.v1"
PATCH_TYPE = "application/vnd.smolvmm.machine.patch.v1"
BASE_TYPE = "application/vnd.smolvmm.machine.base.v1"
OFFSET_KEY = "dev.smolvmm.offset"
SECTION_KEY = "dev.smolvmm.section"
WINDOW_KEY = "dev.smolvmm.window"
BASE_KEY = "dev.smolvmm.base"
CHUNK_KEY = "dev.smolvmm.chunk"
LENGTH_KEY = "dev.smolvmm.length"
PAGE = 4096
PATCH_MAGIC = b"SMPATCH1"
_LITERAL = 0xFFFFFFFF
_PATCH_HEADER = struct.Struct("<8sII")

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
    """``size`` bytes of the bundle file at ``offset``; ``section`` says what they hold; ``window``
    names the raw pages' guest-address window (``ram/12``), the same in every save of a guest, so
    that a later save's chunk can be a patch against the earlier one's (None: never patched)."""

    offset: int
    size: int
    section: str
    window: str | None = None


@dataclass(frozen=True)
class Plan:
    """How one bundle file is cut: chunks in file order; the state layer is everything else."""

    file_size: int
    chunks: tuple[Chunk, ...]
    facts: dict[str, Any]
    created: str  # RFC 3339: when the bundle was made (its METADATA), else now

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


def image_cuts(image: Any) -> list[tuple[int, int]]:
    """Where an image's data section is cut (offsets from its start), each with the guest-address
    window that starts there (spec/registry.md §4)."""
    cuts: list[tuple[int, int]] = []
    high_water = 0
    last_window = None
    for extent in image.extents:
        if extent.offset < high_water:
            continue  # points back at pages stored earlier: no bytes of its own
        if _window(extent.address) != last_window:
            cuts.append((extent.offset, _window(extent.address)))
        if image.encoding == Encoding.RAW_PAGES:
            for window in range(_window(extent.address) + 1, _window(extent.address + extent.length - 1) + 1):
                cuts.append((extent.offset + window * WINDOW - extent.address, window))
        last_window = _window(extent.address + extent.length - 1)
        high_water = extent.offset + extent.stored
    return cuts


def _pieces(start: int, length: int, cuts: Sequence[tuple[int, int | None]], section: str) -> list[Chunk]:
    """The section ``[start, start+length)`` cut at ``cuts`` (relative offsets, each with its window,
    or None where windows mean nothing), oversized pieces cut again."""
    windows = {offset: window for offset, window in cuts if 0 <= offset < length}
    bounds = sorted({0, length, *windows})
    chunks = []
    for begin, end in zip(bounds, bounds[1:], strict=False):
        window = windows.get(begin)
        key = f"{section}/{window}" if window is not None else None
        if end - begin > OVERSIZED:
            for number, at in enumerate(range(begin, end, BLOB_CUT)):
                chunks.append(Chunk(start + at, min(BLOB_CUT, end - at), section, key and f"{key}+{number}"))
        else:
            chunks.append(Chunk(start + begin, end - begin, section, key))
    return chunks


def plan(bundle: smolformat.Bundle, file_size: int) -> Plan:
    """Cut an open bundle into chunks (spec/registry.md §4)."""
    chunks: list[Chunk] = []
    images = bundle.images()
    cuts: Sequence[tuple[int, int | None]]
    for data, image in images:
        name = "ram" if data.kind == SectionKind.MEMORY_DATA else f"disk{data.index}"
        cuts = image_cuts(image)
        if image.encoding != Encoding.RAW_PAGES:
            cuts = [(offset, None) for offset, _ in cuts]  # zstd frames are never patched: no windows
        chunks += _pieces(data.offset, data.length, cuts, name)
    for section in bundle.sections:
        if section.kind in (SectionKind.KERNEL, SectionKind.INITRD) or (
            not isinstance(section.kind, SectionKind) and section.length > _SMALL_UNKNOWN
        ):
            name = section.kind.name.lower() if isinstance(section.kind, SectionKind) else f"section{section.kind}"
            cuts = [(at, None) for at in range(BLOB_CUT, section.length, BLOB_CUT)]
            chunks += _pieces(section.offset, section.length, cuts, name)
    chunks.sort(key=lambda c: c.offset)
    config = bundle.config
    metadata = bundle.metadata
    facts = {
        "bundleDigest": "blake2b-256:" + bundle.digest.hex(),
        "fileSize": file_size,
        "version": "{}.{}".format(*bundle.version),
        "arch": str(config.arch),
        "vcpus": config.vcpu_count,
        "ram": sum(r.size for r in config.ram),
        "hypervisor": metadata.hypervisor if metadata else "",
        "memoryEncoding": bundle.memory_encoding,
        "disks": [data.logical_length for data, _ in images[1:]],
        "bootable": any(s.kind == SectionKind.KERNEL for s in bundle.sections),
    }
    made = metadata.created_unix_ns / 1e9 if metadata else time.time()
    return Plan(file_size, tuple(chunks), facts, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(made)))


def descriptor(media_type: str, digest: str, size: int, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """An OCI content descriptor."""
    value: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if annotations:
        value["annotations"] = annotations
    return value


def config_blob(facts: dict[str, Any]) -> bytes:
    """The config blob (spec/registry.md §2): canonical JSON, so equal facts give an equal digest."""
    return json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()


def chunk_layer(chunk: Chunk, digest: str) -> dict[str, Any]:
    """A chunk's layer: its bytes as they are."""
    annotations = {OFFSET_KEY: str(chunk.offset), SECTION_KEY: chunk.section}
    if chunk.window:
        annotations[WINDOW_KEY] = chunk.window
    return descriptor(CHUNK_TYPE, digest, chunk.size, annotations)


def patch_layer(chunk: Chunk, digest: str, patch_digest: str, patch_size: int, base: str) -> dict[str, Any]:
    """A chunk's layer as a patch against ``base`` (a base layer of the same manifest)."""
    annotations = {
        OFFSET_KEY: str(chunk.offset),
        SECTION_KEY: chunk.section,
        WINDOW_KEY: chunk.window or "",
        BASE_KEY: base,
        CHUNK_KEY: digest,
        LENGTH_KEY: str(chunk.size),
    }
    return descriptor(PATCH_TYPE, patch_digest, patch_size, annotations)


def manifest_blob(
    config: dict[str, Any],
    state: dict[str, Any],
    layers: Sequence[dict[str, Any]],
    bases: dict[str, int],
    created: str,
) -> bytes:
    """The image manifest: the config, the state layer, the chunk and patch layers in file order,
    then the base layers the patches need; ``created`` the bundle's time (RFC 3339), so that one
    bundle pushed twice gives one manifest."""
    value = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": config,
        "layers": [state, *layers, *(descriptor(BASE_TYPE, d, size) for d, size in sorted(bases.items()))],
        "annotations": {"org.opencontainers.image.created": created},
    }
    return json.dumps(value, separators=(",", ":")).encode()


def page_hashes(data: bytes) -> list[bytes]:
    """A short hash of each page of ``data`` (a whole number of pages): what a patch matches on."""
    return [hashlib.blake2b(data[at : at + PAGE], digest_size=16).digest() for at in range(0, len(data), PAGE)]


def make_patch(data: bytes, base_hashes: Sequence[bytes]) -> bytes | None:
    """``data`` as pages of the base chunk (by index) and literal pages, if under half its size."""
    where = {h: index for index, h in reversed(list(enumerate(base_hashes)))}
    ops, literals = [], []
    for index, h in enumerate(page_hashes(data)):
        found = where.get(h)
        if found is None:
            literals.append(data[index * PAGE : (index + 1) * PAGE])
        ops.append(_LITERAL if found is None else found)
    if len(literals) * PAGE * 2 > len(data):
        return None
    return (
        _PATCH_HEADER.pack(PATCH_MAGIC, len(ops), len(literals))
        + struct.pack(f"<{len(ops)}I", *ops)
        + b"".join(literals)
    )


def apply_patch(patch: bytes, base: bytes, length: int, what: str) -> bytes:
    """The ``length`` bytes a patch makes from ``base``; every count and index is checked."""
    bad = RegistryError(f"patch {what} is malformed")
    if len(patch) < _PATCH_HEADER.size:
        raise bad
    magic, pages, literals = _PATCH_HEADER.unpack_from(patch)
    ops_end = _PATCH_HEADER.size + 4 * pages
    if magic != PATCH_MAGIC or pages * PAGE != length or len(patch) != ops_end + literals * PAGE:
        raise bad
    out = bytearray()
    literal = ops_end
    for op in struct.unpack_from(f"<{pages}I", patch, _PATCH_HEADER.size):
        if op == _LITERAL:
            if literal >= len(patch):
                raise bad
            out += patch[literal : literal + PAGE]
            literal += PAGE
        elif (op + 1) * PAGE <= len(base):
            out += base[op * PAGE : (op + 1) * PAGE]
        else:
            raise bad
    if literal != len(patch):
        raise bad
    return bytes(out)


@dataclass(frozen=True)
class Blob:
    """A blob the manifest lists: its digest and size."""

    digest: str
    size: int


@dataclass(frozen=True)
class Piece:
    """``size`` bytes of the bundle at ``offset``, whose sha256 is ``digest``: a chunk layer, or made
    by ``patch`` from base layer ``base``."""

    digest: str
    size: int
    offset: int
    window: str | None = None
    patch: Blob | None = None
    base: str | None = None


@dataclass(frozen=True)
class Artifact:
    """A checked manifest: the config, the state layer, the pieces in file order, the base layers."""

    config: Blob
    state: Blob
    pieces: tuple[Piece, ...]
    bases: dict[str, int]


def _descriptor(value: Any, what: str, limit: int) -> Blob:
    if not isinstance(value, dict):
        raise RegistryError(f"the manifest's {what} is not a descriptor")
    digest, size = value.get("digest"), value.get("size")
    if not isinstance(digest, str) or not is_digest(digest):
        raise RegistryError(f"the manifest's {what} has no sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= limit:
        raise RegistryError(f"the manifest's {what} {digest} has a bad size {size!r} (at most {limit})")
    return Blob(digest, size)


def _number(annotations: dict[str, Any], key: str, what: str) -> int:
    value = annotations.get(key)
    if not isinstance(value, str) or not value.isdigit() or len(value) > 20:
        raise RegistryError(f"{what} has no {key}")
    return int(value)


def _piece(layer: dict[str, Any], blob: Blob, what: str) -> Piece:
    annotations = layer.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise RegistryError(f"{what} has bad annotations")
    offset = _number(annotations, OFFSET_KEY, what)
    window = annotations.get(WINDOW_KEY) if isinstance(annotations.get(WINDOW_KEY), str) else None
    if layer.get("mediaType") == CHUNK_TYPE:
        return Piece(blob.digest, blob.size, offset, window)
    digest, base = annotations.get(CHUNK_KEY), annotations.get(BASE_KEY)
    if not isinstance(digest, str) or not is_digest(digest) or not isinstance(base, str) or not is_digest(base):
        raise RegistryError(f"{what} names no chunk or base digest")
    size = _number(annotations, LENGTH_KEY, what)
    if size > MAX_CHUNK:
        raise RegistryError(f"{what} makes {size} bytes, more than {MAX_CHUNK}")
    return Piece(digest, size, offset, window, blob, base)


def parse_manifest(data: bytes, reference: str) -> Artifact:
    """Check a manifest fetched from a registry (spec/registry.md §5, steps 1 and 3 but fileSize)."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{reference}: the manifest is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise RegistryError(f"{reference}: the manifest is not a JSON object")
    if value.get("schemaVersion") != 2:
        raise RegistryError(
            f"{reference}: the manifest's schemaVersion is {str(value.get('schemaVersion'))[:20]}, not 2"
        )
    # The image-spec says mediaType SHOULD be there (our push sets it); without it, a list of manifests is an index.
    media_type = value.get("mediaType") or (INDEX_TYPE if "manifests" in value else MANIFEST_TYPE)
    if media_type != MANIFEST_TYPE:
        raise wrong_manifest(reference, str(media_type), MANIFEST_TYPE)
    kind = value.get("artifactType")
    if kind != ARTIFACT_TYPE:
        raise RegistryError(
            f"{reference} is not a smolvmm machine (artifact type {str(kind)[:100]!r}, not {ARTIFACT_TYPE})"
        )
    layers = value.get("layers")
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS:
        raise RegistryError(f"{reference}: the manifest needs 1 to {MAX_LAYERS} layers")
    if not isinstance(value.get("config"), dict) or value["config"].get("mediaType") != CONFIG_TYPE:
        raise RegistryError(f"{reference}: the manifest's config is not a {CONFIG_TYPE}")
    config = _descriptor(value["config"], "config", MAX_CONFIG)
    if not isinstance(layers[0], dict) or layers[0].get("mediaType") != STATE_TYPE:
        raise RegistryError(f"{reference}: the manifest's first layer is not the state layer")
    state = _descriptor(layers[0], "state layer", MAX_STATE)
    pieces: list[Piece] = []
    bases: dict[str, int] = {}
    end = 0
    for number, layer in enumerate(layers[1:], 1):
        blob = _descriptor(layer, f"layer {number}", MAX_CHUNK)
        kind = layer.get("mediaType")
        what = f"{reference}: layer {number} ({blob.digest})"
        if kind == BASE_TYPE:
            bases[blob.digest] = blob.size
            continue
        if kind not in (CHUNK_TYPE, PATCH_TYPE) or bases:
            raise RegistryError(f"{what} is not a chunk or patch in its place")
        piece = _piece(layer, blob, what)
        if piece.size == 0 or piece.offset < end:
            raise RegistryError(f"{what} is empty or overlaps the one before")
        end = piece.offset + piece.size
        pieces.append(piece)
    for piece in pieces:
        if piece.base is not None and piece.base not in bases:
            raise RegistryError(f"{reference}: a patch's base {piece.base} is not among the manifest's base layers")
    return Artifact(config, state, tuple(pieces), bases)


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
    covered = artifact.state.size + sum(p.size for p in artifact.pieces)
    last_end = artifact.pieces[-1].offset + artifact.pieces[-1].size if artifact.pieces else 0
    if covered != size or last_end > size:
        raise RegistryError(f"{reference}: the layers hold {covered} bytes, but the bundle has {size}")
    return facts
