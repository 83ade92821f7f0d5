"""Pulling an image over the OCI distribution API (``docker://REGISTRY/REPO[:TAG|@DIGEST]``).

A small, bounded client: manifests up to MAX_DOCUMENT, blobs exactly their descriptor's size
and digest, bearer-token or basic auth answering a 401 (credentials from
``~/.docker/config.json``), at most a few redirects with the Authorization dropped when the
host changes. HTTPS, except plain HTTP for a loopback registry or with ``insecure``.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import os
import re
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolvmm.errors import ImageError
from smolvmm.oci.imageconfig import ImageConfig
from smolvmm.oci.source import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_DOCUMENT,
    Descriptor,
    Image,
    Layer,
    check_digest,
    copy_limited,
    load_json,
    parse_manifest,
    pick_manifest,
)

DOCKER_HUB = "registry-1.docker.io"
_ACCEPT = ", ".join(sorted(INDEX_TYPES | MANIFEST_TYPES))
_TIMEOUT = 60
_MAX_REDIRECTS = 5
_REPO = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")


@dataclass(frozen=True)
class Reference:
    """Where an image lives: registry host[:port], repository, and a tag or digest."""

    registry: str
    repository: str
    reference: str

    @classmethod
    def parse(cls, text: str) -> Reference:
        """``//REGISTRY/REPO[:TAG|@sha256:...]`` (skopeo's docker: transport, after the colon)."""
        if not text.startswith("//"):
            raise ImageError(f"docker:{text}: write docker://REGISTRY/REPO[:TAG]")
        name = text[2:]
        name, at, digest = name.partition("@")
        first, slash, rest = name.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            registry, path = first, rest
        else:
            registry, path = DOCKER_HUB, name if "/" in name else f"library/{name}"
        tag = "latest"
        if ":" in path.rsplit("/", 1)[-1]:
            path, _, tag = path.rpartition(":")
        if at:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                raise ImageError(f"docker:{text}: the digest must be sha256:<64 hex digits>")
            tag = digest
        elif not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag):
            raise ImageError(f"docker:{text}: invalid tag {tag!r}")
        if not _REPO.fullmatch(path):
            raise ImageError(f"docker:{text}: invalid repository name {path!r}")
        return cls(registry, path, tag)


def _is_loopback(registry: str) -> bool:
    host = urllib.parse.urlsplit(f"//{registry}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _credentials(registry: str) -> tuple[str, str] | None:
    """(user, password) for ``registry`` from $DOCKER_CONFIG/config.json or ~/.docker/config.json."""
    path = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json"
    try:
        document = json.loads(path.read_bytes()[:MAX_DOCUMENT])
    except (OSError, ValueError):
        return None
    auths = document.get("auths") if isinstance(document, dict) else None
    if not isinstance(auths, dict):
        return None
    names = [registry, f"https://{registry}", f"http://{registry}"]
    if registry == DOCKER_HUB:
        names += ["https://index.docker.io/v1/", "index.docker.io", "docker.io"]
    for name in names:
        entry = auths.get(name)
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise ImageError(f"{path}: the auth entry for {name} is not base64 user:password") from None
            return user, password
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return entry["username"], entry["password"]
    return None


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, params = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', params))


class Client:
    """One repository on one registry; remembers the authorization it earned."""

    def __init__(self, reference: Reference, insecure: bool) -> None:
        self.reference = reference
        self.plain = insecure or _is_loopback(reference.registry)
        self.authorization: str | None = None
        self.where = f"docker://{reference.registry}/{reference.repository}"

    def _request(self, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        for _ in range(_MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme == "https":
                connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                    parts.netloc, timeout=_TIMEOUT, context=ssl.create_default_context())
            elif parts.scheme == "http" and self.plain:
                connection = http.client.HTTPConnection(parts.netloc, timeout=_TIMEOUT)
            else:
                raise ImageError(f"{self.where}: refusing {parts.scheme}:// ({url[:100]}); plain HTTP only with --insecure")
            try:
                connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise ImageError(f"{self.where}: {parts.netloc}: {exc}") from None
            if response.status in (301, 302, 303, 307, 308):
                target = urllib.parse.urljoin(url, response.getheader("Location") or "")
                response.close()
                if urllib.parse.urlsplit(target).netloc != parts.netloc:
                    headers = {k: v for k, v in headers.items() if k != "Authorization"}
                url = target
                continue
            return response
        raise ImageError(f"{self.where}: more than {_MAX_REDIRECTS} redirects")

    def _url(self, kind: str, name: str) -> str:
        scheme = "http" if self.plain else "https"
        return f"{scheme}://{self.reference.registry}/v2/{self.reference.repository}/{kind}/{name}"

    def get(self, kind: str, name: str, accept: str | None = None) -> http.client.HTTPResponse:
        """GET a manifest or blob, answering one auth challenge; ImageError unless 200."""
        for attempt in range(2):
            headers = {"User-Agent": "smolvmm"}
            if accept:
                headers["Accept"] = accept
            if self.authorization:
                headers["Authorization"] = self.authorization
            response = self._request(self._url(kind, name), headers)
            if response.status == 401 and attempt == 0:
                challenge = response.getheader("WWW-Authenticate") or ""
                response.read(MAX_DOCUMENT)
                self._authorize(challenge)
                continue
            if response.status != 200:
                body = response.read(4096).decode(errors="replace")
                detail = _error_message(body) or response.reason
                raise ImageError(f"{self.where}: {kind[:-1]} {name}: HTTP {response.status} {detail}")
            return response
        raise AssertionError("unreachable")

    def _authorize(self, challenge: str) -> None:
        scheme, params = _challenge(challenge)
        credentials = _credentials(self.reference.registry)
        basic = "Basic " + base64.b64encode(":".join(credentials).encode()).decode() if credentials else None
        if scheme == "basic":
            if basic is None:
                raise ImageError(f"{self.where}: the registry wants a login; add it to ~/.docker/config.json")
            self.authorization = basic
            return
        if scheme != "bearer" or "realm" not in params:
            raise ImageError(f"{self.where}: unsupported authentication challenge {challenge[:100]!r}")
        query = {"scope": params.get("scope") or f"repository:{self.reference.repository}:pull"}
        if "service" in params:
            query["service"] = params["service"]
        realm = urllib.parse.urlsplit(params["realm"])
        if realm.scheme != "https" and not (realm.scheme == "http" and self.plain):
            raise ImageError(f"{self.where}: refusing token realm {params['realm'][:100]!r} (not https)")
        headers = {"User-Agent": "smolvmm", **({"Authorization": basic} if basic else {})}
        response = self._request(f"{params['realm']}?{urllib.parse.urlencode(query)}", headers)
        body = response.read(MAX_DOCUMENT + 1)
        if response.status != 200:
            raise ImageError(f"{self.where}: the token service answered HTTP {response.status}"
                             f" {_error_message(body.decode(errors='replace')) or response.reason}")
        document = load_json(f"{self.where}: token response", body)
        token = document.get("token") or document.get("access_token") if isinstance(document, dict) else None
        if not isinstance(token, str) or not token:
            raise ImageError(f"{self.where}: the token service gave no token")
        self.authorization = f"Bearer {token}"

    def document(self, kind: str, name: str, digest: str | None, accept: str | None = None) -> tuple[Any, str]:
        """A JSON document (bounded, and checked against ``digest`` when known) and its digest."""
        response = self.get(kind, name, accept)
        data = response.read(MAX_DOCUMENT + 1)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest:
            check_digest(f"{self.where}: {kind[:-1]} {name}", data, digest)
        return load_json(f"{self.where}: {kind[:-1]} {name}", data), actual


def _error_message(body: str) -> str:
    try:
        errors = json.loads(body).get("errors")
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)[:200]
    except (ValueError, AttributeError, TypeError):
        return ""


def pull(text: str, work: Path, *, insecure: bool = False, progress: Callable[[str], None] | None = None) -> Image:
    """Download ``//REGISTRY/REPO[:TAG|@DIGEST]``'s linux/amd64 image into ``work``, verified."""
    reference = Reference.parse(text)
    client = Client(reference, insecure)
    pinned = reference.reference if reference.reference.startswith("sha256:") else None
    document, digest = client.document("manifests", reference.reference, pinned, _ACCEPT)
    if isinstance(document, dict) and (document.get("mediaType") in INDEX_TYPES or "manifests" in document):
        chosen = pick_manifest(f"{client.where}: manifest list", document)
        document, digest = client.document("manifests", chosen.digest, chosen.digest, _ACCEPT)
    config_descriptor, descriptors = parse_manifest(f"{client.where}: manifest {digest}", document)
    config, _ = client.document("blobs", config_descriptor.digest, config_descriptor.digest)
    work.mkdir(parents=True, exist_ok=True)
    layers = []
    for number, descriptor in enumerate(descriptors):
        path = work / descriptor.digest.removeprefix("sha256:")
        if progress:
            progress(f"pulling layer {number + 1}/{len(descriptors)} ({descriptor.size / (1 << 20):.1f} MiB)")
        _download(client, descriptor, path)
        layers.append(Layer(f"{number} ({descriptor.digest[:19]})", descriptor.size,
                            lambda path=path: open(path, "rb")))
    return Image(digest, ImageConfig.from_image(config), tuple(layers))


def _download(client: Client, descriptor: Descriptor, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    response = client.get("blobs", descriptor.digest)
    try:
        with open(partial, "wb") as out:
            copy_limited(f"{client.where}: blob {descriptor.digest}", response, out, descriptor)
        partial.rename(path)
    except http.client.HTTPException as exc:
        raise ImageError(f"{client.where}: blob {descriptor.digest}: {exc!r}") from None
    except OSError as exc:
        raise ImageError(f"{client.where}: saving blob {descriptor.digest}: {exc.strerror or exc}") from None
    finally:
        response.close()
        partial.unlink(missing_ok=True)
