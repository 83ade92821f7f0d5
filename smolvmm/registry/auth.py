"""Registry credentials (``~/.docker/config.json``: ``auths``, ``credHelpers``, ``credsStore``)
and ``WWW-Authenticate`` challenges."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from pathlib import Path

from smolvmm.errors import RegistryError

_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^\s,]*))')
_HELPER_TIMEOUT = 30
_MAX_CONFIG = 1 << 20
_ALIASES = {
    "registry-1.docker.io": ("https://index.docker.io/v1/", "index.docker.io", "docker.io")
}  # docker login's keys


def docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    return Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json"


def _helper(helper: str, registry: str) -> tuple[str, str] | None:
    """Ask ``docker-credential-HELPER get``; None when it has nothing for ``registry``."""
    program = f"docker-credential-{helper}"
    try:
        done = subprocess.run(
            [program, "get"], input=registry.encode(), capture_output=True, timeout=_HELPER_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise RegistryError(f"the docker config names credential helper {program}, which is not installed") from None
    except subprocess.TimeoutExpired:
        raise RegistryError(f"{program} did not answer within {_HELPER_TIMEOUT} s") from None
    if done.returncode != 0:
        return None  # "credentials not found in native keychain"
    try:
        answer = json.loads(done.stdout[:_MAX_CONFIG])
        return str(answer["Username"]), str(answer["Secret"])
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"{program} answered something that is not credentials") from None


def credentials(registry: str) -> tuple[str, str] | None:
    """The user name and password (or token) for ``registry`` from the docker config, if any."""
    path = docker_config_path()
    try:
        with open(path, "rb") as file:
            config = json.loads(file.read(_MAX_CONFIG))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise RegistryError(f"{path} is not a JSON object")
    helpers = config.get("credHelpers") or {}
    if isinstance(helpers, dict) and isinstance(helpers.get(registry), str):
        return _helper(helpers[registry], registry)
    auths = config.get("auths") or {}
    keys = (registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v2/", f"https://{registry}/v1/")
    for key in keys + _ALIASES.get(registry, ()):
        entry = auths.get(key) if isinstance(auths, dict) else None
        if isinstance(entry, dict) and entry.get("auth"):
            try:
                user, _, secret = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise RegistryError(f"{path}: the auth entry for {registry} is not base64 user:password") from None
            return user, secret
        if isinstance(entry, dict) and entry.get("identitytoken"):
            return "<token>", str(entry["identitytoken"])
    if isinstance(config.get("credsStore"), str):
        return _helper(config["credsStore"], registry)
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> ("bearer", {"realm": ..., "service": ...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m[1].lower(): m[2] if m[2] is not None else m[3] for m in _PARAM.finditer(rest)}
    return scheme.lower(), params
