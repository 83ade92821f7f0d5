"""``smolvmm inspect|verify|pack``: look into, check and re-encode .smolmachine bundles."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import smolvmm
from smolvmm import BundleError, ConfigError, SmolvmmError
from smolvmm.cli import output as cli_output
from smolvmm.cli import progress as cli_progress
from smolvmm.cli.args import positive_int

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
        parser.add_argument(
            "--smallest",
            action="store_true",
            help="with --raw: leave out every zero page and store every repeated page once"
            " (a smaller file, but many more mappings: a slower restore)",
        )
        parser.add_argument("--threads", type=positive_int, default=2, help="compression/decoding threads")
        parser.add_argument("source", metavar="IN")
        parser.add_argument("target", metavar="OUT")
        return
    parser.add_argument("bundle", metavar="BUNDLE")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    if name == "verify":
        parser.add_argument(
            "--trusted-keys",
            metavar="DIR",
            help="also require a valid signature by one of the Ed25519 public keys (*.pub, PEM) in DIR",
        )


@contextlib.contextmanager
def _errors(source: str, target: str | None = None) -> Iterator[None]:
    """A bad or unreadable bundle as BundleError naming ``source``; a failed write as SmolvmmError
    naming ``target`` (not the temp files it is written through: those are our business)."""
    import smolformat

    try:
        yield
    except smolformat.FormatError as exc:
        raise BundleError(f"{source}: {exc}") from exc
    except BrokenPipeError:
        raise
    except OSError as exc:
        if target is None or exc.filename == source:
            raise BundleError(f"{source}: {exc.strerror or exc}") from exc
        # e.g. a full disk: the target is written atomically, so nothing is left
        raise SmolvmmError(f"{target}: {exc.strerror or exc}") from exc


def run(name: str, args: argparse.Namespace) -> int:
    """Run ``name``: a bad bundle raises BundleError, any other failure a SmolvmmError (one line)."""
    import smolformat

    if name == "pack":
        if os.path.isdir(args.target):
            raise ConfigError(f"{args.target} is a directory: name the file to write")
        finest: dict[str, Any] = {"min_dedup_run": 1, "min_zero_gap": 1} if args.smallest else {}
        with _errors(args.source, args.target), cli_progress.steps() as shown:

            def report(step: str, done: int, total: int | None) -> None:
                if shown is not None:
                    shown(f"reading {args.source}" if step == "read" else f"writing {args.target}", done, total)

            smolformat.repack_bundle(
                args.source, args.target, memory_encoding=args.encoding, threads=args.threads, progress=report, **finest
            )
        cli_output.result(f"{args.target}: packed ({args.encoding})")
    elif name == "verify":
        return _verify(args.bundle, args.json, args.trusted_keys)
    else:
        with _errors(args.bundle), smolformat.open_bundle(args.bundle) as bundle:
            summary = describe(bundle)
        if args.json:
            cli_output.result_json(summary)
        else:
            cli_output.result(_table(summary))
    return 0


def _verify(path: str, as_json: bool, trusted_keys: str | None) -> int:
    import smolformat

    signer = None
    try:
        with _errors(path), cli_progress.steps() as shown:
            bundle = smolformat.verify_bundle(
                path, None if shown is None else lambda done, total: shown(f"verifying {path}", done, total)
            )
        if trusted_keys is not None:
            signer = smolvmm.verify_signed_bundle(path, trusted_keys)
    except SmolvmmError as exc:
        if as_json:
            cause = exc.__cause__
            code = cause.code if isinstance(cause, smolformat.FormatError) else None
            cli_output.result_json({"path": path, "ok": False, "error": str(exc), "code": code})
        raise
    if as_json:
        cli_output.result_json(
            {
                "path": path,
                "ok": True,
                "sections": len(bundle.sections),
                "digest": bundle.digest.hex(),
                "signatures": len(bundle.signatures),
                "signed_by": signer,
            }
        )
        return 0
    if signer is not None:
        signed = f", signed by {signer}"
    elif bundle.signatures:
        signed = f", {len(bundle.signatures)} signature(s) not checked: --trusted-keys DIR checks them"
    else:
        signed = ", unsigned"
    cli_output.result(f"{path}: ok ({len(bundle.sections)} sections, digest {bundle.digest.hex()[:16]}{signed})")
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


def sizes(path: Path) -> dict[str, Any]:
    """The bundle at ``path`` as ``build --json`` reports it: the file's size, and for guest RAM
    and each disk the bytes held (logical) and stored in the file."""
    import smolformat

    with smolformat.open_bundle(path) as bundle:
        sections = describe(bundle)["sections"]

    def held(kind: str) -> list[dict[str, int]]:
        return [{"logical": s["logical_length"], "stored": s["length"]} for s in sections if s["kind"] == kind]

    ram = held("memory_data")
    return {"file": path.stat().st_size, "ram": ram[0] if ram else None, "disks": held("disk_data")}


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
        lines.append(f"  made by {meta['creator']} on {meta['hypervisor']}" + (f"; labels {labels}" if labels else ""))
    lines.append("  devices:")
    lines += [
        f"    {d['kind']:<15} {d['bus']} {d['base']:#x}+{d['size']:#x} gsi {d['gsi']}" for d in summary["devices"]
    ]
    row = "  {:<14}{:>3} {:<12}{:>12}{:>14}{:>15}{:>10}"
    lines.append(row.format("section", "#", "encoding", "offset", "stored", "logical", "ratio"))
    for s in summary["sections"]:
        ratio = "" if s["ratio"] is None else f"{s['ratio']:.2f}"
        cells = (s["kind"], s["index"], s["encoding"], s["offset"], s["length"], s["logical_length"], ratio)
        lines.append(row.format(*cells))
    return "\n".join(lines)
