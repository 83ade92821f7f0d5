"""Image sources by skopeo's transport names, resolved to a verified manifest, config and layers.

``oci:DIR[:TAG]`` (an OCI image layout), ``docker-archive:FILE`` (``docker save``),
``docker://REGISTRY/REPO[:TAG|@DIGEST]`` (the distribution API, see ``registry``) and
``rootfs:PATH`` (a directory or a tar of one). Everything read from a source is untrusted:
JSON documents are size-capped, every blob's size and sha256 digest are checked before use.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from smolvmm.config import special_file
from smolvmm.errors import ImageError
from smolvmm.oci.imageconfig import ImageConfig
from smolvmm.oci.manifest import (
    DIGEST,
    INDEX_TYPES,
    MAX_DOCUMENT,
    MAX_LAYERS,
    Descriptor,
    Image,
    Layer,
    check_digest,
    diff_ids,
    file_opener,
    load_json,
    parse_manifest,
    pick_manifest,
)

_CHUNK = 1 << 20


def _member_opener(archive: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
    """A layer's ``open``: a regular file in ``archive``, read in place."""

    def open_member() -> IO[bytes]:
        stream = archive.extractfile(member)
        assert stream is not None  # the caller checked that the member is a regular file
        return stream

    return open_member


def _readable(where: str, path: Path, wanted: str = "a regular file") -> None:
    """Refuse ``path`` before reading it if it is a FIFO, a device or a socket (``rootfs:/dev/zero``):
    reading it could wait, or go on, for ever."""
    kind = special_file(path)
    if kind is not None:
        raise ImageError(f"{where} is {kind}, not {wanted}")


def verify_file(where: str, path: Path, descriptor: Descriptor) -> None:
    """Check that blob file ``path`` has exactly the descriptor's size and digest."""
    _readable(where, path)
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


def split_reference(text: str) -> tuple[str, str | None]:
    """``PATH[:TAG]`` -> (path, tag); a colon belongs to the path when what follows looks like one."""
    path, colon, tag = text.rpartition(":")
    if colon and path and re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", tag):
        return path, tag
    return text, None


@contextmanager
def open_source(
    spec: str,
    work: Path,
    *,
    insecure: bool = False,
    progress: Callable[[str], None] | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> Iterator[Image]:
    """The image named ``spec``; ``work`` is a scratch directory (pulled blobs go there, and
    ``checkpoint`` is polled every tenth of a second while they do: what it raises stops the pull)."""
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

        yield pull(rest, work, insecure=insecure, progress=progress, checkpoint=checkpoint)
    else:
        yield _rootfs(Path(rest))


def _blob_path(layout: Path, descriptor: Descriptor) -> Path:
    return layout / "blobs" / "sha256" / descriptor.digest.removeprefix("sha256:")


def _read_verified(where: str, path: Path, descriptor: Descriptor) -> bytes:
    if descriptor.size > MAX_DOCUMENT:
        raise ImageError(f"{where} is larger than {MAX_DOCUMENT >> 20} MiB")
    _readable(f"{where} ({path})", path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{where} ({path}): {exc.strerror or exc}") from None
    if len(data) != descriptor.size:
        raise ImageError(f"{where} is {len(data)} bytes, its descriptor says {descriptor.size} (truncated or altered)")
    check_digest(where, data, descriptor.digest)
    return data


def _read_document(where: str, path: Path) -> bytes:
    """The start of file ``path``: enough for load_json to tell a document too large."""
    _readable(where, path)
    with open(path, "rb") as document:
        return document.read(MAX_DOCUMENT + 1)


def _oci_layout(directory: str, tag: str | None) -> Image:
    layout = Path(directory)
    where = f"OCI layout {layout}"
    try:
        marker = load_json(f"{where}: oci-layout", _read_document(f"{where}: oci-layout", layout / "oci-layout"))
        index = load_json(f"{where}: index.json", _read_document(f"{where}: index.json", layout / "index.json"))
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
    ids = diff_ids(where, config, len(layers))
    checked = []
    for number, (layer, diff_id) in enumerate(zip(layers, ids)):
        path = _blob_path(layout, layer)
        verify_file(f"{where}: layer {number} ({layer.digest})", path, layer)
        checked.append(Layer(f"{number} ({layer.digest[:19]})", layer.size, file_opener(path), diff_id))
    return Image(descriptor.digest, ImageConfig.from_image(config), tuple(checked))


@contextmanager
def _docker_archive(path: Path) -> Iterator[Image]:
    where = f"docker archive {path}"
    _readable(where, path)
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
        if not DIGEST.fullmatch(config_digest):
            raise ImageError(f"{where}: config {config_name!r} is not named by its digest")
        check_digest(f"{where}: config", config_data, config_digest)
        config = load_json(f"{where}: config", config_data)
        ids = diff_ids(where, config, len(layer_names))
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
    _readable(where, path, "a directory or a tar archive")
    key = f"rootfs:{path.resolve()}:{info.st_mtime_ns}:{info.st_size}"
    if path.is_dir():
        return Image(key, ImageConfig(), directory=path)
    if not tarfile.is_tarfile(path):
        raise ImageError(f"{where} is neither a directory nor a tar archive")
    return Image(key, ImageConfig(), (Layer(str(path), info.st_size, lambda: open(path, "rb")),))
