"""A real OCI registry for tests: Debian's docker-registry (CNCF distribution) on 127.0.0.1."""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
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

    def __init__(self, workdir: Path, htpasswd: Path | None = None, token: TokenServer | None = None) -> None:
        self.storage = workdir / "storage"
        self.storage.mkdir(parents=True)
        _loopback_up()
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        auth = f"auth:\n  htpasswd:\n    realm: smolvmm-test\n    path: {htpasswd}\n" if htpasswd else ""
        if token:
            auth = (
                f"auth:\n  token:\n    realm: {token.realm}\n    service: {TokenServer.SERVICE}\n"
                f"    issuer: {TokenServer.ISSUER}\n    rootcertbundle: {token.certificate}\n"
            )
        config = workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            f"http:\n  addr: {self.address}\n  secret: smolvmm-test-secret\n" + auth
        )
        self.log = open(workdir / "registry.log", "wb")
        self.process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60  # readiness only: nothing here is measured
        while True:
            try:
                urllib.request.urlopen(f"http://{self.address}/v2/", timeout=5)
                break
            except urllib.error.HTTPError:
                break  # 401 with auth on: it is up
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"docker-registry did not start: {(workdir / 'registry.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.05)

    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps blob ``digest``'s bytes."""
        hex_digest = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.close()


class TokenServer:
    """The registry's bearer-token service: ES256 JWTs (signed by openssl) granting what ``users`` ask.

    The registry answers 401 with ``WWW-Authenticate: Bearer realm=<this>/token,...``; a client gets
    a token here with basic auth and the scopes it needs, as from Docker Hub's or GHCR's.
    """

    SERVICE = "smolvmm-test"
    ISSUER = "smolvmm-test-issuer"

    def __init__(self, workdir: Path, users: dict[str, str]) -> None:
        self.users = users
        self.key = workdir / "token.key"
        self.certificate = workdir / "token.crt"
        subprocess.run(
            ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(self.key)], check=True
        )
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-new",
                "-key",
                str(self.key),
                "-out",
                str(self.certificate),
                "-days",
                "2",
                "-subj",
                "/CN=smolvmm-test-token",
            ],
            check=True,
            capture_output=True,
        )
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.certificate), "-outform", "DER"], check=True, capture_output=True
        ).stdout
        self.x5c = base64.b64encode(der).decode()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                login = self.headers.get("Authorization", "")
                user, _, password = (
                    base64.b64decode(login[6:]).decode().partition(":") if login.startswith("Basic ") else ("", "", "")
                )
                if owner.users.get(user) != password or not user:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"token": owner.token(user, query.get("scope", []))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, user: str, scopes: list[str]) -> str:
        access = []
        for scope in " ".join(scopes).split():
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {
            "iss": self.ISSUER,
            "sub": user,
            "aud": self.SERVICE,
            "exp": now + 600,
            "nbf": now - 60,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        der = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
        ).stdout
        return f"{signing_input}.{_b64(_der_to_raw(der))}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _der_to_raw(der: bytes) -> bytes:
    """An ECDSA signature as JWS wants it (r || s, 32 bytes each) from openssl's DER."""
    at = 2 if der[1] < 0x80 else 3
    values = []
    for _ in range(2):
        length = der[at + 1]
        values.append(int.from_bytes(der[at + 2 : at + 2 + length], "big"))
        at += 2 + length
    return b"".join(v.to_bytes(32, "big") for v in values)


@contextmanager
def token_registry_server(workdir: Path, users: dict[str, str]) -> Iterator[RegistryServer]:
    """A registry with bearer-token auth, its token service granting ``users`` what they ask."""
    workdir.mkdir(parents=True, exist_ok=True)
    token = TokenServer(workdir, users)
    try:
        server = RegistryServer(workdir, token=token)
        try:
            yield server
        finally:
            server.stop()
    finally:
        token.stop()


@contextmanager
def registry_server(workdir: Path, users: dict[str, str] | None = None) -> Iterator[RegistryServer]:
    """Start a registry (with htpasswd basic auth for ``users`` if given); stop it on exit."""
    htpasswd = None
    workdir.mkdir(parents=True, exist_ok=True)
    if users:
        htpasswd = workdir / "htpasswd"
        for number, (user, password) in enumerate(users.items()):
            flags = "-Bbc" if number == 0 else "-Bb"
            subprocess.run(
                [shutil.which("htpasswd") or "htpasswd", flags, str(htpasswd), user, password],
                check=True,
                capture_output=True,
            )
    server = RegistryServer(workdir, htpasswd)
    try:
        yield server
    finally:
        server.stop()
