"""``push`` and ``pull``: a bundle to and from a registry as the artifact of spec/registry.md."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio

import smolformat
from smolformat.files import check_replaceable, new_file_mode
from smolvmm.errors import BundleError, RegistryError
from smolvmm.registry import artifact
from smolvmm.registry.client import Counters, RegistryClient
from smolvmm.registry.reference import Reference
from smolvmm.registry.store import BlobStore, disk_error

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


def _chunk_digest(fd: int, chunk: artifact.Chunk) -> tuple[str, list[bytes] | None]:
    """A chunk's sha256 and, for raw pages in a window, its page hashes."""
    if chunk.window is None or chunk.size % artifact.PAGE:
        return _digest_of(fd, [(chunk.offset, chunk.size)]), None
    data = _read(fd, [(chunk.offset, chunk.size)])
    return "sha256:" + hashlib.sha256(data).hexdigest(), artifact.page_hashes(data)


def _plan(path: Path) -> artifact.Plan:
    """How the bundle at ``path`` is cut, once it passed ``verify``'s checks: what does not verify is not published."""
    try:
        with smolformat.open_bundle(path) as bundle:
            bundle.verify()
            return artifact.plan(bundle, os.fstat(bundle.fileno()).st_size)
    except smolformat.FormatError as exc:
        raise BundleError(f"{path}: {exc}") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from None


async def _base_windows(client: RegistryClient, ref: Reference, store: BlobStore) -> dict[str, tuple[str, int]]:
    """Per window, the full chunk (digest, size) of the manifest moved last through this repository:
    what this push's chunks may be patches against. Empty when there is none (or it is gone)."""
    last = store.last_manifest(ref.registry, ref.repository)
    if last is None:
        return {}
    try:
        data, _ = await client.get_manifest(ref.with_digest(last), artifact.MAX_MANIFEST)
        base = artifact.parse_manifest(data, str(ref.with_digest(last)))
    except RegistryError:
        return {}
    windows = {}
    for piece in base.pieces:
        if piece.window:
            windows[piece.window] = (piece.base, base.bases[piece.base]) if piece.base else (piece.digest, piece.size)
    return windows


async def push(
    bundle: str | os.PathLike[str],
    reference: str | Reference,
    *,
    insecure: bool = False,
    progress: Progress | None = None,
    store: BlobStore | None = None,
) -> PushResult:
    """Push the bundle file at ``bundle`` to ``reference`` (``REGISTRY/REPO:TAG``).

    Only what the repository lacks is sent (``HEAD`` first; a cross-repository mount from the
    repository of that registry used last, where the registry allows it), and a chunk of raw pages
    that differs in a few pages from the same window of the manifest moved last through this
    repository goes up as a patch against it. ``progress`` is called as bytes move.
    """
    ref = reference if isinstance(reference, Reference) else Reference.parse(reference)
    path = Path(bundle)
    plan = await anyio.to_thread.run_sync(_plan, path)
    store = store or BlobStore()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        state_ranges = plan.state_ranges()
        state_digest = await anyio.to_thread.run_sync(_digest_of, fd, state_ranges)
        state_size = sum(size for _, size in state_ranges)
        chunk_digests: list[tuple[artifact.Chunk, str]] = []
        unique: dict[str, tuple[artifact.Chunk, list[bytes] | None]] = {}
        for chunk in plan.chunks:
            digest, hashes = await anyio.to_thread.run_sync(_chunk_digest, fd, chunk)
            unique.setdefault(digest, (chunk, hashes))
            chunk_digests.append((chunk, digest))
        config = artifact.config_blob(plan.facts)
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        transfer = Transfer(
            total=state_size + sum(c.size for c, _ in unique.values()) + len(config), blobs=len(unique) + 2
        )
        counters = Counters()

        def moved() -> None:
            transfer.moved = counters.sent
            if progress:
                progress(transfer)

        counters.on_change = moved
        mount_from = store.last_repository(ref.registry)
        mount_from = mount_from if mount_from != ref.repository else None
        patched: dict[str, tuple[str, int, str]] = {}  # chunk digest -> patch digest, patch size, base
        bases: dict[str, int] = {}
        async with RegistryClient(
            ref.registry, insecure=insecure, loopback=ref.is_loopback, counters=counters
        ) as client:
            windows = await _base_windows(client, ref, store)

            async def send(digest: str, data_of: Callable[[], bytes], size: int) -> None:
                """Upload a blob the repository may lack; counts what was already there."""
                if await client.has_blob(ref.repository, digest):
                    transfer.present += size
                    transfer.blobs_present += 1
                    return moved()
                session = await client.start_upload(ref.repository, digest, mount_from)
                if session is None:  # mounted
                    transfer.present += size
                    transfer.blobs_present += 1
                    return moved()
                await client.upload(ref.repository, digest, await anyio.to_thread.run_sync(data_of), session)

            def chunk_job(
                digest: str, chunk: artifact.Chunk, hashes: list[bytes] | None
            ) -> Callable[[], Awaitable[None]]:
                async def job() -> None:
                    if hashes is not None:
                        store.save_pages(digest, hashes)
                    base = windows.get(chunk.window or "")
                    base_hashes = await anyio.to_thread.run_sync(store.page_hashes, *base) if base else None
                    if base and base_hashes and not await client.has_blob(ref.repository, digest):
                        data = await anyio.to_thread.run_sync(_read, fd, [(chunk.offset, chunk.size)])
                        patch = artifact.make_patch(data, base_hashes)
                        if patch is not None:
                            patch_digest = "sha256:" + hashlib.sha256(patch).hexdigest()
                            patched[digest] = (patch_digest, len(patch), base[0])
                            bases[base[0]] = base[1]
                            transfer.present += chunk.size - len(patch)
                            return await send(patch_digest, lambda: patch, len(patch))
                    await send(digest, partial(_read, fd, [(chunk.offset, chunk.size)]), chunk.size)

                return job

            jobs = [chunk_job(d, c, h) for d, (c, h) in unique.items()]
            jobs.append(partial(send, state_digest, partial(_read, fd, state_ranges), state_size))
            jobs.append(partial(send, config_digest, lambda: config, len(config)))
            await _bounded(jobs)
            layers = []
            for chunk, digest in chunk_digests:
                if digest in patched:
                    layers.append(artifact.patch_layer(chunk, digest, *patched[digest]))
                else:
                    layers.append(artifact.chunk_layer(chunk, digest))
            manifest = artifact.manifest_blob(
                artifact.descriptor(artifact.CONFIG_TYPE, config_digest, len(config)),
                artifact.descriptor(artifact.STATE_TYPE, state_digest, state_size),
                layers,
                bases,
                plan.created,
            )
            digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
            if ref.digest and ref.digest != digest:
                raise RegistryError(f"{ref} names digest {ref.digest}, but this bundle's manifest is {digest}")
            await client.put_manifest(ref.repository, ref.tag or digest, manifest)
    finally:
        os.close(fd)
    store.remember(ref.registry, ref.repository, digest)
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
            for piece in art.pieces:
                _copy(state, out, piece.offset - out.tell())
                with open(store.path(piece.digest), "rb") as stored:
                    _copy(stored, out, piece.size)
            _copy(state, out, facts["fileSize"] - out.tell())
            out.flush()
            os.fchmod(out.fileno(), new_file_mode())
            os.fsync(out.fileno())
        try:
            with smolformat.open_bundle(tmp) as bundle:
                bundle.verify()
                digest = bundle.digest
        except smolformat.FormatError as exc:
            raise RegistryError(f"the pulled bundle does not verify: {exc}") from None
        if "blake2b-256:" + digest.hex() != facts["bundleDigest"]:
            raise RegistryError(
                f"the pulled bundle's digest {digest.hex()} is not the {facts['bundleDigest']} its config names"
            )
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
    if output is not None:
        try:
            check_replaceable(output)  # before any transfer
        except OSError as exc:
            raise disk_error(exc, Path(output)) from None
    store = store or BlobStore()
    counters = Counters()
    transfer = Transfer()

    def moved() -> None:
        transfer.moved = counters.received
        if progress:
            progress(transfer)

    counters.on_change = moved
    if output is None and ref.digest and store.bundle_path(ref.digest).exists():
        # Assembled and verified by an earlier pull of this very digest: no need for the registry.
        path = store.bundle_path(ref.digest)
        return PullResult(path, ref.digest, await anyio.to_thread.run_sync(_bundle_digest, path), transfer)
    async with RegistryClient(ref.registry, insecure=insecure, loopback=ref.is_loopback, counters=counters) as client:
        data, digest = await client.get_manifest(ref, artifact.MAX_MANIFEST)
        art = artifact.parse_manifest(data, str(ref))
        config = await client.fetch_small(ref.repository, art.config.digest, art.config.size)
        facts = artifact.parse_config(config, art, str(ref))
        target = Path(output) if output is not None else store.bundle_path(digest)
        expected = bytes.fromhex(facts["bundleDigest"].removeprefix("blake2b-256:"))
        if output is None and target.exists():
            return PullResult(target, digest, expected, transfer)
        pieces = {p.digest: p for p in art.pieces}
        transfer.blobs = len(pieces) + 2
        transfer.total = art.state.size + sum(p.size for p in pieces.values()) + art.config.size
        missing = [p for p in pieces.values() if not store.has(p.digest, p.size)]
        if not store.has(art.state.digest, art.state.size):
            missing.append(artifact.Piece(art.state.digest, art.state.size, -1))
        transfer.blobs_present = transfer.blobs - 1 - len(missing)
        transfer.present = transfer.total - art.config.size - sum(p.size for p in missing)
        moved()

        async def fetch(digest: str, size: int) -> None:
            if not store.has(digest, size):
                with store.writing(digest) as file:
                    await client.fetch_blob(ref.repository, digest, size, file.write)

        # The bases the missing patches need first (several patches may share one), then the rest.
        needed = {p.base: art.bases[p.base] for p in missing if p.base is not None}
        bases_at_hand = {d for d, size in needed.items() if store.has(d, size)}
        await _bounded(partial(fetch, d, s) for d, s in needed.items())

        async def make(piece: artifact.Piece) -> None:
            if piece.patch is None or piece.base is None:
                await fetch(piece.digest, piece.size)
            else:
                patch = await client.fetch_small(ref.repository, piece.patch.digest, piece.patch.size)
                if piece.base in bases_at_hand:
                    transfer.present += piece.size - piece.patch.size
                await anyio.to_thread.run_sync(_apply, store, piece, piece.patch.digest, piece.base, patch)

        await _bounded(partial(make, p) for p in missing)
    bundle_digest = await anyio.to_thread.run_sync(_assemble, store, art, facts, target)
    store.remember(ref.registry, ref.repository, digest)
    return PullResult(target, digest, bundle_digest, transfer)


def _bundle_digest(path: Path) -> bytes:
    try:
        with smolformat.open_bundle(path) as bundle:
            return bundle.digest
    except smolformat.FormatError as exc:
        raise BundleError(f"{path}: {exc}") from None


def _apply(store: BlobStore, piece: artifact.Piece, patch_digest: str, base: str, patch: bytes) -> None:
    """Make a piece from its patch and its base (in the store), check its digest, store it."""
    data = artifact.apply_patch(patch, store.path(base).read_bytes(), piece.size, patch_digest)
    if "sha256:" + hashlib.sha256(data).hexdigest() != piece.digest:
        raise RegistryError(f"patch {patch_digest} does not make chunk {piece.digest}: the registry's copy is wrong")
    with store.writing(piece.digest) as file:
        file.write(data)
