"""Test images made with Debian's own tools, cached under the smolvmm cache dir (built once per machine).

- ``debian_rootfs()``: ``mmdebstrap --variant=minbase --include=python3-minimal bookworm`` as a tar;
- ``oci_layout()``: that tar as an OCI layout (umoci) tagged ``app``, with two layers on top (the
  second deletes a file of the first: a whiteout) and a config with Env, WorkingDir and Cmd;
- ``docker_archive()``: the same image as a ``docker save`` archive (skopeo copy);
- ``Registry``: Debian's docker-registry on 127.0.0.1 with temporary storage.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from smolvmm.images.cache import cache_root

# python3 beside python3-minimal: its standard library has http.server, which the warm-up test serves with
MMDEBSTRAP = [
    "mmdebstrap",
    "--mode=root",
    "--variant=minbase",
    "--include=python3-minimal,python3",
    "--quiet",
    "bookworm",
]
TAG = "app"
DOOMED = "etc/smolvmm-doomed"  # added by layer 2, deleted by layer 3
ENV = "GREETING=hello from the image"
WORKDIR = "/srv/app"
CMD = ["python3", "-c", "import os; print('cmd ran in', os.getcwd(), os.environ['GREETING'])"]


def _key(*inputs: str, source: bool = True) -> str:
    """A short hash of ``inputs`` and (when ``source``) this file, which says how images are made."""
    digest = hashlib.sha256(Path(__file__).read_bytes() if source else b"")
    for item in inputs:
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()[:16]


_MAKING = threading.Lock()  # tests and a kvm module's host preparation (a thread) may ask at once


def _cached(name: str, make) -> Path:  # type: ignore[no-untyped-def]
    """``test-images/NAME``, made by ``make(tmp)`` and renamed into place once."""
    final = cache_root() / "test-images" / name
    with _MAKING:
        if final.exists():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{name}-"))
        try:
            make(scratch / name)
            os.replace(scratch / name, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return final


def debian_rootfs() -> Path:
    """A Debian bookworm minbase root filesystem with python3, as a tar (about a minute to make)."""
    key = _key(*MMDEBSTRAP, source=False)
    return _cached(
        f"bookworm-python3-{key}.tar",
        lambda out: subprocess.run([*MMDEBSTRAP, str(out)], check=True, capture_output=True),
    )


def _tar(entries: list[tuple[str, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def oci_layout() -> Path:
    """The Debian rootfs as OCI layout ``DIR:app``: base, + app files and a doomed file, - the doomed file."""
    base = debian_rootfs()

    def make(out: Path) -> None:
        def umoci(*args: str) -> None:
            subprocess.run(["umoci", *args], check=True, capture_output=True)

        umoci("init", "--layout", str(out))
        umoci("new", "--image", f"{out}:{TAG}")
        layers = out.parent / "layers"
        layers.mkdir()
        (layers / "2.tar").write_bytes(
            _tar(
                [
                    ("srv", None),
                    ("srv/app", None),
                    ("srv/app/hello.txt", b"hello from layer 2\n"),
                    (DOOMED, b"deleted by layer 3\n"),
                ]
            )
        )
        (layers / "3.tar").write_bytes(_tar([("etc/.wh.smolvmm-doomed", b"")]))
        for layer in (base, layers / "2.tar", layers / "3.tar"):
            umoci("raw", "add-layer", "--image", f"{out}:{TAG}", str(layer))
        umoci(
            "config",
            "--image",
            f"{out}:{TAG}",
            "--config.env",
            ENV,
            "--config.workingdir",
            WORKDIR,
            *[arg for word in CMD for arg in ("--config.cmd", word)],
        )
        umoci("gc", "--layout", str(out))

    return _cached(f"bookworm-python3-oci-{_key(base.name)}", make)


def base_disk() -> Path:
    """The OCI layout's base disk, made into smolvmm's cache here (the nested machine cannot keep it:
    its writes land in its RAM)."""
    from smolvmm.oci.rootdisk import root_disk
    from smolvmm.oci.source import open_source

    with tempfile.TemporaryDirectory() as scratch, open_source(f"oci:{oci_layout()}:{TAG}", Path(scratch)) as image:
        return root_disk(image, Path(scratch))


def docker_archive() -> Path:
    """The OCI layout's image as a ``docker save`` archive."""
    layout = oci_layout()
    return _cached(
        f"bookworm-python3-{_key(layout.name)}.docker.tar",
        lambda out: subprocess.run(
            ["skopeo", "copy", "--quiet", f"oci:{layout}:{TAG}", f"docker-archive:{out}:smolvmm/app:latest"],
            check=True,
            capture_output=True,
        ),
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Registry:
    """Debian's docker-registry (CNCF distribution) on 127.0.0.1, storage in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        config = directory / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {directory / 'storage'}\nhttp:\n  addr: {self.address}\n"
        )
        self.process = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.close()
        raise RuntimeError("docker-registry did not start listening")

    def push(self, source: str, repository: str) -> str:
        """Copy ``source`` (a skopeo name) to this registry; returns the docker:// name."""
        name = f"docker://{self.address}/{repository}"
        subprocess.run(
            ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", source, name], check=True, capture_output=True
        )
        return name

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
