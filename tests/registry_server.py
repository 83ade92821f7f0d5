"""A real OCI registry for tests: Debian's docker-registry (CNCF distribution) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REGISTRY_BINARY = "/usr/bin/docker-registry"


def _loopback_up() -> None:
    """Bring ``lo`` up where it is down (the nested KVM machine starts with it down)."""
    flags = Path("/sys/class/net/lo/flags")
    if flags.exists() and not int(flags.read_text(), 16) & 1 and os.geteuid() == 0:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RegistryServer:
    """A running registry: ``address`` (``127.0.0.1:PORT``), ``storage`` (its root directory)."""

    def __init__(self, workdir: Path, htpasswd: Path | None = None) -> None:
        self.storage = workdir / "storage"
        self.storage.mkdir(parents=True)
        _loopback_up()
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        auth = f"auth:\n  htpasswd:\n    realm: smolvmm-test\n    path: {htpasswd}\n" if htpasswd else ""
        config = workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            f"http:\n  addr: {self.address}\n  secret: smolvmm-test-secret\n"
            + auth
        )
        self.log = open(workdir / "registry.log", "wb")
        self.process = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60  # readiness only: nothing here is measured
        while True:
            try:
                urllib.request.urlopen(f"http://{self.address}/v2/", timeout=5)
                break
            except urllib.error.HTTPError:
                break  # 401 with auth on: it is up
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"docker-registry did not start: {(workdir / 'registry.log').read_text()[-2000:]}")
                time.sleep(0.05)

    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps blob ``digest``'s bytes."""
        hex_digest = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.close()


@contextmanager
def registry_server(workdir: Path, users: dict[str, str] | None = None) -> Iterator[RegistryServer]:
    """Start a registry (with htpasswd basic auth for ``users`` if given); stop it on exit."""
    htpasswd = None
    workdir.mkdir(parents=True, exist_ok=True)
    if users:
        htpasswd = workdir / "htpasswd"
        for number, (user, password) in enumerate(users.items()):
            flags = "-Bbc" if number == 0 else "-Bb"
            subprocess.run([shutil.which("htpasswd") or "htpasswd", flags, str(htpasswd), user, password], check=True, capture_output=True)
    server = RegistryServer(workdir, htpasswd)
    try:
        yield server
    finally:
        server.stop()
