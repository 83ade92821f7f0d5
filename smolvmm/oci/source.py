"""Image sources by skopeo's transport names, resolved to a verified manifest, config and layers.

``oci:DIR[:TAG]`` (an OCI image layout), ``docker-archive:FILE`` (``docker save``),
``docker://REGISTRY/REPO[:TAG|@DIGEST]`` (the distribution API, see ``registry``) and
``rootfs:PATH`` (a directory or a tar of one). Everything read from a source is untrusted:
JSON documents are size-capped, every blob's size and sha256 digest are checked before use.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from smolvmm.errors import ImageError
from smolvmm.oci.imageconfig import ImageConfig

MAX_DOCUMENT = 4 << 20  # manifests, indexes and configs
MAX_LAYERS = 256
PLATFORM = ("linux", "amd64")  # the guest's
INDEX_TYPES = {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"}
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_CHUNK = 1 << 20


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
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
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
    """One layer: ``open()`` gives its tar stream (maybe compressed); ``diff_id`` checks the
    uncompressed stream when the blob itself had no digest to check (old docker archives)."""

    name: str
    size: int
    open: Callable[[], IO[bytes]]
    diff_id: str | None = None


def file_opener(path: Path) -> Callable[[], IO[bytes]]:
    """A layer's ``open``: the file at ``path``, opened afresh at each call."""
    return lambda: open(path, "rb")


def _member_opener(archive: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
    """A layer's ``open``: a regular file in ``archive``, read in place."""

    def open_member() -> IO[bytes]:
        stream = archive.extractfile(member)
        assert stream is not None  # the caller checked that the member is a regular file
        return stream

    return open_member


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


def verify_file(where: str, path: Path, descriptor: Descriptor) -> None:
    """Check that blob file ``path`` has exactly the descriptor's size and digest."""
    try:
        size = path.stat().st_size
        if size != descriptor.size:
            raise ImageError(f"{where} is {size} bytes, its descriptor says {descriptor.size} (truncated or altered)")
        digest = hashlib.sha256()
        with open(path, "rb") as blob:
            while chunk := blob.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise ImageError(f"{where}: {exc.strerror or exc}") from None
    if "sha256:" + digest.hexdigest() != descriptor.digest:
        raise ImageError(f"{where} does not match its digest {descriptor.digest}")


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


def split_reference(text: str) -> tuple[str, str | None]:
    """``PATH[:TAG]`` -> (path, tag); a colon belongs to the path when what follows looks like one."""
    path, colon, tag = text.rpartition(":")
    if colon and path and re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", tag):
        return path, tag
    return text, None


@contextmanager
def open_source(
    spec: str, work: Path, *, insecure: bool = False, progress: Callable[[str], None] | None = None
) -> Iterator[Image]:
    """The image named ``spec``; ``work`` is a scratch directory (pulled blobs go there)."""
    kind, colon, rest = spec.partition(":")
    if not colon or not rest or kind not in ("oci", "docker-archive", "docker", "rootfs"):
        raise ImageError(
            f"unknown image source {spec!r}: use oci:DIR[:TAG], docker-archive:FILE, docker://REGISTRY/REPO[:TAG], rootfs:PATH"
        )
    if kind == "oci":
        yield _oci_layout(*split_reference(rest))
    elif kind == "docker-archive":
        with _docker_archive(Path(rest)) as image:
            yield image
    elif kind == "docker":
        from smolvmm.oci.registry import pull

        yield pull(rest, work, insecure=insecure, progress=progress)
    else:
        yield _rootfs(Path(rest))


def _blob_path(layout: Path, descriptor: Descriptor) -> Path:
    return layout / "blobs" / "sha256" / descriptor.digest.removeprefix("sha256:")


def _read_verified(where: str, path: Path, descriptor: Descriptor) -> bytes:
    if descriptor.size > MAX_DOCUMENT:
        raise ImageError(f"{where} is larger than {MAX_DOCUMENT >> 20} MiB")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{where} ({path}): {exc.strerror or exc}") from None
    if len(data) != descriptor.size:
        raise ImageError(f"{where} is {len(data)} bytes, its descriptor says {descriptor.size} (truncated or altered)")
    check_digest(where, data, descriptor.digest)
    return data


def _oci_layout(directory: str, tag: str | None) -> Image:
    layout = Path(directory)
    where = f"OCI layout {layout}"
    try:
        marker = load_json(f"{where}: oci-layout", (layout / "oci-layout").read_bytes()[: MAX_DOCUMENT + 1])
        index = load_json(f"{where}: index.json", (layout / "index.json").read_bytes()[: MAX_DOCUMENT + 1])
    except OSError as exc:
        raise ImageError(f"{where} is not an OCI image layout: {exc.strerror or exc}") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("imageLayoutVersion"), str):
        raise ImageError(f"{where}: oci-layout has no imageLayoutVersion")
    descriptor = pick_manifest(f"{where}: index.json", index, tag)
    for _ in range(4):  # an index may point at a nested index (the multi-platform case)
        data = _read_verified(f"{where}: manifest", _blob_path(layout, descriptor), descriptor)
        document = load_json(f"{where}: manifest {descriptor.digest}", data)
        if document.get("mediaType") in INDEX_TYPES or "manifests" in document:
            descriptor = pick_manifest(f"{where}: index {descriptor.digest}", document)
            continue
        break
    else:
        raise ImageError(f"{where}: indexes nested too deeply")
    config_descriptor, layers = parse_manifest(f"{where}: manifest {descriptor.digest}", document)
    config = load_json(
        f"{where}: config", _read_verified(f"{where}: config", _blob_path(layout, config_descriptor), config_descriptor)
    )
    checked = []
    for number, layer in enumerate(layers):
        path = _blob_path(layout, layer)
        verify_file(f"{where}: layer {number} ({layer.digest})", path, layer)
        checked.append(Layer(f"{number} ({layer.digest[:19]})", layer.size, file_opener(path)))
    return Image(descriptor.digest, ImageConfig.from_image(config), tuple(checked))


def _diff_ids(where: str, config: Any, count: int) -> list[str | None]:
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if (
        not isinstance(ids, list)
        or len(ids) != count
        or not all(isinstance(i, str) and _DIGEST.fullmatch(i) for i in ids)
    ):
        raise ImageError(f"{where}: the config's rootfs.diff_ids do not list one sha256 digest per layer")
    return list(ids)


@contextmanager
def _docker_archive(path: Path) -> Iterator[Image]:
    where = f"docker archive {path}"
    try:
        archive = tarfile.open(path, "r:")
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(f"{where} cannot be read as a tar: {exc}") from None
    with archive:
        members: dict[str, tarfile.TarInfo] = {}
        for member in archive:
            if len(members) > 100_000:
                raise ImageError(f"{where} holds too many entries")
            members[member.name.removeprefix("./")] = member

        def read(name: str) -> bytes:
            member = members.get(name)
            if member is None or not member.isfile():
                raise ImageError(f"{where} has no file {name!r}")
            if member.size > MAX_DOCUMENT:
                raise ImageError(f"{where}: {name} is larger than {MAX_DOCUMENT >> 20} MiB")
            stream = archive.extractfile(member)
            assert stream is not None
            return stream.read()

        manifest = load_json(f"{where}: manifest.json", read("manifest.json"))
        if not isinstance(manifest, list) or len(manifest) != 1 or not isinstance(manifest[0], dict):
            count = len(manifest) if isinstance(manifest, list) else "no"
            raise ImageError(f"{where}: manifest.json lists {count} images, expected exactly one")
        entry = manifest[0]
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if (
            not isinstance(config_name, str)
            or not isinstance(layer_names, list)
            or len(layer_names) > MAX_LAYERS
            or not all(isinstance(name, str) for name in layer_names)
        ):
            raise ImageError(f"{where}: manifest.json needs a Config name and a list of Layers")
        config_data = read(config_name)
        config_digest = "sha256:" + Path(config_name).name.removesuffix(".json")
        if not _DIGEST.fullmatch(config_digest):
            raise ImageError(f"{where}: config {config_name!r} is not named by its digest")
        check_digest(f"{where}: config", config_data, config_digest)
        config = load_json(f"{where}: config", config_data)
        ids = _diff_ids(where, config, len(layer_names))
        layers = []
        for number, (name, diff_id) in enumerate(zip(layer_names, ids)):
            layer_file = members.get(name)
            if layer_file is None or not layer_file.isfile():
                raise ImageError(f"{where} has no layer file {name!r}")
            layers.append(Layer(f"{number} ({name})", layer_file.size, _member_opener(archive, layer_file), diff_id))
        yield Image(config_digest, ImageConfig.from_image(config), tuple(layers))


def _rootfs(path: Path) -> Image:
    where = f"rootfs {path}"
    try:
        info = path.stat()
    except OSError as exc:
        raise ImageError(f"{where}: {exc.strerror or exc}") from None
    key = f"rootfs:{path.resolve()}:{info.st_mtime_ns}:{info.st_size}"
    if path.is_dir():
        return Image(key, ImageConfig(), directory=path)
    if not tarfile.is_tarfile(path):
        raise ImageError(f"{where} is neither a directory nor a tar archive")
    return Image(key, ImageConfig(), (Layer(str(path), info.st_size, lambda: open(path, "rb")),))
