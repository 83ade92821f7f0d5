"""``smolvmm kernel build``: build the minimal guest kernel from Debian's source into the cache."""

from __future__ import annotations

import argparse

from smolvmm.cli import output as cli_output
from smolvmm.cli import status as cli_status
from smolvmm.cli.args import positive_int


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser(
        "build",
        help="build the minimal kernel (--kernel minimal) unless the cache holds it for this source and"
        " configuration; the compile runs under nice -n 19",
    )
    build.add_argument("--jobs", type=positive_int, help="parallel compile jobs (default: one per CPU)")
    build.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def run(name: str, args: argparse.Namespace) -> int:
    from smolvmm.kernel.build import minimal_kernel

    built = minimal_kernel(args.jobs)
    if args.json:
        cli_output.result_json(
            {
                "kernel": str(built.kernel),
                "config": str(built.config),
                "source": built.source,
                "build_seconds": built.seconds,
                "jobs": built.jobs,
            }
        )
    else:
        cli_output.result(
            f"{built.kernel} ({built.source}, built in {built.seconds:.0f} s with {built.jobs} jobs; .config: {built.config})"
        )
    return cli_status.OK
