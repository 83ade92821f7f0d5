"""The same Debian image (mmdebstrap + umoci) through every transport: an OCI layout, a docker-save
archive (skopeo), and Debian's docker-registry on loopback; each unpacked into an ext4 disk."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import tarfile
from pathlib import Path

import oci_images
import pytest
from registry_server import token_registry_server

from smolvmm.errors import ImageError
from smolvmm.oci.rootdisk import root_disk
from smolvmm.oci.source import open_source


def debugfs(disk: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(disk)], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def layout() -> Path:
    return oci_images.oci_layout()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, layout: Path):  # type: ignore[no-untyped-def]
    server = oci_images.Registry(tmp_path_factory.mktemp("registry"))
    yield server
    server.close()


def _check_image(spec: str, work: Path) -> str:
    with open_source(spec, work / "blobs") as image:
        assert image.config.workdir == oci_images.WORKDIR and image.config.env == (oci_images.ENV,)
        assert list(image.config.cmd) == oci_images.CMD
        disk = root_disk(image, work)
    assert debugfs(disk, "cat /srv/app/hello.txt") == "hello from layer 2\n"
    assert (
        "File not found"
        in subprocess.run(
            ["debugfs", "-R", f"stat /{oci_images.DOOMED}", str(disk)], capture_output=True, text=True
        ).stderr
    )
    assert "Type: regular" in debugfs(disk, "stat /usr/bin/python3.11")
    return image.key


def test_an_oci_layout_and_its_docker_archive_give_the_same_files(layout: Path, tmp_path: Path) -> None:
    _check_image(f"oci:{layout}:{oci_images.TAG}", tmp_path)
    _check_image(f"docker-archive:{oci_images.docker_archive()}", tmp_path)


def test_docker_transport_pulls_from_a_registry(registry: oci_images.Registry, layout: Path, tmp_path: Path) -> None:
    name = registry.push(f"oci:{layout}:{oci_images.TAG}", "team/app:v1")
    key = _check_image(name, tmp_path)
    assert _check_image(f"docker://{registry.address}/team/app@{key}", tmp_path / "again") == key
    with pytest.raises(ImageError, match="HTTP 404"):
        with open_source(f"docker://{registry.address}/team/app:missing", tmp_path):
            pass


def test_docker_transport_answers_a_bearer_token_challenge(
    layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docker = tmp_path / "docker"
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    with token_registry_server(tmp_path / "tokenreg", users={"bob": "hunter2"}) as server:
        name = f"docker://{server.address}/private/app:v1"
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                "--dest-creds",
                "bob:hunter2",
                f"oci:{layout}:{oci_images.TAG}",
                name,
            ],
            check=True,
            capture_output=True,
        )
        with pytest.raises(ImageError, match="refused the credentials .*none in the docker config"):
            with open_source(name, tmp_path / "refused"):
                pass
        docker.mkdir()
        login = base64.b64encode(b"bob:hunter2").decode()
        (docker / "config.json").write_text(json.dumps({"auths": {server.address: {"auth": login}}}))
        _check_image(name, tmp_path)


def test_a_tampered_docker_archive_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(In an empty cache: a cached disk of the same config digest was made from verified layers.)"""
    archive = oci_images.docker_archive()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    with tarfile.open(archive) as original:
        manifest = json.loads(original.extractfile("manifest.json").read())  # type: ignore[union-attr]
        last_layer = manifest[0]["Layers"][-1]
        tampered = tmp_path / "tampered.tar"
        with tarfile.open(tampered, "w") as out:
            for member in original:
                data = original.extractfile(member) if member.isfile() else None
                if member.name == last_layer:
                    content = bytearray(data.read())  # type: ignore[union-attr]
                    content[600] ^= 0xFF  # inside the whiteout entry's header block
                    out.addfile(member, io.BytesIO(bytes(content)))
                else:
                    out.addfile(member, data)
    with pytest.raises(ImageError, match="does not match its digest"):
        with open_source(f"docker-archive:{tampered}", tmp_path / "blobs") as image:
            root_disk(image, tmp_path)


def test_a_rootfs_directory_becomes_a_disk_in_scratch(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "greeting").write_text("hello from a directory\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with open_source(f"rootfs:{tree}", tmp_path / "blobs") as image:
        disk = root_disk(image, scratch)
    assert disk == scratch / "rootfs.ext4"
    assert debugfs(disk, "cat /etc/greeting") == "hello from a directory\n"
