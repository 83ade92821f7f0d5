"""Bundles through a real OCI registry (Debian's docker-registry on 127.0.0.1): push, pull, run by reference."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from bundles import with_broken_zstd_chunk
from registry_server import REGISTRY_BINARY, RegistryServer, registry_server, token_registry_server

import smolvmm
from smolformat import BundleContents, make_metadata, open_bundle, samples, write_bundle
from smolformat.layout import PAGE_SIZE
from smolvmm.registry import artifact, client
from smolvmm.registry.reference import Reference
from smolvmm.registry.store import BlobStore

MIB = 1 << 20
pytestmark = pytest.mark.skipif(
    not os.path.exists(REGISTRY_BINARY), reason="docker-registry is not installed (tools/setup)"
)


def make_bundle(path: Path, memory: bytearray, vcpu_seed: int = 0) -> bytes:
    """A bundle written natively through the format writer: 2 vCPUs, ``memory`` as its RAM, an 7 MiB disk."""
    disk = path.parent / "base.img"
    if not disk.exists():
        disk.write_bytes(random.Random(3).randbytes(6 * MIB) + bytes(MIB))
    device_config, states = samples.devices(1)
    contents = BundleContents(
        config=samples.machine_config("x86_64", [(0, len(memory))], device_config, vcpus=2),
        vcpus=[samples.x86_64_vcpu(0, random.Random(vcpu_seed)), samples.x86_64_vcpu(1, random.Random(vcpu_seed + 1))],
        vm_state=samples.x86_64_vm_state(random.Random(vcpu_seed)),
        devices=states,
        memory=[memory],
        disks=[disk],
        metadata=make_metadata("kvm-pvm"),
    )
    return write_bundle(path, contents)


def second_save(memory: bytearray) -> bytearray:
    """The same guest a few seconds on: kernel data pages rewritten in one 2 MiB window, and the page
    cache grown by 512 KiB into what was zero (so every later page moves in the file)."""
    later = bytearray(memory)
    rng = random.Random(99)
    for page in rng.sample(range(16 * MIB // PAGE_SIZE, 18 * MIB // PAGE_SIZE), 40):
        at = page * PAGE_SIZE + rng.randrange(PAGE_SIZE - 64)
        later[at : at + 64] = rng.randbytes(64)
    zero_run = next(
        at for at in range(4 * MIB, len(memory) - 2 * MIB + 1, 2 * MIB) if not any(memory[at : at + 2 * MIB])
    )
    later[zero_run : zero_run + 512 * 1024] = rng.randbytes(512 * 1024)
    return later


@pytest.fixture(scope="module")
def memory() -> bytearray:
    return samples.realistic_memory(96 * MIB, seed=7)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, memory: bytearray) -> tuple[Path, Path]:
    """Two saves of one guest, a few seconds apart."""
    work = tmp_path_factory.mktemp("bundles")
    make_bundle(work / "first.smolmachine", memory, vcpu_seed=1)
    make_bundle(work / "second.smolmachine", second_save(memory), vcpu_seed=2)
    return work / "first.smolmachine", work / "second.smolmachine"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with registry_server(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh XDG_CACHE_HOME (an empty local store) and no docker config."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    return tmp_path / "cache"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smolvmm", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env or os.environ.copy(),
    )


def test_cli_push_then_pull_gives_the_same_bytes(
    registry: RegistryServer, bundles: tuple[Path, Path], cache: Path, tmp_path: Path, anyio_backend: str
) -> None:
    first, _ = bundles
    ref = f"{registry.address}/team/app:v1"
    pushed = cli("push", str(first), ref)
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.startswith(f"{ref}@sha256:") and pushed.stderr == ""  # quiet off a terminal
    again = cli("push", str(first), ref)  # the same bundle, the same manifest: its time is the bundle's
    assert (again.returncode, again.stdout) == (0, pushed.stdout), again.stderr
    out = tmp_path / "pulled.smolmachine"
    pulled = cli("pull", ref, "-o", str(out))
    assert pulled.returncode == 0, pulled.stderr
    assert out.read_bytes() == first.read_bytes()
    with open_bundle(out) as a, open_bundle(first) as b:
        assert a.digest == b.digest
    by_digest = cli("pull", pushed.stdout.strip().replace(":v1@", "@"), "-o", str(tmp_path / "again.smolmachine"))
    assert by_digest.returncode == 0, by_digest.stderr
    assert (tmp_path / "again.smolmachine").read_bytes() == first.read_bytes()
    # Into the store (as `run REF` does); by digest, a second time needs no registry at all.
    by_digest_ref = pushed.stdout.strip().replace(":v1@", "@")
    stored = anyio.run(smolvmm.pull, by_digest_ref, backend=anyio_backend)
    assert stored.path.read_bytes() == first.read_bytes()
    offline = anyio.run(smolvmm.pull, by_digest_ref.replace(registry.address, "127.0.0.1:1"), backend=anyio_backend)
    assert offline.path == stored.path and offline.transfer.moved == 0 and offline.bundle_digest == stored.bundle_digest


def test_the_manifest_is_an_oci_artifact_of_our_type(
    registry: RegistryServer, bundles: tuple[Path, Path], cache: Path, anyio_backend: str
) -> None:
    first, _ = bundles

    async def main() -> dict:
        result = await smolvmm.push(first, f"{registry.address}/team/shape:v1")
        async with client.RegistryClient(registry.address, loopback=True) as registry_client:
            data, digest = await registry_client.get_manifest(
                Reference.parse(f"{registry.address}/team/shape:v1"), 1 << 22
            )
            assert digest == result.digest
            manifest = json.loads(data)
            config = json.loads(
                await registry_client.fetch_small(
                    "team/shape", manifest["config"]["digest"], manifest["config"]["size"]
                )
            )
        return {"manifest": manifest, "config": config}

    got = anyio.run(main, backend=anyio_backend)
    manifest, config = got["manifest"], got["config"]
    assert manifest["artifactType"] == "application/vnd.smolvmm.machine.v1"
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["layers"][0]["mediaType"] == artifact.STATE_TYPE
    chunks = manifest["layers"][1:]
    assert all(c["size"] <= artifact.MAX_CHUNK for c in chunks)
    assert {c["annotations"]["dev.smolvmm.section"] for c in chunks} == {"ram", "disk0"}
    with open_bundle(first) as bundle:
        assert config["bundleDigest"] == "blake2b-256:" + bundle.digest.hex()
        assert config["fileSize"] == first.stat().st_size
        assert (config["arch"], config["vcpus"], config["ram"], config["hypervisor"]) == (
            "x86_64",
            2,
            96 * MIB,
            "kvm-pvm",
        )


@pytest.mark.anyio
async def test_a_second_save_moves_under_a_tenth_of_its_bytes(
    registry: RegistryServer, bundles: tuple[Path, Path], cache: Path, tmp_path: Path
) -> None:
    first, second = bundles
    ref = f"{registry.address}/gens/{os.getpid()}-{random.randrange(1 << 30)}"
    one = await smolvmm.push(first, f"{ref}:one")
    assert one.transfer.moved >= one.transfer.total * 0.99
    two = await smolvmm.push(second, f"{ref}:two")
    size = second.stat().st_size
    assert two.transfer.moved < size / 10, two.transfer
    assert two.transfer.present > size * 0.85
    got_one = await smolvmm.pull(f"{ref}:one", tmp_path / "one.smolmachine")
    got_two = await smolvmm.pull(f"{ref}:two", tmp_path / "two.smolmachine")
    assert got_one.transfer.moved >= first.stat().st_size * 0.99
    assert got_two.transfer.moved < size / 10, got_two.transfer
    assert (tmp_path / "two.smolmachine").read_bytes() == second.read_bytes()
    assert os.fspath(got_two) == str(tmp_path / "two.smolmachine")  # what Machine.restore takes
    layers = json.loads(registry.blob_file(two.digest).read_bytes())["layers"]
    assert {layer["mediaType"] for layer in layers} >= {artifact.PATCH_TYPE, artifact.BASE_TYPE, artifact.CHUNK_TYPE}
    # Without the first save's chunks at hand, a pull fetches the patches' bases too.
    fresh = await smolvmm.pull(f"{ref}:two", tmp_path / "fresh.smolmachine", store=BlobStore(tmp_path / "fresh-store"))
    assert fresh.path.read_bytes() == second.read_bytes()
    assert fresh.transfer.present == 0


@pytest.mark.anyio
async def test_a_save_of_a_pulled_machine_goes_up_as_patches(
    registry: RegistryServer, bundles: tuple[Path, Path], tmp_path: Path
) -> None:
    """Pull on one host, save again there, push: the patches match the chunks the pull stored."""
    first, second = bundles
    ref = f"{registry.address}/hosts/{os.getpid()}-{random.randrange(1 << 30)}"
    await smolvmm.push(first, f"{ref}:one", store=BlobStore(tmp_path / "builder"))
    other_host = BlobStore(tmp_path / "other-host")
    await smolvmm.pull(f"{ref}:one", tmp_path / "one.smolmachine", store=other_host)
    pushed = await smolvmm.push(second, f"{ref}:two", store=other_host)
    assert pushed.transfer.moved < second.stat().st_size / 10, pushed.transfer


@pytest.mark.anyio
async def test_a_push_to_another_repository_mounts_instead_of_uploading(
    registry: RegistryServer, bundles: tuple[Path, Path], cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = bundles
    monkeypatch.setattr(client, "UPLOAD_CHUNK", 256 * 1024)  # chunked PATCH uploads for everything above
    tag = f"{os.getpid()}-{random.randrange(1 << 30)}"
    source = await smolvmm.push(first, f"{registry.address}/mount/source-{tag}:v1")
    assert source.transfer.moved >= source.transfer.total * 0.99
    mounted = await smolvmm.push(first, f"{registry.address}/mount/target-{tag}:v1")
    assert mounted.transfer.moved < 4096 and mounted.transfer.present >= mounted.transfer.total - 4096
    pulled = await smolvmm.pull(f"{registry.address}/mount/target-{tag}:v1", tmp_path / "m.smolmachine")
    assert pulled.path.read_bytes() == first.read_bytes()


def test_a_tampered_blob_fails_the_pull_naming_its_digest(
    bundles: tuple[Path, Path], cache: Path, tmp_path: Path
) -> None:
    first, _ = bundles
    with registry_server(tmp_path / "tampered-registry") as registry:
        _check_tampered_pull(registry, first, tmp_path)


def _check_tampered_pull(registry: RegistryServer, first: Path, tmp_path: Path) -> None:
    ref = f"{registry.address}/tamper/app:v1"
    result = anyio.run(smolvmm.push, first, ref)
    victim = _chunk_digests(registry, ref, result.digest)[3]
    blob = registry.blob_file(victim)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x40
    blob.write_bytes(bytes(data))
    out = tmp_path / "tampered.smolmachine"
    pulled = cli("pull", ref, "-o", str(out))
    assert pulled.returncode == 1
    assert len(pulled.stderr.strip().splitlines()) == 1 and victim in pulled.stderr, pulled.stderr
    assert "does not match its digest" in pulled.stderr
    assert not out.exists() and not list(tmp_path.glob(".tampered*"))


def test_a_bundle_that_does_not_verify_is_not_pushed(registry: RegistryServer, cache: Path, tmp_path: Path) -> None:
    make_bundle(tmp_path / "good.smolmachine", samples.realistic_memory(8 * MIB, seed=5))
    broken = with_broken_zstd_chunk(tmp_path / "good.smolmachine", tmp_path / "broken.smolmachine")
    ref = f"{registry.address}/broken/app:v1"
    pushed = cli("push", str(broken), ref)
    assert pushed.returncode == 3, pushed.stderr
    assert pushed.stderr.strip().splitlines() == [
        f"smolvmm: error: {broken}: zstd chunk at 0x0 is not one complete zstd frame [bad-chunk]"
    ]
    assert "unknown reference" in cli("pull", ref, "-o", str(tmp_path / "x.smolmachine")).stderr


def test_a_machine_is_not_built_as_a_container_image(
    registry: RegistryServer, bundles: tuple[Path, Path], cache: Path, tmp_path: Path
) -> None:
    from smolvmm.oci.source import open_source

    first, _ = bundles
    ref = f"{registry.address}/machines/app:v1"
    anyio.run(smolvmm.push, first, ref)
    with pytest.raises(smolvmm.ImageError) as caught, open_source(f"docker://{ref}", tmp_path / "work"):
        pytest.fail("opened as an image")
    assert str(caught.value) == (
        f"docker://{ref} is a smolvmm machine, not a container image:"
        f" run it with `smolvmm run {ref}`, or fetch it with `smolvmm pull {ref} -o FILE`"
    )
    assert not (tmp_path / "work").exists()  # refused before any layer was fetched


def _chunk_digests(registry: RegistryServer, ref: str, digest: str) -> list[str]:
    manifest = json.loads(registry.blob_file(digest).read_bytes())
    return [layer["digest"] for layer in manifest["layers"][1:]]


def test_unknown_reference_and_bad_references(registry: RegistryServer, cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.smolmachine"
    missing = cli("pull", f"{registry.address}/nobody/here:v9", "-o", str(out))
    assert missing.returncode == 1 and "unknown reference" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not out.exists()
    bad = cli("pull", "not a reference", "-o", str(out))
    assert bad.returncode == 2 and "bad reference" in bad.stderr and not out.exists()
    absent = cli("pull", f"{registry.address}/nobody/here@sha256:" + "0" * 64, "-o", str(out))
    assert absent.returncode == 1 and "unknown reference" in absent.stderr


def test_basic_auth_from_the_docker_config_and_a_credential_helper(
    bundles: tuple[Path, Path], cache: Path, tmp_path: Path
) -> None:
    first, _ = bundles
    with registry_server(tmp_path / "authreg", users={"alice": "s3cret"}) as server:
        ref = f"{server.address}/private/app:v1"
        docker = tmp_path / "docker"
        docker.mkdir()
        no_login = cli("push", str(first), ref)
        assert no_login.returncode == 1 and "asks for a login" in no_login.stderr
        (docker / "config.json").write_text(
            json.dumps({"auths": {server.address: {"auth": "YWxpY2U6d3Jvbmc="}}})
        )  # alice:wrong
        refused = cli("push", str(first), ref)
        assert refused.returncode == 1 and "refused the credentials" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        (docker / "config.json").write_text(
            json.dumps({"auths": {server.address: {"auth": "YWxpY2U6czNjcmV0"}}})
        )  # alice:s3cret
        pushed = cli("push", str(first), ref)
        assert pushed.returncode == 0, pushed.stderr
        helpers = tmp_path / "bin"
        helpers.mkdir()
        helper = helpers / "docker-credential-smolvmmtest"
        helper.write_text('#!/bin/sh\nread server\necho "{\\"Username\\":\\"alice\\",\\"Secret\\":\\"s3cret\\"}"\n')
        helper.chmod(0o755)
        (docker / "config.json").write_text(json.dumps({"credHelpers": {server.address: "smolvmmtest"}}))
        env = {**os.environ, "PATH": f"{helpers}:{os.environ['PATH']}"}
        out = tmp_path / "private.smolmachine"
        pulled = cli("pull", ref, "-o", str(out), env=env)
        assert pulled.returncode == 0, pulled.stderr
        assert out.read_bytes() == first.read_bytes()


@pytest.mark.anyio
async def test_bearer_tokens_from_the_registrys_challenge(
    bundles: tuple[Path, Path], cache: Path, tmp_path: Path
) -> None:
    first, _ = bundles
    with token_registry_server(tmp_path / "tokenreg", users={"bob": "hunter2"}) as server:
        ref = f"{server.address}/tokens/app:v1"
        with pytest.raises(smolvmm.RegistryError, match="refused the credentials .*none in the docker config"):
            await smolvmm.push(first, ref)
        docker = cache.parent / "docker"
        docker.mkdir()
        (docker / "config.json").write_text(
            json.dumps({"auths": {server.address: {"auth": "Ym9iOmh1bnRlcjI="}}})
        )  # bob:hunter2
        await smolvmm.push(first, ref)
        mounted = await smolvmm.push(
            first, f"{server.address}/tokens/mounted:v1"
        )  # a mount needs pull on the source too
        assert mounted.transfer.moved < 4096
        pulled = await smolvmm.pull(ref, tmp_path / "t.smolmachine")
        assert pulled.path.read_bytes() == first.read_bytes()


class _CuttingProxy:
    """A TCP proxy to the registry that, after ``budget`` bytes from it, drops every connection
    and stops listening: a registry that disappears in the middle of a pull."""

    def __init__(self, target: str, budget: int, delay: float = 0.0) -> None:
        host, port = target.split(":")
        self.target = (host, int(port))
        self.budget = budget
        self.delay = delay  # seconds per piece from the registry: a slow link
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [conn, upstream]
            threading.Thread(target=self._pump, args=(conn, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, conn, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        try:
            while data := source.recv(65536):
                if counted:
                    with self.lock:
                        self.budget -= len(data)
                        cut = self.budget < 0
                    if cut:
                        return self.cut()
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


class _FakeRegistry:
    """A hostile registry on 127.0.0.1: ``GET /v2/`` answers 200, every other request ``answer(handler)``."""

    def __init__(self, answer: Callable[[http.server.BaseHTTPRequestHandler], None]) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/v2/":
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                try:
                    answer(self)
                except OSError:
                    pass  # the client hung up: what a hostile registry expects

            do_HEAD = do_POST = do_PUT = do_PATCH = do_GET  # noqa: N815

            def log_message(self, *_args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> _FakeRegistry:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _status(
    code: int, body: bytes | None = b"", endless: bool = False
) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    """An answer of ``code`` with ``body`` (None: no body, the connection closed), or one that never ends."""

    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(code)
        if endless:
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            while True:
                handler.wfile.write(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
        if body is None:
            handler.send_header("Connection", "close")
            handler.end_headers()
            return
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return answer


def _stalled(handler: http.server.BaseHTTPRequestHandler) -> None:
    """A 200 whose body stops after 10 of its 1000 bytes."""
    handler.send_response(200)
    handler.send_header("Content-Type", artifact.MANIFEST_TYPE)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.write(b'{"schemaVe')
    handler.wfile.flush()
    time.sleep(30)


@pytest.mark.parametrize(
    ("answer", "shown"),
    [
        (_status(500, None), r"answered 500 \(Internal Server Error\) while fetching the manifest of \S+app:v1$"),
        (_status(500, endless=True), r"answered 500 \(Internal Server Error\) while fetching the manifest of"),
        (
            _status(429, b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow\\ndown"}]}'),
            r"answered 429 \(Too Many Requests\) while fetching the manifest of \S+/team/app:v1: TOOMANYREQUESTS: slow down$",
        ),
    ],
    ids=["500-without-body", "500-endless-body", "429-with-errors"],
)
def test_a_registry_error_is_one_line_whatever_its_body(
    answer: Callable[[http.server.BaseHTTPRequestHandler], None], shown: str, cache: Path, tmp_path: Path
) -> None:
    with _FakeRegistry(answer) as fake:
        pulled = cli("pull", f"{fake.address}/team/app:v1", "-o", str(tmp_path / "out.smolmachine"))
    assert pulled.returncode == 1, pulled.stderr
    assert len(pulled.stderr.strip().splitlines()) == 1 and re.search(shown, pulled.stderr.strip()), pulled.stderr


@pytest.mark.anyio
async def test_a_token_service_whose_answer_never_ends_is_read_no_further_than_a_token_can_be(cache: Path) -> None:
    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        if handler.path.startswith("/token"):
            _status(200, endless=True)(handler)
        realm = f"http://{handler.headers['Host']}/token"
        handler.send_response(401)
        handler.send_header("WWW-Authenticate", f'Bearer realm="{realm}",service="fake"')
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    with _FakeRegistry(answer) as fake, pytest.raises(smolvmm.RegistryError, match="token service answered 200"):
        await smolvmm.pull(f"{fake.address}/team/app:v1")


@pytest.mark.parametrize(
    ("content_type", "shown"),
    [
        ("application/vnd.oci.image.index.v1+json", "/team/app:v1 is an image index (a list of manifests)"),
        ("application/vnd.docker.distribution.manifest.v2+json; charset=utf-8", "is of media type 'application/vnd"),
        ("application/json", "/team/app:v1 is an image index (a list of manifests)"),  # generic: the body tells
    ],
)
@pytest.mark.anyio
async def test_a_pull_refuses_what_is_not_an_image_manifest(content_type: str, shown: str, cache: Path) -> None:
    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        body = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with _FakeRegistry(answer) as fake, pytest.raises(smolvmm.RegistryError) as caught:
        await smolvmm.pull(f"{fake.address}/team/app:v1")
    assert shown in str(caught.value)


def test_a_push_that_a_registry_refuses_with_an_endless_body(bundles: tuple[Path, Path], cache: Path) -> None:
    first, _ = bundles

    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        if handler.command == "HEAD":
            return _status(404)(handler)
        return _status(503, endless=True)(handler)

    with _FakeRegistry(answer) as fake:
        pushed = cli("push", str(first), f"{fake.address}/team/app:v1")
    assert pushed.returncode == 1, pushed.stderr
    assert len(pushed.stderr.strip().splitlines()) == 1, pushed.stderr
    assert "answered 503 (Service Unavailable) while starting the upload of sha256:" in pushed.stderr


@pytest.mark.anyio
async def test_a_stalled_registry_says_it_timed_out(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "TIMEOUT", 0.5)
    with _FakeRegistry(_stalled) as fake:
        with pytest.raises(smolvmm.RegistryError) as caught:
            await smolvmm.pull(f"{fake.address}/team/app:v1")
    assert str(caught.value) == (
        f"lost the connection to {fake.address} while fetching the manifest of {fake.address}/team/app:v1:"
        " timed out after 0.5 s"
    )


@pytest.mark.anyio
async def test_an_unreachable_registry_says_why() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("", request=request)

    async with client.RegistryClient("10.255.255.1") as remote:
        remote._http = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
        with pytest.raises(smolvmm.RegistryError) as caught:
            await remote.has_blob("team/app", "sha256:" + "0" * 64)
    assert str(caught.value) == (
        "cannot reach registry 10.255.255.1: timed out after 10 s while connecting"
        " (plain HTTP is used only for loopback registries or with --insecure)"
    )
    assert client._failure(httpx.RemoteProtocolError("")) == "remote protocol error"


def test_a_registry_that_disappears_mid_pull(
    registry: RegistryServer, bundles: tuple[Path, Path], cache: Path, tmp_path: Path
) -> None:
    first, _ = bundles
    anyio.run(smolvmm.push, first, f"{registry.address}/vanish/app:v1")
    proxy = _CuttingProxy(registry.address, budget=first.stat().st_size // 2)
    out = tmp_path / "vanished.smolmachine"
    pulled = cli("pull", f"{proxy.address}/vanish/app:v1", "-o", str(out))
    assert pulled.returncode == 1
    assert len(pulled.stderr.strip().splitlines()) == 1
    assert "lost the connection" in pulled.stderr or "cannot reach" in pulled.stderr, pulled.stderr
    assert not out.exists() and not list(tmp_path.glob(".vanished*"))


def test_a_killed_pull_resumes_and_verifies(
    registry: RegistryServer, bundles: tuple[Path, Path], cache: Path, tmp_path: Path, anyio_backend: str
) -> None:
    first, _ = bundles
    ref = f"{registry.address}/killed/app:v1"
    anyio.run(smolvmm.push, first, ref)
    # Through a slow link (a proxy that never cuts), so that the kill lands in the middle of the pull.
    slow = _CuttingProxy(registry.address, budget=1 << 62, delay=0.005)
    blobs = cache / "smolvmm" / "oci" / "blobs" / "sha256"
    out = tmp_path / "k.smolmachine"
    process = subprocess.Popen(
        [sys.executable, "-m", "smolvmm", "pull", f"{slow.address}/killed/app:v1", "-o", str(out)]
    )
    while process.poll() is None and len([p for p in blobs.glob("*") if not p.name.startswith(".")]) < 6:
        time.sleep(0.01)  # wait for some finished blobs (counted, not timed)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if process.returncode != -signal.SIGKILL:
        pytest.fail(f"the pull ended before it was killed ({process.returncode}): the bundle is too small to catch it")
    assert not out.exists()
    kept = [p for p in blobs.glob("*") if not p.name.startswith(".")]
    assert kept

    async def again() -> smolvmm.PullResult:
        return await smolvmm.pull(ref, out)

    result = anyio.run(again, backend=anyio_backend)
    assert result.transfer.present >= sum(p.stat().st_size for p in kept)
    assert result.transfer.moved + result.transfer.present == result.transfer.total
    assert out.read_bytes() == first.read_bytes()


def test_a_full_disk_leaves_nothing_under_the_final_name(
    registry: RegistryServer, bundles: tuple[Path, Path], cache: Path, tmp_path: Path
) -> None:
    first, _ = bundles
    ref = f"{registry.address}/full/app:v1"
    anyio.run(smolvmm.push, first, ref)
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = small / "full.smolmachine"
        pulled = cli("pull", ref, "-o", str(out))
        assert pulled.returncode == 1
        assert len(pulled.stderr.strip().splitlines()) == 1 and "No space left on device" in pulled.stderr, (
            pulled.stderr
        )
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


# Pure parts


def test_references_parse_strictly() -> None:
    ref = Reference.parse("127.0.0.1:5000/team/app:v1")
    assert (ref.registry, ref.repository, ref.tag, ref.digest, ref.is_loopback) == (
        "127.0.0.1:5000",
        "team/app",
        "v1",
        None,
        True,
    )
    digest = "sha256:" + "ab" * 32
    assert Reference.parse(f"ghcr.io/a/b@{digest}").manifest_reference == digest
    assert Reference.parse("registry.example/app").tag == "latest"
    assert not Reference.parse("registry.example/app").is_loopback
    assert Reference.parse("localhost/app:x").is_loopback
    for bad in (
        "app:v1",
        "team/app:v1",
        "ghcr.io/Team/app",
        "ghcr.io/a/b@sha256:12",
        "ghcr.io/a:b c",
        "ghcr.io/" + "a" * 300,
    ):
        with pytest.raises(smolvmm.ConfigError):
            Reference.parse(bad)


def test_cuts_follow_guest_addresses_not_file_offsets(tmp_path: Path) -> None:
    memory = samples.realistic_memory(24 * MIB, seed=3)
    make_bundle(tmp_path / "a.smolmachine", memory)
    grown = bytearray(memory)
    grown[: 64 * PAGE_SIZE] = random.Random(1).randbytes(64 * PAGE_SIZE)  # pages that move all later ones
    make_bundle(tmp_path / "b.smolmachine", grown)

    def ram_chunks(path: Path) -> list[bytes]:
        with open_bundle(path) as bundle:
            plan = artifact.plan(bundle, path.stat().st_size)
        data = path.read_bytes()
        return [data[c.offset : c.offset + c.size] for c in plan.chunks if c.section == "ram"]

    a, b = ram_chunks(tmp_path / "a.smolmachine"), ram_chunks(tmp_path / "b.smolmachine")
    assert a[0] != b[0] and a[1:] == b[1:]
    assert all(len(c) <= artifact.WINDOW + PAGE_SIZE for c in a)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(artifactType="application/vnd.smolmachines.smolmachine.v1"), "not a smolvmm machine"),
        (lambda m: m["layers"][1].update(size=artifact.MAX_CHUNK + 1), "bad size"),
        (lambda m: m["layers"][1].update(digest="sha256:xyz"), "no sha256 digest"),
        (lambda m: m["layers"][2]["annotations"].update({artifact.OFFSET_KEY: "0"}), "overlaps"),
        (lambda m: m["layers"][1].pop("annotations"), "no dev.smolvmm.offset"),
        (
            lambda m: m["layers"][2]["annotations"].update({artifact.LENGTH_KEY: str(artifact.MAX_CHUNK + 1)}),
            "more than",
        ),
        (lambda m: m["layers"][2]["annotations"].pop(artifact.BASE_KEY), "no chunk or base"),
        (lambda m: m["layers"].pop(), "not among the manifest's base layers"),
        (lambda m: m["layers"].insert(1, m["layers"].pop()), "not a chunk or patch in its place"),
        (lambda m: m["layers"][0].update(size=artifact.MAX_STATE + 1), "bad size"),
        (lambda m: m.update(layers=[]), "1 to"),
        (lambda m: m.update(schemaVersion=1), "the manifest's schemaVersion is 1, not 2"),
        (lambda m: m.pop("schemaVersion"), "the manifest's schemaVersion is None, not 2"),
        (lambda m: m.update(mediaType="application/vnd.oci.image.index.v1+json"), "r is an image index"),
        (lambda m: (m.pop("mediaType"), m.update(manifests=[])), "r is an image index"),
        (
            lambda m: m.update(mediaType="application/vnd.docker.distribution.manifest.v2+json"),
            "r is of media type 'application/vnd.docker.distribution.manifest.v2\\+json', not application",
        ),
    ],
)
def test_manifests_are_checked_before_anything_is_fetched(change, message: str) -> None:  # noqa: ANN001
    digest = {n: "sha256:" + str(n) * 64 for n in range(1, 7)}
    layers = [
        artifact.chunk_layer(artifact.Chunk(0, 10, "ram", "ram/0"), digest[1]),
        artifact.patch_layer(artifact.Chunk(10, 8192, "ram", "ram/1"), digest[2], digest[5], 100, digest[6]),
    ]
    good = artifact.manifest_blob(
        artifact.descriptor(artifact.CONFIG_TYPE, digest[3], 10),
        artifact.descriptor(artifact.STATE_TYPE, digest[4], 7),
        layers,
        {digest[6]: 4096},
        "2026-12-07T09:30:00Z",
    )
    parsed = artifact.parse_manifest(good, "r")
    without_media_type = json.loads(good)
    del without_media_type["mediaType"]  # the image-spec's SHOULD: it may be absent
    assert artifact.parse_manifest(json.dumps(without_media_type).encode(), "r") == parsed
    assert [(p.digest, p.size, p.offset, p.base) for p in parsed.pieces] == [
        (digest[1], 10, 0, None),
        (digest[2], 8192, 10, digest[6]),
    ]
    assert parsed.bases == {digest[6]: 4096}
    manifest = json.loads(good)
    change(manifest)
    with pytest.raises(smolvmm.RegistryError, match=message):
        artifact.parse_manifest(json.dumps(manifest).encode(), "r")


def test_patches_rebuild_a_chunk_from_its_base_and_refuse_bad_input() -> None:
    rng = random.Random(4)
    base = rng.randbytes(64 * PAGE_SIZE)
    later = bytearray(base)
    later[5 * PAGE_SIZE : 5 * PAGE_SIZE + 8] = b"changed!"  # one page rewritten
    later[:0] = bytes(PAGE_SIZE)  # a page added in front: every other page moves
    patch = artifact.make_patch(bytes(later), artifact.page_hashes(base))
    assert patch is not None and len(patch) < 3 * PAGE_SIZE
    assert artifact.apply_patch(patch, base, len(later), "p") == later
    assert artifact.make_patch(rng.randbytes(8 * PAGE_SIZE), artifact.page_hashes(base)) is None  # all new: no patch
    for broken in (
        patch[:-1],
        patch[:8] + b"\xff" + patch[9:],
        b"SMPATCH2" + patch[8:],
        patch[:12] + (0).to_bytes(4, "little") + patch[16:],
    ):
        with pytest.raises(smolvmm.RegistryError, match="malformed"):
            artifact.apply_patch(broken, base, len(later), "p")
    with pytest.raises(smolvmm.RegistryError, match="malformed"):
        artifact.apply_patch(patch, base[: 10 * PAGE_SIZE], len(later), "p")  # an index past a short base


def test_credentials_come_from_the_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from smolvmm.registry.auth import credentials, parse_challenge

    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert credentials("ghcr.io") is None  # no config at all
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.example": {"auth": "dTpw"},
                    "ghcr.io": {"identitytoken": "tok"},
                    "https://index.docker.io/v1/": {"auth": "aHViOnB3"},
                },
                "credsStore": "absent-helper",
            }
        )
    )
    assert credentials("index.example") == ("u", "p")
    assert credentials("registry-1.docker.io") == ("hub", "pw")  # docker login's key for Docker Hub
    assert credentials("ghcr.io") == ("<token>", "tok")
    with pytest.raises(smolvmm.RegistryError, match="docker-credential-absent-helper, which is not installed"):
        credentials("other.example")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(smolvmm.RegistryError, match="cannot read"):
        credentials("ghcr.io")
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull"'
    )
    assert scheme == "bearer" and params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull",
    }
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


@pytest.mark.anyio
async def test_a_token_service_over_plain_http_only_where_plain_http_is_allowed() -> None:
    async with client.RegistryClient("registry.example") as remote:  # no request is sent: refused before
        with pytest.raises(smolvmm.RegistryError, match="names a token service that is not https"):
            await remote._token({"realm": "http://auth.example/token"}, ("repository:a/b:pull",))


@pytest.mark.anyio
async def test_plain_http_only_for_loopback_or_insecure(registry: RegistryServer) -> None:
    ref = Reference.parse(f"{registry.address}/nobody/here:v1")
    async with client.RegistryClient(registry.address, loopback=False) as strict:  # as for a remote host
        with pytest.raises(
            smolvmm.RegistryError, match="plain HTTP is used only for loopback registries or with --insecure"
        ):
            await strict.get_manifest(ref, 1024)
    async with client.RegistryClient(registry.address, insecure=True) as insecure:
        with pytest.raises(smolvmm.RegistryError, match="unknown reference"):
            await insecure.get_manifest(ref, 1024)


def test_progress_on_a_terminal(
    registry: RegistryServer, bundles: tuple[Path, Path], cache: Path, tmp_path: Path
) -> None:
    import pty

    first, _ = bundles
    ref = f"{registry.address}/progress/app:v1"
    for args in (
        ["push", str(first), ref],
        ["push", str(first), ref],
        ["pull", ref, "-o", str(tmp_path / "p.smolmachine")],
    ):
        leader, follower = pty.openpty()
        process = subprocess.Popen([sys.executable, "-m", "smolvmm", *args], stderr=follower, stdout=subprocess.DEVNULL)
        os.close(follower)
        shown = b""
        while True:
            try:
                piece = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not piece:
                break
            shown += piece
        os.close(leader)
        assert process.wait(timeout=300) == 0
        last = shown.decode().replace("\r", "\n").strip().splitlines()[-1]
        assert "MiB already there" in last and ("sent" in last or "fetched" in last), shown
    assert last.startswith("smolvmm: fetched ")


_ANNOUNCED_PULL = """
import sys
import smolvmm.oci.registry as registry
download = registry._download
async def announced(*args):
    print("downloading", flush=True)
    await download(*args)
registry._download = announced
from smolvmm.cli.dispatch import main
sys.exit(main(sys.argv[1:]))
"""


MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"


def test_sigterm_ends_a_build_whose_image_layer_stalls(tmp_path: Path) -> None:
    """A registry that stops sending in the middle of a layer: SIGTERM still ends the build (a stalled
    read would wait a minute for its timeout) with 143, and its scratch directory goes."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": "sha256:" + "1" * 64, "size": MIB}],
        }
    ).encode()

    stalled = threading.Event()

    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        if "/blobs/sha256:1111" in handler.path:  # the layer: 10 bytes of its MiB, then nothing
            handler.send_response(200)
            handler.send_header("Content-Length", str(MIB))
            handler.end_headers()
            handler.wfile.write(bytes(10))
            handler.wfile.flush()
            stalled.set()
            time.sleep(90)
            return
        body, kind = (manifest, MANIFEST_MEDIA_TYPE) if "/manifests/" in handler.path else (config, CONFIG_MEDIA_TYPE)
        handler.send_response(200)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with _FakeRegistry(answer) as fake:
        build = subprocess.Popen(
            [sys.executable, "-c", _ANNOUNCED_PULL, "build", "--image", f"docker://{fake.address}/app:v1"]
            + ["--net", "none", "-o", str(tmp_path / "app.smolmachine")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": str(scratch), "XDG_CACHE_HOME": str(tmp_path / "cache")},
        )
        try:
            assert build.stdout is not None and build.stdout.readline() == "downloading\n"
            assert stalled.wait(30)
            build.send_signal(signal.SIGTERM)
            _, errors = build.communicate(timeout=30)
        finally:
            build.kill()
    assert build.returncode == 128 + signal.SIGTERM and errors == ""
    assert list(scratch.iterdir()) == [] and not (tmp_path / "app.smolmachine").exists()
