"""A small client for the OCI distribution API (``/v2/``), over httpx (anyio: trio or asyncio).

It does what push and pull need and no more: ``HEAD``/``GET`` blobs, uploads (monolithic ``POST``
then ``PUT``, or chunked ``PATCH``es then ``PUT``), cross-repository mounts, manifests by tag or
digest, bearer tokens from a ``WWW-Authenticate`` challenge and basic auth with the docker config's
credentials. Plain HTTP only for loopback registries or with ``insecure``. Every blob is hashed
while it arrives and is refused unless its sha256 matches; nothing is read past a stated size.
"""

from __future__ import annotations

import base64
import hashlib
import http
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import httpx

from smolvmm.errors import RegistryError
from smolvmm.oci.manifest import INDEX_TYPES
from smolvmm.registry.auth import credentials, parse_challenge
from smolvmm.registry.reference import Reference

MANIFEST_ACCEPT = "application/vnd.oci.image.manifest.v1+json"
MAX_TOKEN_ANSWER = 1 << 20
MAX_ERROR_BODY = 4096
UPLOAD_CHUNK = 8 << 20  # blobs above this go up in PATCH chunks of this size
TIMEOUT = 60.0  # seconds a read or write may stall
CONNECT_TIMEOUT = 10.0  # seconds to connect


@dataclass
class Counters:
    """Blob bytes moved through this client (manifests and configs are not counted)."""

    sent: int = 0
    received: int = 0
    on_change: Callable[[], None] | None = field(default=None, repr=False)

    def add(self, *, sent: int = 0, received: int = 0) -> None:
        self.sent += sent
        self.received += received
        if self.on_change:
            self.on_change()


async def _head(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of an answer's body as they came (a hostile registry's may never end),
    then the answer closed; what arrived before the connection failed, if it did."""
    body = b""
    try:
        if not (response.is_closed or response.is_stream_consumed):
            async for piece in response.aiter_raw():
                body += piece
                if len(body) >= limit:
                    break
    except httpx.HTTPError:
        pass
    finally:
        await response.aclose()
    return body[:limit]


async def _error_text(response: httpx.Response) -> str:
    """The codes and messages of the registry's error answer (its first MAX_ERROR_BODY bytes), on one line."""
    body = await _head(response, MAX_ERROR_BODY)
    if response.headers.get("Content-Encoding", "identity") != "identity":
        return ""  # compressed: the bytes read are not JSON
    try:
        errors = json.loads(body).get("errors") or []
        text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
    except (ValueError, AttributeError, TypeError):
        return ""
    return " ".join(text.split())[:300]


def _failure(exc: httpx.HTTPError) -> str:
    """What went wrong, in words: httpx's timeouts have no text of their own, nor do some other errors."""
    if isinstance(exc, httpx.ConnectTimeout):
        return f"timed out after {CONNECT_TIMEOUT:g} s while connecting"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out after {TIMEOUT:g} s"
    text = " ".join(str(exc).split())
    return text or "".join(f" {c.lower()}" if c.isupper() else c for c in type(exc).__name__).strip()


def wrong_manifest(reference: object, media_type: str, expected: str) -> RegistryError:
    """A manifest of another media type than ``expected``; an index (a list of manifests) is said to be one."""
    if media_type in INDEX_TYPES:
        return RegistryError(
            f"{reference} is an image index (a list of manifests), not one image manifest ({expected})"
        )
    return RegistryError(f"{reference} is of media type {media_type[:100]!r}, not {expected}")


class RegistryClient:
    """One registry, as an async context manager. ``repository`` arguments are repository names."""

    def __init__(
        self, registry: str, *, insecure: bool = False, loopback: bool = False, counters: Counters | None = None
    ) -> None:
        self.registry = registry
        self.plain_http_allowed = insecure or loopback
        self.counters = counters or Counters()
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(TIMEOUT, connect=CONNECT_TIMEOUT),
            follow_redirects=True,
            verify=not insecure,
            limits=httpx.Limits(max_connections=16),
        )
        self._base = ""
        self._tokens: dict[tuple[str, ...], str] = {}
        self._basic: str | None = None
        self._credentials: tuple[str, str] | None | Literal[False] = False  # False: not looked up yet

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._http.aclose()

    def _lost(self, exc: httpx.HTTPError, doing: str) -> RegistryError:
        return RegistryError(f"lost the connection to {self.registry} while {doing}: {_failure(exc)}")

    async def _base_url(self) -> str:
        """https, or plain http where allowed and the registry does not speak TLS."""
        if self._base:
            return self._base
        schemes = ("https", "http") if self.plain_http_allowed else ("https",)
        last: httpx.TransportError | None = None
        for scheme in schemes:
            try:
                async with self._http.stream("GET", f"{scheme}://{self.registry}/v2/"):
                    pass  # any answer will do, its body unread
            except httpx.TransportError as exc:
                last = exc
                continue
            self._base = f"{scheme}://{self.registry}"
            return self._base
        hint = (
            "" if self.plain_http_allowed else " (plain HTTP is used only for loopback registries or with --insecure)"
        )
        raise RegistryError(f"cannot reach registry {self.registry}: {_failure(last) if last else ''}{hint}")

    def _login(self) -> tuple[str, str] | None:
        if self._credentials is False:
            self._credentials = credentials(self.registry)
        return self._credentials or None

    async def _token(self, challenge: dict[str, str], scopes: Sequence[str]) -> str:
        realm = challenge.get("realm")
        if not realm:
            raise RegistryError(f"{self.registry} asks for a bearer token but names no realm")
        scheme = realm.partition("://")[0].lower()
        if scheme != "https" and not (scheme == "http" and self.plain_http_allowed):
            raise RegistryError(
                f"{self.registry} names a token service that is not https ({realm[:100]!r});"
                " plain HTTP is used only for loopback registries or with --insecure"
            )
        params: list[tuple[str, str]] = [("scope", s) for s in scopes]
        if challenge.get("service"):
            params.append(("service", challenge["service"]))
        login = self._login()
        auth = httpx.BasicAuth(*login) if login else None
        request = self._http.build_request("GET", realm, params=tuple(params))  # httpx types lists invariantly
        body = b""
        try:
            response = await self._http.send(request, auth=auth, stream=True)
            try:
                async for piece in response.aiter_bytes():  # decoded; a hostile service's may never end
                    body += piece
                    if len(body) > MAX_TOKEN_ANSWER:
                        break
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise self._lost(exc, "asking for a token") from None
        if response.status_code in (401, 403):
            raise RegistryError(
                f"{self.registry} refused the credentials{' from the docker config' if login else ' (none in the docker config)'} for {' '.join(scopes)}"
            )
        if response.status_code != 200 or len(body) > MAX_TOKEN_ANSWER:
            raise RegistryError(f"{self.registry}'s token service answered {response.status_code}")
        try:
            answer = json.loads(body)
            return str(answer.get("token") or answer["access_token"])
        except (ValueError, KeyError, AttributeError):
            raise RegistryError(f"{self.registry}'s token service sent no token") from None

    def _auth_header(self, scopes: tuple[str, ...]) -> dict[str, str]:
        if scopes in self._tokens:
            return {"Authorization": f"Bearer {self._tokens[scopes]}"}
        if self._basic:
            return {"Authorization": self._basic}
        return {}

    async def request(
        self,
        method: str,
        url: str,
        scopes: tuple[str, ...],
        *,
        doing: str,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        params: dict[str, str] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """Send a request with authentication (answering one 401 challenge); ``url`` may be a path.

        A ``stream`` answer is the caller's to read and close. Otherwise a successful answer comes
        read (at most MAX_ERROR_BODY bytes of its body) and closed; a failed one is left for
        ``_check`` to read the registry's error from and close."""
        base = await self._base_url()
        target = url if url.startswith(("http://", "https://")) else base + url
        for attempt in range(2):
            request = self._http.build_request(
                method, target, headers={**(headers or {}), **self._auth_header(scopes)}, content=content, params=params
            )
            try:
                response = await self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise self._lost(exc, doing) from None
            if response.status_code != 401:
                if not stream and response.status_code < 400:
                    await _head(response, MAX_ERROR_BODY)
                return response
            await response.aclose()
            challenge = response.headers.get("WWW-Authenticate", "")
            if attempt:
                break
            scheme, params_ = parse_challenge(challenge)
            if scheme == "bearer":
                self._tokens[scopes] = await self._token(params_, scopes)
            elif scheme == "basic":
                login = self._login()
                if login is None:
                    raise RegistryError(f"{self.registry} asks for a login and the docker config has none for it")
                self._basic = "Basic " + base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
            else:
                raise RegistryError(f"{self.registry} asks for authentication of an unknown kind: {challenge[:100]!r}")
        raise RegistryError(f"{self.registry} refused the credentials while {doing}")

    async def _check(self, response: httpx.Response, expected: tuple[int, ...], doing: str) -> None:
        """Nothing when the answer's status is ``expected``; else a RegistryError (the answer closed)."""
        if response.status_code in expected:
            return
        detail = await _error_text(response)
        if response.status_code == 403:
            raise RegistryError(f"{self.registry} denied access while {doing}")
        try:
            status = f"{response.status_code} ({http.HTTPStatus(response.status_code).phrase})"
        except ValueError:
            status = str(response.status_code)
        raise RegistryError(f"{self.registry} answered {status} while {doing}{': ' + detail if detail else ''}")

    # Blobs

    async def has_blob(self, repository: str, digest: str) -> bool:
        """Whether the repository holds ``digest`` (``HEAD``)."""
        doing = f"checking for blob {digest}"
        response = await self.request("HEAD", f"/v2/{repository}/blobs/{digest}", _pull(repository), doing=doing)
        if response.status_code == 404:
            await response.aclose()
            return False
        await self._check(response, (200,), doing)
        return True

    async def start_upload(self, repository: str, digest: str, mount_from: str | None) -> str | None:
        """Open an upload session (``POST``); mounts from ``mount_from`` if it can. Returns the
        session's URL, or None when the blob was mounted."""
        scopes = _push(repository) + (_pull(mount_from) if mount_from else ())
        params = {"mount": digest, "from": mount_from} if mount_from else None
        doing = f"starting the upload of {digest}"
        response = await self.request("POST", f"/v2/{repository}/blobs/uploads/", scopes, doing=doing, params=params)
        if mount_from and response.status_code == 201:
            return None
        await self._check(response, (202,), doing)
        return str(response.url.join(response.headers.get("Location", "")))

    async def upload(self, repository: str, digest: str, data: bytes, session: str) -> None:
        """Upload ``data``: one ``PUT`` when it is small, else ``PATCH`` chunks then the closing ``PUT``."""
        scopes = _push(repository)
        doing = f"uploading blob {digest}"
        location = session
        body = data
        if len(data) > UPLOAD_CHUNK:
            for start in range(0, len(data), UPLOAD_CHUNK):
                piece = data[start : start + UPLOAD_CHUNK]
                headers = {
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{start}-{start + len(piece) - 1}",
                }
                response = await self.request("PATCH", location, scopes, doing=doing, headers=headers, content=piece)
                await self._check(response, (202,), doing)
                self.counters.add(sent=len(piece))
                location = str(response.url.join(response.headers.get("Location", location)))
            body = b""
        url = httpx.URL(location).copy_merge_params({"digest": digest})
        headers = {"Content-Type": "application/octet-stream"}
        response = await self.request("PUT", str(url), scopes, doing=doing, headers=headers, content=body)
        await self._check(response, (201, 204), doing)
        self.counters.add(sent=len(body))

    async def fetch_blob(self, repository: str, digest: str, size: int, write: Callable[[bytes], object]) -> None:
        """Stream blob ``digest`` into ``write``, at most ``size`` bytes, and check its sha256."""
        doing = f"fetching blob {digest}"
        response = await self.request(
            "GET", f"/v2/{repository}/blobs/{digest}", _pull(repository), doing=doing, stream=True
        )
        try:
            if response.status_code == 404:
                raise RegistryError(f"{self.registry}/{repository} lacks blob {digest} that its manifest lists")
            await self._check(response, (200,), doing)
            hasher = hashlib.sha256()
            got = 0
            try:
                async for piece in response.aiter_raw():
                    got += len(piece)
                    if got > size:
                        raise RegistryError(f"blob {digest} from {self.registry} is longer than its {size} bytes")
                    hasher.update(piece)
                    write(piece)
                    self.counters.add(received=len(piece))
            except httpx.HTTPError as exc:
                raise self._lost(exc, doing) from None
        finally:
            await response.aclose()
        if got != size:
            raise RegistryError(f"blob {digest} from {self.registry} ended after {got} of its {size} bytes")
        if "sha256:" + hasher.hexdigest() != digest:
            raise RegistryError(
                f"blob {digest} from {self.registry}/{repository} does not match its digest"
                f" (its bytes hash to sha256:{hasher.hexdigest()}): the registry's copy is corrupt or was tampered with"
            )

    async def fetch_small(self, repository: str, digest: str, size: int) -> bytes:
        """A whole blob of at most ``size`` bytes (a config), checked."""
        parts: list[bytes] = []
        await self.fetch_blob(repository, digest, size, parts.append)
        return b"".join(parts)

    # Manifests

    async def get_manifest(self, ref: Reference, limit: int, accept: str = MANIFEST_ACCEPT) -> tuple[bytes, str]:
        """The manifest ``ref`` names and its sha256 digest (checked against ``ref``'s digest, if
        any); an answer whose Content-Type is a media type ``accept`` does not list is refused
        (a generic one, such as ``application/json``, is left to the caller's check of the body)."""
        doing = f"fetching the manifest of {ref}"
        response = await self.request(
            "GET",
            f"/v2/{ref.repository}/manifests/{ref.manifest_reference}",
            _pull(ref.repository),
            doing=doing,
            headers={"Accept": accept},
            stream=True,
        )
        try:
            if response.status_code == 404:
                raise RegistryError(f"{ref}: not in the registry (HTTP 404, unknown reference)")
            await self._check(response, (200,), doing)
            media_type = response.headers.get("Content-Type", "").partition(";")[0].strip().lower()
            if media_type.startswith("application/vnd.") and media_type not in accept.replace(" ", "").split(","):
                raise wrong_manifest(ref, media_type, accept)
            data = b""
            try:
                async for piece in response.aiter_raw():
                    data += piece
                    if len(data) > limit:
                        raise RegistryError(f"{ref}: the manifest is larger than {limit} bytes")
            except httpx.HTTPError as exc:
                raise self._lost(exc, doing) from None
        finally:
            await response.aclose()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if ref.digest and digest != ref.digest:
            raise RegistryError(
                f"the manifest {self.registry} sent for {ref} does not match its digest (it is {digest})"
            )
        return data, digest

    async def put_manifest(self, repository: str, reference: str, data: bytes) -> None:
        """Store a manifest under a tag or its digest."""
        doing = f"storing the manifest as {repository}:{reference}"
        response = await self.request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            _push(repository),
            doing=doing,
            headers={"Content-Type": MANIFEST_ACCEPT},
            content=data,
        )
        await self._check(response, (201, 200), doing)


def _pull(repository: str) -> tuple[str, ...]:
    return (f"repository:{repository}:pull",)


def _push(repository: str) -> tuple[str, ...]:
    return (f"repository:{repository}:pull,push",)
