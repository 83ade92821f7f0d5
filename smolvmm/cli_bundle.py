"""``smolvmm inspect|verify|pack``: look into, check and re-encode .smolmachine bundles."""

from __future__ import annotations

import argparse
import json
from typing import Any

import smolvmm
from smolvmm import BundleError

_MIB = 1 << 20


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """Declare the arguments of ``name`` (inspect, verify or pack)."""
    if name == "pack":
        encoding = parser.add_mutually_exclusive_group(required=True)
        encoding.add_argument(
            "--zstd",
            dest="encoding",
            action="store_const",
            const="zstd",
            help="zstd chunks: smallest, for shipping",
        )
        encoding.add_argument(
            "--raw",
            dest="encoding",
            action="store_const",
            const="raw",
            help="raw pages: restore maps RAM straight from the file",
        )
        parser.add_argument("--smallest", action="store_true",
                            help="with --raw: leave out every zero page and store every repeated page once"
                                 " (a smaller file, but many more mappings: a slower restore)")
        parser.add_argument("--threads", type=int, default=2, help="compression/decoding threads")
        parser.add_argument("source", metavar="IN")
        parser.add_argument("target", metavar="OUT")
        return
    parser.add_argument("bundle", metavar="BUNDLE")
    if name == "inspect":
        parser.add_argument("--json", action="store_true", help="print one JSON document")
    if name == "verify":
        parser.add_argument("--trusted-keys", metavar="DIR",
                            help="also require a valid signature by one of the Ed25519 public keys (*.pub, PEM) in DIR")


def run(name: str, args: argparse.Namespace) -> int:
    """Run ``name``; a bad bundle raises BundleError (one line, exit 2 for verify)."""
    import smolformat

    try:
        if name == "pack":
            finest = {"min_dedup_run": 1, "min_zero_gap": 1} if args.smallest else {}
            smolformat.repack_bundle(
                args.source, args.target, memory_encoding=args.encoding, threads=args.threads, **finest
            )
            print(f"{args.target}: packed ({args.encoding})")
        elif name == "verify":
            bundle = smolformat.verify_bundle(args.bundle)
            signed = f", {len(bundle.signatures)} signature(s) not checked: --trusted-keys DIR checks them"
            if args.trusted_keys is not None:
                signed = f", signed by {smolvmm.verify_signed_bundle(args.bundle, args.trusted_keys)}"
            elif not bundle.signatures:
                signed = ", unsigned"
            print(f"{args.bundle}: ok ({len(bundle.sections)} sections, digest {bundle.digest.hex()[:16]}{signed})")
        else:
            with smolformat.open_bundle(args.bundle) as bundle:
                summary = describe(bundle)
            print(json.dumps(summary, indent=2) if args.json else _table(summary))
    except smolformat.FormatError as exc:
        raise BundleError(f"{getattr(args, 'bundle', None) or args.source}: {exc}") from exc
    except OSError as exc:  # e.g. a full disk: the target is written atomically, so nothing is left
        where = exc.filename or (args.target if name == "pack" else args.bundle)
        raise BundleError(f"{where}: {exc.strerror or exc}") from exc
    return 0


def describe(bundle: Any) -> dict[str, Any]:
    """A JSON-able summary: machine, metadata, and every section with its size and ratio."""
    config = bundle.config
    meta = bundle.metadata
    return {
        "path": bundle.path,
        "format_version": "{}.{}".format(*bundle.version),
        "digest": bundle.digest.hex(),
        "arch": str(config.arch),
        "vcpus": config.vcpu_count,
        "ram": [{"gpa": r.gpa, "size": r.size} for r in config.ram],
        "cmdline": config.cmdline,
        "devices": [
            {"kind": str(d.kind), "bus": str(d.bus), "base": d.base, "size": d.size, "gsi": d.gsi}
            for d in config.devices
        ],
        "memory_encoding": bundle.memory_encoding,
        "signatures": [{"algorithm": r.algorithm, "public_key": r.public_key.hex()} for r in bundle.signatures],
        "metadata": None
        if meta is None
        else {
            "creator": meta.creator,
            "created_unix_ns": meta.created_unix_ns,
            "hypervisor": meta.hypervisor,
            "parent_digest": meta.parent_digest.hex(),
            "labels": {label.key: label.value for label in meta.labels},
        },
        "sections": [
            {
                "kind": s.kind.name.lower() if hasattr(s.kind, "name") else int(s.kind),
                "index": s.index,
                "encoding": s.encoding.name.lower() if hasattr(s.encoding, "name") else int(s.encoding),
                "offset": s.offset,
                "length": s.length,
                "logical_length": s.logical_length,
                "ratio": round(s.logical_length / s.length, 2) if s.length else None,
            }
            for s in bundle.sections
        ],
    }


def _table(summary: dict[str, Any]) -> str:
    ram = sum(r["size"] for r in summary["ram"])
    lines = [
        f"{summary['path']}: smolmachine {summary['format_version']}, digest {summary['digest'][:16]}",
        f"  arch {summary['arch']}, {summary['vcpus']} vCPUs, {ram / _MIB:.0f} MiB RAM"
        f" in {len(summary['ram'])} regions, memory {summary['memory_encoding']}",
        f"  cmdline: {summary['cmdline']}",
    ]
    meta = summary["metadata"]
    if meta:
        labels = ", ".join(f"{k}={v}" for k, v in meta["labels"].items())
        lines.append(
            f"  made by {meta['creator']} on {meta['hypervisor']}" + (f"; labels {labels}" if labels else "")
        )
    lines.append("  devices:")
    lines += [
        f"    {d['kind']:<15} {d['bus']} {d['base']:#x}+{d['size']:#x} gsi {d['gsi']}"
        for d in summary["devices"]
    ]
    row = "  {:<14}{:>3} {:<12}{:>12}{:>14}{:>15}{:>10}"
    lines.append(row.format("section", "#", "encoding", "offset", "stored", "logical", "ratio"))
    for s in summary["sections"]:
        ratio = "" if s["ratio"] is None else f"{s['ratio']:.2f}"
        cells = (s["kind"], s["index"], s["encoding"], s["offset"], s["length"], s["logical_length"], ratio)
        lines.append(row.format(*cells))
    return "\n".join(lines)
