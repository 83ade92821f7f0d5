"""Re-encoding a bundle (raw <-> zstd) without changing what it holds."""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .pages import MIN_DEDUP_RUN, MIN_ZERO_GAP
from .reader import open_bundle
from .writer import BundleContents, close_mapping, write_bundle


def repack_bundle(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    memory_encoding: str,
    disk_encoding: str | None = None,
    threads: int = 2,
    min_dedup_run: int = MIN_DEDUP_RUN,
    min_zero_gap: int = MIN_ZERO_GAP,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> bytes:
    """Write ``source``'s contents to ``target`` in another encoding; returns the new digest.

    RAM is decoded into anonymous mappings and disks into sparse temp files beside ``target``.
    Sections of unknown kinds and the SIGNATURE are carried over unchanged: a signature signs
    the content, which a re-encoding keeps. ``progress(step, done, total)`` reports the bytes of
    each step ("read", "write"; the size written is not known beforehand: its total is None).
    """
    target_dir = Path(target).resolve().parent
    with (
        open_bundle(source) as bundle,
        tempfile.TemporaryDirectory(dir=target_dir, prefix=".repack.") as scratch,
    ):
        memory = [mmap.mmap(-1, region.size) for region in bundle.config.ram]
        try:
            total = sum(region.size for region in bundle.config.ram)
            total += sum(bundle.disk(index).size for index in range(bundle.disk_count))
            report = progress or (lambda step, done, total: None)
            report("read", 0, total)
            bundle.read_memory_into(memory, threads)
            done = sum(region.size for region in bundle.config.ram)
            report("read", done, total)
            disks = []
            for index in range(bundle.disk_count):
                disk_path = Path(scratch) / f"disk{index}"
                bundle.disk(index).materialise(disk_path)
                disks.append(disk_path)
                done += bundle.disk(index).size
                report("read", done, total)
            contents = BundleContents(
                config=bundle.config,
                vcpus=bundle.vcpus,
                vm_state=bundle.vm_state,
                devices=bundle.devices,
                memory=memory,
                disks=disks,
                kernel=bundle.kernel,
                initrd=bundle.initrd,
                metadata=bundle.metadata,
                unknown_sections=bundle.unknown_sections(),
                signatures=bundle.signatures,
                working_set=bundle.working_set,
            )
            return write_bundle(
                target,
                contents,
                memory_encoding=memory_encoding,
                disk_encoding=disk_encoding,
                threads=threads,
                min_dedup_run=min_dedup_run,
                min_zero_gap=min_zero_gap,
                progress=lambda written: report("write", written, None),
            )
        finally:
            for mapping in memory:
                close_mapping(mapping)
