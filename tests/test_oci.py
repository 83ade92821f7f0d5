"""Image sources and layer application: faithful unpacking, and hostile images refused in one line."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from smolvmm.errors import ImageError
from smolvmm.oci.imageconfig import DEFAULT_PATH, ImageConfig
from smolvmm.oci.layers import Budget, apply_layers
from smolvmm.oci.manifest import Layer
from smolvmm.oci.registry import parse_reference
from smolvmm.oci.source import open_source, split_reference
from smolvmm.registry.reference import Reference


def make_tar(*entries: tarfile.TarInfo | tuple[str, bytes]) -> bytes:
    """A PAX tar of ``entries``: (name, data) for a file, or a prepared TarInfo."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                archive.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size, info.mode = len(entry[1]), 0o644
                archive.addfile(info, io.BytesIO(entry[1]))
    return buffer.getvalue()


def info(name: str, kind: bytes, **fields: object) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.mode = 0o755 if kind == tarfile.DIRTYPE else 0o777 if kind == tarfile.SYMTYPE else 0o644
    for key, value in fields.items():
        setattr(member, key, value)
    return member


def layer(data: bytes, name: str = "test") -> Layer:
    return Layer(name, len(data), lambda: io.BytesIO(data))


def apply(root: Path, *tars: bytes, budget: int = 1 << 30) -> list[str]:
    return apply_layers(root, [layer(data, str(n)) for n, data in enumerate(tars)], Budget(budget))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The build directory's root; a sibling ``outside`` directory must stay empty."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


def outside_is_untouched(root: Path) -> bool:
    return list((root.parent / "outside").iterdir()) == [] and sorted(p.name for p in root.parent.iterdir()) == [
        "outside",
        "root",
    ]


def test_layers_apply_in_order_with_whiteouts_opaque_dirs_links_and_metadata(root: Path) -> None:
    lower = make_tar(
        info("usr", tarfile.DIRTYPE),
        info("usr/lib", tarfile.DIRTYPE),
        info("lib", tarfile.SYMTYPE, linkname="usr/lib"),
        ("usr/lib/keep.so", b"keep"),
        ("etc/doomed", b"doomed"),
        info("etc/old", tarfile.DIRTYPE),
        ("etc/old/a", b"a"),
        ("etc/old/b", b"b"),
        ("data/secret", b"s3cret"),
        info("data/secret", tarfile.REGTYPE, size=0),  # replaced below by a later entry of the same layer
    )
    upper = make_tar(
        info("etc/.wh.doomed", tarfile.REGTYPE),
        ("etc/old/new", b"new"),
        info("etc/old/.wh..wh..opq", tarfile.REGTYPE),
        ("lib/through-symlink.so", b"in usr/lib"),  # merged /usr: written through lib -> usr/lib
        info("srv", tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1001),
        info("srv/run.sh", tarfile.REGTYPE, mode=0o4755, uid=1000, gid=1001, mtime=1_600_000_000),
        info("srv/link", tarfile.LNKTYPE, linkname="srv/run.sh"),
        info("srv/fifo", tarfile.FIFOTYPE),
        info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3),
    )
    notes = apply(root, lower, upper)
    assert not (root / "etc/doomed").exists()
    assert sorted(os.listdir(root / "etc/old")) == ["new"]  # opaque: lower a, b gone; this layer's new kept
    assert (root / "usr/lib/through-symlink.so").read_bytes() == b"in usr/lib"
    assert (root / "lib").is_symlink() and (root / "usr/lib/keep.so").read_bytes() == b"keep"
    run = (root / "srv/run.sh").stat()
    assert stat.S_IMODE(run.st_mode) == 0o4755 and (run.st_uid, run.st_gid) == (1000, 1001)
    assert run.st_mtime == 1_600_000_000 and run.st_nlink == 2
    assert (root / "srv/link").stat().st_ino == run.st_ino
    assert stat.S_IMODE((root / "srv").stat().st_mode) == 0o750
    assert stat.S_ISFIFO((root / "srv/fifo").lstat().st_mode)
    assert not (root / "dev/null").exists() and any("device node dev/null" in note for note in notes)
    assert (root / "data/secret").read_bytes() == b""


def test_xattrs_are_kept(root: Path) -> None:
    member = info("file", tarfile.REGTYPE, pax_headers={"SCHILY.xattr.user.smolvmm": "yes"})
    notes = apply(root, make_tar(member))
    try:
        assert os.getxattr(root / "file", "user.smolvmm") == b"yes"
    except OSError:  # a filesystem without user xattrs: then a note says so
        assert any("xattr user.smolvmm" in note for note in notes)


HOSTILE = {
    "dot-dot": [("../outside/pwned", b"x")],
    "absolute": [("/tmp/pwned", b"x")],
    "symlink-relative": [info("escape", tarfile.SYMTYPE, linkname="../../outside"), ("escape/pwned", b"x")],
    "symlink-absolute": [info("escape", tarfile.SYMTYPE, linkname="/outside-abs"), ("escape/pwned", b"x")],
    "symlink-chain": [
        info("a", tarfile.SYMTYPE, linkname="b/../.."),
        info("b", tarfile.DIRTYPE),
        ("a/outside/pwned", b"x"),
    ],
    "hardlink-out": [info("pw", tarfile.LNKTYPE, linkname="../outside/target")],
    "hardlink-through-symlink": [
        info("up", tarfile.SYMTYPE, linkname=".."),
        info("pw", tarfile.LNKTYPE, linkname="up/outside/target"),
    ],
    "tar-bomb": [info("bomb", tarfile.REGTYPE, size=1 << 40)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_refused_in_one_line_and_nothing_escapes(root: Path, case: str) -> None:
    entries = HOSTILE[case]
    data = make_tar(*entries) if case != "tar-bomb" else make_tar(*entries)[:4096]  # header only: bytes never sent
    with pytest.raises(ImageError) as raised:
        apply(root, data, budget=1 << 30)
    assert "\n" not in str(raised.value) and str(raised.value).startswith("layer 0")
    assert outside_is_untouched(root)


@pytest.mark.parametrize("name", [".wh.", ".wh..", ".wh...", "etc/.wh.", "etc/.wh..", "etc/.wh..."])
def test_a_whiteout_of_the_root_or_its_parent_is_refused_and_removes_nothing(root: Path, name: str) -> None:
    lower = make_tar(info("etc", tarfile.DIRTYPE), ("etc/kept", b"kept"), ("top", b"top"))
    with pytest.raises(ImageError) as raised:
        apply(root, lower, make_tar(info(name, tarfile.REGTYPE)))
    message = str(raised.value)
    assert message.startswith(f"layer 1: entry {name!r} has an invalid name") and "\n" not in message
    assert (root / "etc/kept").read_bytes() == b"kept" and (root / "top").read_bytes() == b"top"
    assert outside_is_untouched(root)


def test_an_opaque_whiteout_at_the_top_empties_the_root_of_the_layers_below(root: Path) -> None:
    lower = make_tar(info("etc", tarfile.DIRTYPE), ("etc/gone", b"gone"), ("top", b"top"))
    apply(root, lower, make_tar(("new", b"new"), info(".wh..wh..opq", tarfile.REGTYPE)))
    assert sorted(os.listdir(root)) == ["new"] and outside_is_untouched(root)


def test_a_layer_past_the_budget_stops_before_writing_it(root: Path) -> None:
    with pytest.raises(ImageError, match="tar bomb"):
        apply(root, make_tar(("small", b"x" * 10), ("big", b"y" * 100)), budget=50)
    assert not (root / "big").exists()


def _blob(layout: Path, data: bytes, media: str) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}


def make_layout(
    layout: Path, layers: list[bytes], config: dict, platform: str | None = None, rootfs: dict | None = None
) -> None:
    """An OCI layout of ``layers`` tagged v1; its config's ``rootfs`` lists the layers' diff_ids
    (the digests of their uncompressed tars) unless given."""
    uncompressed = [gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data for data in layers]
    diff_ids = [f"sha256:{hashlib.sha256(data).hexdigest()}" for data in uncompressed]
    config_doc = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids} if rootfs is None else rootfs,
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": _blob(layout, json.dumps(config_doc).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [_blob(layout, data, "application/vnd.oci.image.layer.v1.tar") for data in layers],
    }
    entry = _blob(layout, json.dumps(manifest).encode(), manifest["mediaType"])
    entry["annotations"] = {"org.opencontainers.image.ref.name": "v1"}
    if platform:
        entry["platform"] = dict(zip(("os", "architecture"), platform.split("/")))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))


def test_an_oci_layout_gives_its_config_and_verified_layers(tmp_path: Path) -> None:
    make_layout(tmp_path, [make_tar(("hello", b"hi"))], {"Env": ["A=1"], "WorkingDir": "/w", "Cmd": ["sh"]})
    with open_source(f"oci:{tmp_path}:v1", tmp_path) as image:
        assert image.config == ImageConfig(env=("A=1",), workdir="/w", cmd=("sh",))
        assert len(image.layers) == 1 and image.key.startswith("sha256:")
    with pytest.raises(ImageError, match="no image tagged 'v2'"):
        with open_source(f"oci:{tmp_path}:v2", tmp_path):
            pass


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_blob_is_refused(tmp_path: Path, damage: str) -> None:
    layer_data = make_tar(("hello", b"hi" * 100))
    make_layout(tmp_path, [layer_data], {})
    blob = tmp_path / "blobs/sha256" / hashlib.sha256(layer_data).hexdigest()
    blob.write_bytes(layer_data[:-1] + b"!" if damage == "flip" else layer_data[:100])
    expected = "does not match its digest" if damage == "flip" else "truncated or altered"
    with pytest.raises(ImageError, match=expected):
        with open_source(f"oci:{tmp_path}", tmp_path):
            pass


def _unpack(layout: Path, root: Path) -> None:
    with open_source(f"oci:{layout}:v1", layout) as image:
        apply_layers(root, image.layers, Budget(1 << 30))


def test_an_oci_layouts_layers_are_checked_against_the_configs_diff_ids(tmp_path: Path, root: Path) -> None:
    plain, other = make_tar(("hello", b"hi")), make_tar(("other", b"x"))
    layout = tmp_path / "layout"
    make_layout(layout, [gzip.compress(plain), plain], {})  # the diff_id of a compressed layer: its tar's
    _unpack(layout, root)
    assert (root / "hello").read_bytes() == b"hi"
    wrong = f"sha256:{hashlib.sha256(other).hexdigest()}"
    make_layout(layout, [gzip.compress(plain)], {}, rootfs={"type": "layers", "diff_ids": [wrong]})
    with pytest.raises(ImageError, match=rf"^layer 0 \(sha256:[0-9a-f]{{12}}\) does not match its digest {wrong}$"):
        _unpack(layout, root)
    for rootfs in ({"type": "layers", "diff_ids": []}, {"type": "layers", "diff_ids": [wrong, wrong]}, {}):
        make_layout(layout, [plain], {}, rootfs=rootfs)
        with pytest.raises(ImageError, match="rootfs.diff_ids do not list one sha256 digest per layer"):
            _unpack(layout, root)


def test_a_manifest_list_without_linux_amd64_says_what_it_has(tmp_path: Path) -> None:
    make_layout(tmp_path, [make_tar(("x", b"x"))], {}, platform="linux/arm64")
    with pytest.raises(ImageError, match=r"no linux/amd64 image \(platforms: linux/arm64\)"):
        with open_source(f"oci:{tmp_path}", tmp_path):
            pass


def test_source_names_and_references() -> None:
    assert split_reference("/a/b:tag") == ("/a/b", "tag")
    assert split_reference("/a/b") == ("/a/b", None)
    assert parse_reference("//127.0.0.1:5000/team/app:v2") == Reference("127.0.0.1:5000", "team/app", "v2")
    assert parse_reference("//debian") == Reference("registry-1.docker.io", "library/debian", "latest")
    assert parse_reference("//user/app:1") == Reference("registry-1.docker.io", "user/app", "1")
    digest = "sha256:" + "a" * 64
    assert parse_reference(f"//ghcr.io/o/r@{digest}").manifest_reference == digest
    for bad in ("//ghcr.io/o/R", "//ghcr.io/o/r@sha256:12", "ghcr.io/o/r"):
        with pytest.raises(ImageError):
            parse_reference(bad)
    with pytest.raises(ImageError, match="unknown image source"):
        with open_source("podman:x", Path(".")):
            pass


def test_image_config_defaults_and_commands() -> None:
    config = ImageConfig.from_image({"config": {"Env": ["B=2"], "Entrypoint": ["/e"], "Cmd": ["c"]}})
    assert config.environment()["PATH"] == DEFAULT_PATH and config.environment()["B"] == "2"
    assert config.command() == ["/e", "c"] and config.command(["ls"]) == ["ls"]
    assert ImageConfig.from_json(config.to_json()) == config
    with pytest.raises(ImageError, match="no Entrypoint or Cmd"):
        ImageConfig().command()
    with pytest.raises(ImageError, match="Env"):
        ImageConfig.from_image({"config": {"Env": "PATH=/x"}})
    assert ImageConfig.from_image({"os": "linux", "architecture": "amd64", "config": {"Cmd": ["c"]}}).cmd == ("c",)
    for other in ({"architecture": "arm64"}, {"os": "windows", "architecture": "amd64"}):
        with pytest.raises(ImageError, match=f"the image is for .*{other['architecture']}; the guest runs linux/amd64"):
            ImageConfig.from_image({**other, "config": {"Cmd": ["c"]}})


@pytest.mark.parametrize(
    ("args", "message", "status"),
    [
        (["--image", "oci:/nonexistent:app"], "is not an OCI image layout", 1),
        # --mem and --disk-size are taken (once parsed) and the build gets as far as the source
        (["--image", "oci:/nonexistent:app", "--mem", "256M", "--disk-size", "64M"], "not an OCI image layout", 1),
        (["--image", "podman:x"], "unknown image source 'podman:x'", 1),
        (["--image", "oci:/x", "--ready-port", "1", "--ready-exec", "true"], "give one of --ready-port", 2),
        (["--image", "oci:/x", "--kernel", "/boot/vmlinuz"], "--kernel BZIMAGE does not go with --image", 2),
        # the flags of an image build, on a build of the built-in guest: refused, not ignored
        (["--warm", "echo warmed > /tmp/w"], "--warm goes with --image or -f", 2),
        (["--ready-port", "80"], "--ready-port goes with --image or -f", 2),
        (["--ready-exec", "true"], "--ready-exec goes with --image or -f", 2),
        (["--disk-size", "1G"], "--disk-size goes with --image or -f", 2),
        (["--insecure"], "--insecure goes with --image or -f", 2),
    ],
)
def test_build_refuses_a_bad_image_in_one_line_and_writes_nothing(
    tmp_path: Path, args: list[str], message: str, status: int
) -> None:
    output = tmp_path / "app.smolmachine"
    result = subprocess.run(
        [sys.executable, "-m", "smolvmm", "build", *args, "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("smolvmm: error:")]
    assert result.returncode == status and len(errors) == 1 and message in errors[0]
    assert not output.exists()


def _as_nobody_when_root() -> list[str]:
    """A command prefix that drops root (who may write anywhere) but still reads the checkout."""
    reader = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *reader] if os.geteuid() == 0 else []


@pytest.mark.parametrize("recipe", ["--image", "-f"])
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-o", "missing/app.smolmachine"], "-o missing/app.smolmachine: missing is not a directory"),
        (["-o", "."], "-o . is a directory"),
        (["-o", "read-only/app.smolmachine"], "-o read-only/app.smolmachine: read-only is not writable"),
        (["-o", "app.smolmachine", "--cpus", "65"], "--cpus must be an int from 1 to 64, not 65"),
        (["-o", "app.smolmachine", "--mem", "99999G"], "--mem must be a number of bytes, a multiple of 2 MiB"),
    ],
)
def test_build_from_an_image_refuses_bad_flags_before_opening_the_image(
    tmp_path: Path, recipe: str, flags: list[str], message: str
) -> None:
    work = tmp_path / "work"
    for directory in (work, work / "layout", work / "read-only", work / "tmp", work / "cache"):
        directory.mkdir()
    make_layout(work / "layout", [make_tar(("hello", b"hi"))], {"Cmd": ["sh"]})
    (work / "Smolfile").write_text(f'image = "oci:{work / "layout"}:v1"\n')
    (work / "read-only").chmod(0o555)
    source = [recipe, f"oci:{work / 'layout'}:v1" if recipe == "--image" else "Smolfile"]
    as_nobody = _as_nobody_when_root() if "read-only" in flags[1] else []
    result = subprocess.run(
        [*as_nobody, sys.executable, "-m", "smolvmm", "build", *source, *flags],
        capture_output=True,
        text=True,
        cwd=work,
        env={**os.environ, "TMPDIR": str(work / "tmp"), "XDG_CACHE_HOME": str(work / "cache")},
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"smolvmm: error: {message}"), result.stderr
    assert list((work / "tmp").iterdir()) == []  # no build's scratch directory: nothing fetched or unpacked
    assert not (work / "cache/smolvmm/image-disks").exists() and not (work / "app.smolmachine").exists()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (["--image", "docker-archive:fifo"], "docker archive fifo is a FIFO, not a regular file"),
        (["--image", "docker-archive:/dev/zero"], "docker archive /dev/zero is a character device, not a regular file"),
        (["--image", "rootfs:fifo"], "rootfs fifo is a FIFO, not a directory or a tar archive"),
        (["--image", "rootfs:/dev/zero"], "rootfs /dev/zero is a character device, not a directory or a tar archive"),
        (["--image", "oci:layout:v1"], "OCI layout layout: index.json is a FIFO, not a regular file"),
        (["-f", "fifo"], "Smolfile fifo is a FIFO, not a file"),
        (["-f", "/dev/zero"], "Smolfile /dev/zero is a character device, not a file"),
    ],
)
def test_a_fifo_or_a_device_is_refused_before_it_is_read(tmp_path: Path, source: list[str], message: str) -> None:
    """Reading one would wait for a writer, or never end (/dev/zero)."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "layout").mkdir()
    make_layout(tmp_path / "layout", [make_tar(("hello", b"hi"))], {})
    (tmp_path / "layout/index.json").unlink()
    os.mkfifo(tmp_path / "layout/index.json")
    result = subprocess.run(
        [sys.executable, "-m", "smolvmm", "build", *source, "-o", "app.smolmachine"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        timeout=60,
    )
    assert result.returncode == (2 if source[0] == "-f" else 1), result.stderr
    assert result.stderr == f"smolvmm: error: {message}\n"


_STALLED_BOOT = """
import contextlib, sys, types
import anyio
import smolvmm.oci.build as build

@contextlib.asynccontextmanager
async def boot(config):
    print("booting", flush=True)  # the image is unpacked, its scratch directory full
    await anyio.sleep_forever()
    yield

build.image_guest = lambda minimal: types.SimpleNamespace(kernel=None, initrd=None, cmdline=None, ready_marker="up")
build.Machine = types.SimpleNamespace(boot=boot)
from smolvmm.cli.dispatch import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_ends_a_build_from_an_image_and_removes_its_scratch_directory(tmp_path: Path) -> None:
    """(The boot, which needs KVM, is stood in for by one that never ends.)"""
    make_layout(tmp_path / "layout", [make_tar(("hello", b"hi"))], {"Cmd": ["sh"]})
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    build = subprocess.Popen(
        [sys.executable, "-c", _STALLED_BOOT, "build", "--image", f"oci:{tmp_path / 'layout'}:v1", "--net", "none"]
        + ["-o", str(tmp_path / "app.smolmachine")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(scratch), "XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    try:
        assert build.stdout is not None and build.stdout.readline() == "booting\n"
        assert [p.name[:14] for p in scratch.iterdir()] == ["smolvmm-build-"]
        build.send_signal(signal.SIGTERM)
        _, errors = build.communicate(timeout=60)
    finally:
        build.kill()
    assert build.returncode == 128 + signal.SIGTERM and errors == ""
    assert list(scratch.iterdir()) == [] and not (tmp_path / "app.smolmachine").exists()


def _owner(disk: Path, path: str) -> tuple[int, int]:
    shown = subprocess.run(["debugfs", "-R", f"stat {path}", str(disk)], capture_output=True, text=True, check=True)
    found = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", shown.stdout)
    assert found, shown.stdout + shown.stderr
    return int(found.group(1)), int(found.group(2))


def test_a_disk_built_by_a_user_who_is_not_root_keeps_the_layers_owners() -> None:
    tar = make_tar(
        info("srv", tarfile.DIRTYPE, uid=1000, gid=1001),
        info("srv/run.sh", tarfile.REGTYPE, mode=0o4755, uid=1000, gid=1001),
        info("srv/link", tarfile.LNKTYPE, linkname="srv/run.sh"),  # a hard link: its target's owner
        info("srv/to-passwd", tarfile.SYMTYPE, linkname="/etc/passwd", uid=7, gid=8),
        ("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        ("opt/deep/x", b"x"),  # opt and opt/deep are made on the way: root's, as root's unpacking makes them
    )
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        work.chmod(0o777)  # the unprivileged builder's
        (work / "layout").mkdir()
        make_layout(work / "layout", [tar], {"Cmd": ["sh"]})
        script = (
            "import os, sys; from pathlib import Path\n"
            "from smolvmm.oci.rootdisk import root_disk; from smolvmm.oci.source import open_source\n"
            "with open_source(sys.argv[1], Path(sys.argv[2])) as image: print(root_disk(image, Path(sys.argv[2])))\n"
        )
        # Without CAP_CHOWN, but able to read the checkout wherever it lies (a 0700 directory, say).
        built = subprocess.run(
            [*_as_nobody_when_root(), sys.executable, "-c", script, f"oci:{work / 'layout'}:v1", str(work)],
            capture_output=True,
            text=True,
            env={**os.environ, "XDG_CACHE_HOME": str(work / "cache")},
            timeout=120,
        )
        assert built.returncode == 0, built.stderr
        disk = Path(built.stdout.strip())
        assert _owner(disk, "/srv") == _owner(disk, "/srv/run.sh") == _owner(disk, "/srv/link") == (1000, 1001)
        assert _owner(disk, "/srv/to-passwd") == (7, 8)
        for path in ("/", "/etc", "/etc/passwd", "/opt", "/opt/deep", "/opt/deep/x"):
            assert _owner(disk, path) == (0, 0), path
