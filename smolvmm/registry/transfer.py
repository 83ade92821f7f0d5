"""``push`` and ``pull``: a bundle to and from a registry as the artifact of spec/registry.md."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import smolformat

from ..errors import BundleError, RegistryError
from . import artifact
from .client import Counters, RegistryClient
from .reference import Reference
from .store import BlobStore, disk_error

PARALLEL = 4  # blobs in flight at once
_READ_BLOCK = 4 << 20


@dataclass
class Transfer:
    """What a push or pull moves: blob bytes in all, already present (skipped), and moved so far."""

    total: int = 0
    present: int = 0
    moved: int = 0
    blobs: int = 0
    blobs_present: int = 0


@dataclass(frozen=True)
class PushResult:
    """A finished push: the reference, the manifest's digest and what was sent."""

    reference: str
    digest: str
    transfer: Transfer = field(default_factory=Transfer)


@dataclass(frozen=True)
class PullResult:
    """A finished pull: the bundle file (``os.PathLike``: ``Machine.restore`` takes it), the
    manifest's digest, the bundle digest, and what was fetched."""

    path: Path
    digest: str
    bundle_digest: bytes
    transfer: Transfer = field(default_factory=Transfer)

    def __fspath__(self) -> str:
        return os.fspath(self.path)


Progress = Callable[[Transfer], None]


async def _bounded(jobs: Iterable[Callable[[], Awaitable[Any]]], limit: int = PARALLEL) -> None:
    """Run ``jobs`` with at most ``limit`` at once; the first error cancels the rest and is raised."""
    limiter = anyio.CapacityLimiter(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> None:
        async with limiter:
            await job()

    try:
        async with anyio.create_task_group() as group:
            for job in jobs:
                group.start_soon(one, job)
    except BaseExceptionGroup as group_error:
        first = group_error
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


def _read(fd: int, ranges: Iterable[tuple[int, int]]) -> bytes:
    parts = []
    for offset, size in ranges:
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise BundleError(f"the bundle changed while it was pushed (it ends before byte {offset + size})")
        parts.append(data)
    return b"".join(parts)


def _digest_of(fd: int, ranges: list[tuple[int, int]]) -> str:
    hasher = hashlib.sha256()
    for offset, size in ranges:
        for at in range(offset, offset + size, _READ_BLOCK):
            hasher.update(_read(fd, [(at, min(_READ_BLOCK, offset + size - at))]))
    return "sha256:" + hasher.hexdigest()


def _plan(path: Path) -> artifact.Plan:
    try:
        with smolformat.open_bundle(path) as bundle:
            return artifact.plan(bundle, os.fstat(bundle.fileno()).st_size)
    except smolformat.FormatError as exc:
        raise BundleError(f"{path}: {exc}") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from None


async def push(
    bundle: str | os.PathLike[str],
    reference: str | Reference,
    *,
    insecure: bool = False,
    progress: Progress | None = None,
    store: BlobStore | None = None,
) -> PushResult:
    """Push the bundle file at ``bundle`` to ``reference`` (``REGISTRY/REPO:TAG``).

    Only blobs the repository lacks are sent (``HEAD`` first; a cross-repository mount from the
    repository of that registry used last, where the registry allows it). ``progress`` is called
    as bytes move.
    """
    ref = reference if isinstance(reference, Reference) else Reference.parse(reference)
    path = Path(bundle)
    plan = await anyio.to_thread.run_sync(_plan, path)
    store = store or BlobStore()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        state_ranges = plan.state_ranges()
        pieces: dict[str, list[tuple[int, int]]] = {}
        chunk_digests: list[tuple[artifact.Chunk, str]] = []
        state_digest = await anyio.to_thread.run_sync(_digest_of, fd, state_ranges)
        pieces[state_digest] = state_ranges
        for chunk in plan.chunks:
            digest = await anyio.to_thread.run_sync(_digest_of, fd, [(chunk.offset, chunk.size)])
            pieces.setdefault(digest, [(chunk.offset, chunk.size)])
            chunk_digests.append((chunk, digest))
        config = artifact.config_blob(plan.facts)
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        state_size = sum(size for _, size in state_ranges)
        blob_bytes = sum(size for ranges in pieces.values() for _, size in ranges)
        transfer = Transfer(total=blob_bytes + len(config), blobs=len(pieces) + 1)
        counters = Counters()

        def moved() -> None:
            transfer.moved = counters.sent
            if progress:
                progress(transfer)

        counters.on_change = moved
        mount_from = store.last_repository(ref.registry)
        mount_from = mount_from if mount_from != ref.repository else None
        async with RegistryClient(ref.registry, insecure=insecure, loopback=ref.is_loopback, counters=counters) as client:

            def send(digest: str, ranges: list[tuple[int, int]]) -> Callable[[], Awaitable[None]]:
                async def job() -> None:
                    size = sum(s for _, s in ranges)
                    if await client.has_blob(ref.repository, digest):
                        transfer.present += size
                        transfer.blobs_present += 1
                        return moved()
                    session = await client.start_upload(ref.repository, digest, mount_from)
                    if session is None:  # mounted
                        transfer.present += size
                        transfer.blobs_present += 1
                        return moved()
                    data = await anyio.to_thread.run_sync(_read, fd, ranges)
                    await client.upload(ref.repository, digest, data, session)

                return job

            await _bounded(send(d, r) for d, r in pieces.items())
            if await client.has_blob(ref.repository, config_digest):
                transfer.present += len(config)
                transfer.blobs_present += 1
            else:
                session = await client.start_upload(ref.repository, config_digest, None)
                await client.upload(ref.repository, config_digest, config, session or "")
            manifest = artifact.manifest_blob(
                artifact.descriptor(artifact.CONFIG_TYPE, config_digest, len(config)),
                artifact.descriptor(artifact.STATE_TYPE, state_digest, state_size),
                chunk_digests,
            )
            digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
            if ref.digest and ref.digest != digest:
                raise RegistryError(f"{ref} names digest {ref.digest}, but this bundle's manifest is {digest}")
            await client.put_manifest(ref.repository, ref.tag or digest, manifest)
    finally:
        os.close(fd)
    store.remember_repository(ref.registry, ref.repository)
    return PushResult(str(ref), digest, transfer)


def _assemble(store: BlobStore, art: artifact.Artifact, facts: dict[str, Any], target: Path) -> bytes:
    """Write the bundle from stored blobs to a temp file beside ``target``, verify it, rename it."""
    try:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise disk_error(exc, target) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, open(store.path(art.state.digest), "rb") as state:
            for chunk in art.chunks:
                _copy(state, out, chunk.offset - out.tell())
                with open(store.path(chunk.digest), "rb") as piece:
                    _copy(piece, out, chunk.size)
            _copy(state, out, facts["fileSize"] - out.tell())
            out.flush()
            os.fchmod(out.fileno(), 0o644)
            os.fsync(out.fileno())
        try:
            with smolformat.open_bundle(tmp) as bundle:
                bundle.verify()
                digest = bundle.digest
        except smolformat.FormatError as exc:
            raise RegistryError(f"the pulled bundle does not verify: {exc}") from None
        if "blake2b-256:" + digest.hex() != facts["bundleDigest"]:
            raise RegistryError(f"the pulled bundle's digest {digest.hex()} is not the {facts['bundleDigest']} its config names")
        os.replace(tmp, target)
        return digest
    except OSError as exc:
        raise disk_error(exc, target) from None
    finally:
        tmp.unlink(missing_ok=True)


def _copy(source: Any, out: Any, size: int) -> None:
    while size > 0:
        data = source.read(min(size, 1 << 20))
        if not data:
            raise RegistryError("a stored blob is shorter than the manifest says")
        out.write(data)
        size -= len(data)


async def pull(
    reference: str | Reference,
    output: str | os.PathLike[str] | None = None,
    *,
    insecure: bool = False,
    progress: Progress | None = None,
    store: BlobStore | None = None,
) -> PullResult:
    """Pull the machine at ``reference`` and write its bundle to ``output`` atomically.

    Without ``output`` the bundle goes into the local store (``${XDG_CACHE_HOME}/smolvmm/oci``),
    keyed by manifest digest, and is reused on the next pull of the same digest. Blobs already in
    the store are not fetched again; every blob is checked against its digest as it arrives, and the
    assembled file against the bundle digest before it takes its name.
    """
    ref = reference if isinstance(reference, Reference) else Reference.parse(reference)
    store = store or BlobStore()
    counters = Counters()
    transfer = Transfer()

    def moved() -> None:
        transfer.moved = counters.received
        if progress:
            progress(transfer)

    counters.on_change = moved
    async with RegistryClient(ref.registry, insecure=insecure, loopback=ref.is_loopback, counters=counters) as client:
        data, digest = await client.get_manifest(ref, artifact.MAX_MANIFEST)
        art = artifact.parse_manifest(data, str(ref))
        config = await client.fetch_small(ref.repository, art.config.digest, art.config.size)
        facts = artifact.parse_config(config, art, str(ref))
        target = Path(output) if output is not None else store.bundle_path(digest)
        expected = bytes.fromhex(facts["bundleDigest"].removeprefix("blake2b-256:"))
        if output is None and target.exists():
            return PullResult(target, digest, expected, transfer)
        blobs = {b.digest: b.size for b in (art.state, *art.chunks)}
        transfer.blobs = len(blobs) + 1
        transfer.total = sum(blobs.values()) + art.config.size
        missing = {}
        for blob_digest, size in blobs.items():
            if store.has(blob_digest, size):
                transfer.present += size
                transfer.blobs_present += 1
            else:
                missing[blob_digest] = size
        moved()

        def fetch(blob_digest: str, size: int) -> Callable[[], Awaitable[None]]:
            async def job() -> None:
                with store.writing(blob_digest) as file:
                    await client.fetch_blob(ref.repository, blob_digest, size, file.write)

            return job

        await _bounded(fetch(d, s) for d, s in missing.items())
    bundle_digest = await anyio.to_thread.run_sync(_assemble, store, art, facts, target)
    store.remember_repository(ref.registry, ref.repository)
    return PullResult(target, digest, bundle_digest, transfer)
