"""Push and pull MiB/s to a local registry, beside ``skopeo copy`` of an OCI layout of the same size.

Run: ``python bench/bench_registry.py [--bundle PATH [--second PATH] | --synthetic MIB] [--repeat 3]``. Starts Debian's
docker-registry on 127.0.0.1 (as the tests do), then per repeat, each into a fresh repository and an
empty local store: ``smolvmm.push`` of the bundle, ``smolvmm.pull`` of it to a file (fetch, assemble,
verify), and ``skopeo copy`` of an OCI image layout whose layers have the same sizes as the bundle's
blobs (random bytes in gzip, so that skopeo sends them as they are) to and from the same registry.
Also a second save of the same guest (``--second``, a later save of ``--bundle``'s guest; else a
synthetic small change to the synthetic RAM): what its push and pull move. Prints Markdown.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the registry fixture of the tests

from common import machine_info  # noqa: E402
from registry_server import registry_server  # noqa: E402
from test_registry import make_bundle, second_save  # noqa: E402

import smolvmm  # noqa: E402
from smolformat import open_bundle, samples  # noqa: E402
from smolvmm.registry import artifact  # noqa: E402
from smolvmm.registry.store import BlobStore  # noqa: E402

MIB = 1 << 20


def _oci_layout(directory: Path, sizes: list[int]) -> int:
    """An OCI image layout whose layers are gzip'ed random bytes of ``sizes``; returns its blob bytes."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    rng = random.Random(5)

    def put(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    layers = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(gzip.compress(rng.randbytes(size), 1))}
        for size in sizes
    ]
    config = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        **put(
            json.dumps(
                {
                    "architecture": "amd64",
                    "os": "linux",
                    "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
                }
            ).encode()
        ),
    }
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": layers,
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **put(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "bench"},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return sum(layer["size"] for layer in layers)


def _timed(call, *args, **kwargs) -> float:  # noqa: ANN001, ANN002, ANN003
    start = time.perf_counter()
    call(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle to push (default: a synthetic one)")
    parser.add_argument("--second", type=Path, help="a later save of --bundle's guest (default: a synthetic one)")
    parser.add_argument("--synthetic", type=int, default=256, metavar="MIB", help="synthetic guest RAM (default 256)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
        work = Path(tmp)
        memory = None
        bundle = args.bundle
        if bundle is None:
            memory = samples.realistic_memory(args.synthetic * MIB, seed=11)
            bundle = work / "first.smolmachine"
            make_bundle(bundle, memory, vcpu_seed=1)
        size = bundle.stat().st_size
        with open_bundle(bundle) as opened:
            plan = artifact.plan(opened, size)
        sizes = [sum(s for _, s in plan.state_ranges())] + [c.size for c in plan.chunks]
        layout = work / "layout"
        layout_bytes = _oci_layout(layout, sizes)
        results: dict[str, list[float]] = {"push": [], "pull": [], "skopeo push": [], "skopeo pull": []}
        with registry_server(work / "registry") as registry:
            for run in range(args.repeat):
                store = BlobStore(work / f"store{run}")
                ref = f"{registry.address}/bench/run{run}:v1"
                results["push"].append(_timed(anyio.run, partial(smolvmm.push, bundle, ref, store=store)))
                pull_store = BlobStore(work / f"pull-store{run}")
                out = work / f"pulled{run}.smolmachine"
                results["pull"].append(_timed(anyio.run, partial(smolvmm.pull, ref, out, store=pull_store)))
                assert out.read_bytes() == bundle.read_bytes()
                out.unlink()
                dest = f"docker://{registry.address}/bench/skopeo{run}:v1"
                results["skopeo push"].append(
                    _timed(
                        subprocess.run,
                        ["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:bench", dest],
                        check=True,
                    )
                )
                back = work / f"back{run}"
                results["skopeo pull"].append(
                    _timed(
                        subprocess.run,
                        ["skopeo", "copy", "-q", "--src-tls-verify=false", dest, f"oci:{back}:bench"],
                        check=True,
                    )
                )
                shutil.rmtree(back)
            second = None
            later = args.second
            if memory is not None:
                later = work / "second.smolmachine"
                make_bundle(later, second_save(memory), vcpu_seed=2)
            if later is not None:
                store = BlobStore(work / "store-gen")
                ref = f"{registry.address}/bench/generations"
                anyio.run(partial(smolvmm.push, bundle, f"{ref}:one", store=store))
                pushed = anyio.run(partial(smolvmm.push, later, f"{ref}:two", store=store))
                anyio.run(partial(smolvmm.pull, f"{ref}:one", work / "one.smolmachine", store=store))
                pulled = anyio.run(partial(smolvmm.pull, f"{ref}:two", work / "two.smolmachine", store=store))
                second = (later.stat().st_size, pushed.transfer.moved, pulled.transfer.moved)
    print(f"machine: {machine_info()}")
    print(
        f"bundle: {bundle if args.bundle else f'synthetic {args.synthetic} MiB RAM'}, {size / MIB:.1f} MiB,"
        f" {len(plan.chunks)} chunks + state; OCI layout for skopeo: {layout_bytes / MIB:.1f} MiB in {len(sizes)} layers\n"
    )
    print("| transfer | MiB/s median (min-max) | s median |")
    print("| --- | --- | --- |")
    for name, times in results.items():
        rates = [size / MIB / t for t in times]
        print(
            f"| {name} | {statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) | {statistics.median(times):.2f} |"
        )
    if second:
        whole, sent, fetched = second
        print(
            f"\nsecond save of the same guest ({whole / MIB:.1f} MiB): push sent {sent / MIB:.2f} MiB"
            f" ({100 * sent / whole:.1f} %), pull after the first fetched {fetched / MIB:.2f} MiB ({100 * fetched / whole:.1f} %)"
        )


if __name__ == "__main__":
    main()
