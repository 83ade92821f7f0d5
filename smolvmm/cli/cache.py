"""``smolvmm cache ls|prune``: what the cache holds (guest images, packages, materialised disks), and
removing what is stale."""

from __future__ import annotations

import argparse

from smolvmm.cli import output as cli_output
from smolvmm.cli import status as cli_status
from smolvmm.cli.output import size


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("ls", help="list every entry with its size and whether it is stale")
    listing.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    prune = actions.add_parser(
        "prune",
        help="remove stale entries: images and packages superseded by newer builds, disks of bundles"
        " unused for a week, leftovers of interrupted builds",
    )
    prune.add_argument("--all", action="store_true", help="remove everything (it is rebuilt when needed)")
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")


def run(name: str, args: argparse.Namespace) -> int:
    from smolvmm.config import cache_root
    from smolvmm.images.cache import cache_entries, prune_cache

    root = cache_root()
    entries = cache_entries()
    if args.action == "ls":
        if args.json:
            cli_output.result_json(
                {
                    "path": str(root),
                    "entries": [
                        {"path": str(e.path), "kind": e.kind, "bytes": e.size, "stale": e.stale, "why": e.why}
                        for e in entries
                    ],
                }
            )
            return cli_status.OK
        stale = sum(e.size for e in entries if e.stale)
        lines = [f"{root}: {size(sum(e.size for e in entries))} in {len(entries)} entries, {size(stale)} stale"]
        lines += [
            f"  {e.kind:<13}{size(e.size):>12}  {('stale: ' + e.why) if e.stale else 'current':<38} {e.path.relative_to(root)}"
            for e in entries
        ]
        cli_output.result("\n".join(lines))
        return cli_status.OK
    doomed = entries if args.all else [e for e in entries if e.stale]
    for entry in doomed:
        cli_output.message(f"{'would remove' if args.dry_run else 'removing'} {entry.path} ({size(entry.size)})")
    freed = sum(e.size for e in doomed) if args.dry_run else prune_cache(doomed)
    verb = "would free" if args.dry_run else "freed"
    cli_output.result(f"{root}: {verb} {size(freed)} ({len(doomed)} entries)")
    return cli_status.OK
