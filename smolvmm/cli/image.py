"""``build --image SOURCE`` / ``build -f Smolfile``, and ``run`` of a bundle built from an image."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Literal

import smolvmm
from smolvmm import MINIMAL_KERNEL, ConfigError, ImageRecipe, NetConfig, ReadyCondition
from smolvmm.cli import output as cli_output
from smolvmm.cli import status as cli_status
from smolvmm.cli.args import as_flags, non_empty, path
from smolvmm.cli.signals import cancelled_by_signal
from smolvmm.config import parse_size


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """The image flags of ``build`` (beside the machine flags)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--image",
        type=non_empty,
        metavar="SOURCE",
        help="build from a container image: oci:DIR[:TAG],"
        " docker-archive:FILE, docker://REGISTRY/REPO[:TAG|@DIGEST] or rootfs:PATH",
    )
    source.add_argument("-f", "--file", type=path, metavar="SMOLFILE", help="build from a Smolfile (TOML recipe)")
    parser.add_argument(
        "--disk-size", metavar="SIZE", help="free space on the image's disk beyond its content (default 256M)"
    )
    parser.add_argument(
        "--warm",
        action="append",
        default=[],
        metavar="CMD",
        help="a command run in the guest before the snapshot (repeatable; end a server with &)",
    )
    parser.add_argument("--ready-port", metavar="PORT", help="save once a TCP port listens in the guest")
    parser.add_argument("--ready-exec", metavar="CMD", help="save once CMD succeeds in the guest")
    parser.add_argument(
        "--insecure", action="store_true", help="allow plain HTTP and unverified TLS to a docker:// registry"
    )


def image_build_requested(args: argparse.Namespace) -> bool:
    """Whether ``build`` builds from an image; if not, a flag only an image build uses is a usage error."""
    if args.image is not None or args.file is not None:
        return True
    for flag, value in (
        ("--disk-size", args.disk_size),
        ("--warm", args.warm),
        ("--ready-port", args.ready_port),
        ("--ready-exec", args.ready_exec),
        ("--insecure", args.insecure),
    ):
        if value:
            raise ConfigError(f"{flag} goes with --image or -f: the built-in guest and --kernel have no image")
    return False


def _recipe(args: argparse.Namespace) -> ImageRecipe:
    if args.kernel not in (None, MINIMAL_KERNEL):
        raise ConfigError(
            "--kernel BZIMAGE does not go with --image or -f: the image guest brings its own (or --kernel minimal)"
        )
    for flag, value in (
        ("--initrd", args.initrd),
        ("--cmdline", args.cmdline),
        ("--disk", args.disk),
        ("--bootable", args.bootable),
    ):
        if value:
            raise ConfigError(f"{flag} does not go with --image or -f: the image guest brings its own")
    ready_flags: tuple[tuple[Literal["port", "exec", "marker"], Any], ...] = (
        ("port", args.ready_port),
        ("exec", args.ready_exec),
        ("marker", args.ready_marker),
    )
    readies = [(kind, value) for kind, value in ready_flags if value]
    if len(readies) > 1:
        raise ConfigError("give one of --ready-port, --ready-exec, --ready-marker")
    flags: dict[str, object] = {"timeout": args.timeout}
    if args.insecure:
        flags["insecure"] = True
    if args.kernel:
        flags["kernel"] = MINIMAL_KERNEL
    if args.cpus:
        flags["vcpus"] = args.cpus
    if args.mem:
        flags["memory"] = args.mem  # bytes already (--mem is parsed by argparse)
    if args.disk_size:
        flags["disk_headroom"] = parse_size(args.disk_size)
    if args.warm:
        flags["warm"] = tuple(args.warm)
    if readies:
        flags["ready"] = ReadyCondition(*readies[0])
    if args.net:
        flags["networks"] = NetConfig.parse_flags(args.net)
    try:
        if args.file:
            return smolvmm.load_smolfile(args.file, **flags)
        return ImageRecipe(args.image, **flags)  # type: ignore[arg-type]  # flags hold each field's own type
    except ConfigError as exc:  # say which flag, as the user wrote it
        raise as_flags(exc) from None


async def build_from_image(args: argparse.Namespace) -> int:
    """``build --image`` / ``build -f``: build, save, print the bundle's digest (``--json``: a document)."""
    recipe = _recipe(args)
    progress = cli_output.message if cli_output.is_terminal(sys.stderr) else None
    encoding = "zstd" if args.zstd else "raw"
    timings: dict[str, float] = {}
    digest = b""
    async with cancelled_by_signal() as received:
        digest = await smolvmm.build_image(
            recipe,
            args.output,
            encoding=encoding,
            progress=progress,
            note=lambda text: cli_output.message(f"note: {text}"),
            timings=timings,
        )
    if received:  # the build was cancelled: nothing was written, its scratch directory is gone
        return cli_status.SIGNAL_BASE + received[0]
    if args.json:
        from smolvmm.cli.bundle import sizes

        cli_output.result_json(
            {
                "path": str(args.output),
                "digest": digest.hex(),
                "encoding": encoding,
                "image": recipe.image,
                "sizes": sizes(args.output),
                "timings": timings,
            }
        )
    else:
        cli_output.result(f"{args.output}: {digest.hex()[:16]}")
    return cli_status.OK
