"""Pulling a container image from a registry (``docker://REGISTRY/REPO[:TAG|@DIGEST]``).

The distribution API itself is ``smolvmm.registry``'s: its reference rules, and RegistryClient
with https (plain HTTP only for a loopback registry or with ``insecure``), bearer-token or basic
auth with the docker config's credentials, and blobs checked against their size and digest.
Here: the image's media types, a manifest list's linux/amd64 image, the config and the layers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from smolvmm.errors import ConfigError, ImageError, RegistryError
from smolvmm.oci.imageconfig import ImageConfig
from smolvmm.oci.manifest import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_DOCUMENT,
    Descriptor,
    Image,
    Layer,
    diff_ids,
    file_opener,
    load_json,
    parse_manifest,
    pick_manifest,
)
from smolvmm.registry import artifact
from smolvmm.registry.client import RegistryClient
from smolvmm.registry.reference import Reference

DOCKER_HUB = "registry-1.docker.io"
_ACCEPT = ", ".join(sorted(INDEX_TYPES | MANIFEST_TYPES))


def parse_reference(text: str) -> Reference:
    """``//REGISTRY/REPO[:TAG|@sha256:...]`` (skopeo's docker: transport, after the colon); a name
    without a registry host is Docker Hub's (``//debian`` is ``registry-1.docker.io/library/debian``)."""
    if not text.startswith("//"):
        raise ImageError(f"docker:{text}: write docker://REGISTRY/REPO[:TAG]")
    name = text[2:]
    first, slash, _ = name.partition("@")[0].partition("/")
    if not (slash and ("." in first or ":" in first or first == "localhost")):
        name = f"{DOCKER_HUB}/{name if slash else 'library/' + name}"
    try:
        return Reference.parse(name)
    except ConfigError as exc:
        raise ImageError(f"docker:{text}: {exc}") from None


def pull(
    text: str,
    work: Path,
    *,
    insecure: bool = False,
    progress: Callable[[str], None] | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> Image:
    """Download ``//REGISTRY/REPO[:TAG|@DIGEST]``'s linux/amd64 image into ``work``, verified.
    ``checkpoint`` is called every tenth of a second as it goes: what it raises stops the pull.

    Synchronous, like the other sources: it runs its own event loop, so call it where none runs
    (a worker thread)."""
    reference = parse_reference(text)
    try:
        return anyio.run(_pull_until, checkpoint, partial(_pull, reference, work, insecure, progress))
    except RegistryError as exc:
        raise ImageError(str(exc)) from exc


async def _pull_until(checkpoint: Callable[[], None] | None, pulling: Callable[[], Awaitable[Image]]) -> Image:
    """``pulling()`` awaited while ``checkpoint`` is called every tenth of a second: the first exception it
    raises stops the pull (mid-layer, or stalled on a registry that sends nothing) and is raised."""
    if checkpoint is None:
        return await pulling()
    stopped: list[BaseException] = []
    image: Image | None = None
    failure: Exception | None = None  # raised as itself, not in the task group's exception group
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while True:
                await anyio.sleep(0.1)
                try:
                    checkpoint()
                except BaseException as exc:  # the caller's cancellation, of the caller's event loop
                    stopped.append(exc)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        try:
            image = await pulling()
        except Exception as exc:
            failure = exc
        tg.cancel_scope.cancel()
    if stopped:
        raise stopped[0]
    if failure is not None:
        raise failure
    assert image is not None
    return image


async def _pull(reference: Reference, work: Path, insecure: bool, progress: Callable[[str], None] | None) -> Image:
    where = f"docker://{reference.registry}/{reference.repository}"
    async with RegistryClient(reference.registry, insecure=insecure, loopback=reference.is_loopback) as client:
        document, digest = await _manifest(client, where, reference)
        if isinstance(document, dict) and (document.get("mediaType") in INDEX_TYPES or "manifests" in document):
            chosen = pick_manifest(f"{where}: manifest list", document)
            document, digest = await _manifest(client, where, reference.with_digest(chosen.digest))
        _not_a_machine(reference, document)
        config_descriptor, descriptors = parse_manifest(f"{where}: manifest {digest}", document)
        if config_descriptor.size > MAX_DOCUMENT:
            raise ImageError(f"{where}: config is larger than {MAX_DOCUMENT >> 20} MiB")
        data = await client.fetch_small(reference.repository, config_descriptor.digest, config_descriptor.size)
        config = load_json(f"{where}: config {config_descriptor.digest}", data)
        ids = diff_ids(where, config, len(descriptors))
        work.mkdir(parents=True, exist_ok=True)
        layers = []
        for number, (descriptor, diff_id) in enumerate(zip(descriptors, ids)):
            path = work / descriptor.digest.removeprefix("sha256:")
            if progress:
                progress(f"pulling layer {number + 1}/{len(descriptors)} ({descriptor.size / (1 << 20):.1f} MiB)")
            await _download(client, where, reference.repository, descriptor, path)
            layers.append(Layer(f"{number} ({descriptor.digest[:19]})", descriptor.size, file_opener(path), diff_id))
    return Image(digest, ImageConfig.from_image(config), tuple(layers))


def _not_a_machine(reference: Reference, manifest: Any) -> None:
    """Refuse a smolvmm machine (one that ``smolvmm push`` made): its layers are bundle pieces, not tars."""
    config = manifest.get("config") if isinstance(manifest, dict) else None
    if isinstance(manifest, dict) and (
        manifest.get("artifactType") == artifact.ARTIFACT_TYPE
        or (isinstance(config, dict) and config.get("mediaType") == artifact.CONFIG_TYPE)
    ):
        raise ImageError(
            f"docker://{reference} is a smolvmm machine, not a container image:"
            f" run it with `smolvmm run {reference}`, or fetch it with `smolvmm pull {reference} -o FILE`"
        )


async def _manifest(client: RegistryClient, where: str, reference: Reference) -> tuple[Any, str]:
    """An image manifest or index (bounded, checked against the reference's digest) and its digest."""
    data, digest = await client.get_manifest(reference, MAX_DOCUMENT, _ACCEPT)
    return load_json(f"{where}: manifest {reference.manifest_reference}", data), digest


async def _download(client: RegistryClient, where: str, repository: str, descriptor: Descriptor, path: Path) -> None:
    """Blob ``descriptor`` into file ``path``, which exists only once its size and digest checked out."""
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as out:
            await client.fetch_blob(repository, descriptor.digest, descriptor.size, out.write)
        partial.rename(path)
    except OSError as exc:
        raise ImageError(f"{where}: saving blob {descriptor.digest}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)
