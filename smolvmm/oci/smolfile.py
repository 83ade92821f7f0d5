"""The Smolfile: a TOML recipe for ``smolvmm build -f Smolfile`` (see examples/Smolfile).

Every key is checked: an unknown key or a value of the wrong type is one ConfigError line
naming the file and the key. ``copy`` sources are files in the Smolfile's directory (its build
context, as Docker's): an absolute path, or one that leads outside it (``..``, a symlink), is refused.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from smolvmm.config import NetConfig, parse_size, special_file
from smolvmm.errors import ConfigError
from smolvmm.oci.build import READY_KINDS, ImageRecipe, ReadyCondition

_KEYS = {
    "image": 'a string like "oci:DIR:TAG" or "docker://REGISTRY/REPO:TAG"',
    "insecure": "true or false",
    "cpus": "an integer",
    "memory": 'a size string like "512M"',
    "disk_size": 'a size string like "1G"',
    "env": "a table of strings",
    "workdir": "a string",
    "user": "a string",
    "entrypoint": "a list of strings",
    "cmd": "a list of strings",
    "copy": "an array of tables with 'from' and 'to'",
    "run": "a list of strings",
    "warm": "a list of strings",
    "ready": "a table with one of 'port', 'exec', 'marker'",
    "kernel": '"minimal" (the minimal guest kernel; default: the Debian cloud kernel)',
    "net": 'a list of strings like "user,forward=8080:80" or "none", as --net (default: user networking)',
}


# ImageRecipe's fields as the keys that set them, for error messages.
_FIELDS = {
    "ImageRecipe.vcpus": "'cpus'",
    "ImageRecipe.memory": "'memory'",
    "ImageRecipe.disk_headroom": "'disk_size'",
    "ImageRecipe.env": "'env'",
    "ImageRecipe.kernel": "'kernel'",
    "ImageRecipe.networks": "'net'",
}


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _check(where: str, key: str, value: Any) -> None:
    ok = {
        "image": isinstance(value, str) and bool(value),
        "insecure": isinstance(value, bool),
        "cpus": isinstance(value, int) and not isinstance(value, bool),
        "memory": isinstance(value, str),
        "disk_size": isinstance(value, str),
        "env": isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
        "workdir": isinstance(value, str),
        "user": isinstance(value, str),
        "entrypoint": _strings(value),
        "cmd": _strings(value),
        "run": _strings(value),
        "warm": _strings(value),
        "copy": isinstance(value, list) and all(isinstance(item, dict) for item in value),
        "ready": isinstance(value, dict),
        "kernel": value == "minimal",
        "net": _strings(value),
    }[key]
    if not ok:
        raise ConfigError(f"{where}: '{key}' must be {_KEYS[key]}")


def _size(where: str, key: str, text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise ConfigError(f"{where}: '{key}': {exc}") from None


def _copies(where: str, context: Path, items: list[dict[str, Any]]) -> tuple[tuple[Path, str], ...]:
    """The files to copy: each in ``context`` (the Smolfile's directory, resolved) or below."""
    copies = []
    for number, item in enumerate(items):
        name = f"copy[{number}]"
        unknown = set(item) - {"from", "to"}
        if unknown:
            raise ConfigError(f"{where}: unknown key '{name}.{sorted(unknown)[0]}' (known: from, to)")
        source, target = item.get("from"), item.get("to")
        if not isinstance(source, str) or not source or "\0" in source:
            raise ConfigError(f"{where}: '{name}.from' must be a host path (a string without NUL characters)")
        if not isinstance(target, str) or not target.startswith("/"):
            raise ConfigError(f"{where}: '{name}.to' must be an absolute guest path (a string)")
        if Path(source).is_absolute():
            raise ConfigError(f"{where}: '{name}.from' {source!r} is an absolute path: name a file in {context}")
        path = (context / source).resolve()
        if not path.is_relative_to(context):  # through '..' or a symlink: the Smolfile's author may not be you
            raise ConfigError(f"{where}: '{name}.from' {source!r} leads outside {context}, the Smolfile's directory")
        if not path.is_file():
            raise ConfigError(f"{where}: '{name}.from' {source!r} is not a file")
        copies.append((path, target))
    return tuple(copies)


def _ready(where: str, table: dict[str, Any]) -> ReadyCondition:
    unknown = set(table) - {"port", "exec", "marker"}
    if unknown:
        raise ConfigError(f"{where}: unknown key 'ready.{sorted(unknown)[0]}' (known: port, exec, marker)")
    if len(table) != 1:
        raise ConfigError(f"{where}: 'ready' needs exactly one of 'port', 'exec', 'marker'")
    kind = next(kind for kind in READY_KINDS if kind in table)
    value = table[kind]
    if kind == "port" and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ConfigError(f"{where}: 'ready.port' must be an integer")
    if kind != "port" and not isinstance(value, str):
        raise ConfigError(f"{where}: 'ready.{kind}' must be a string")
    try:
        return ReadyCondition(kind, str(value))
    except ConfigError as exc:
        raise ConfigError(f"{where}: 'ready.{kind}': {exc}") from None


def load_smolfile(path: str | Path, **overrides: Any) -> ImageRecipe:
    """The recipe in Smolfile ``path``; ``overrides`` (ImageRecipe fields, e.g. from command-line
    flags) win over the file's values."""
    path = Path(path)
    where = f"Smolfile {path}"
    kind = special_file(path)
    if kind is not None:
        raise ConfigError(f"{where} is {kind}, not a file")
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    for key, value in document.items():
        if key not in _KEYS:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(_KEYS)})")
        _check(where, key, value)
    if "image" not in document:
        raise ConfigError(f"{where}: 'image' is required (the base image, e.g. \"oci:DIR:TAG\")")
    fields: dict[str, Any] = {"image": document["image"]}
    simple = {"insecure": "insecure", "cpus": "vcpus", "workdir": "workdir", "user": "user", "kernel": "kernel"}
    fields.update({name: document[key] for key, name in simple.items() if key in document})
    if "memory" in document:
        fields["memory"] = _size(where, "memory", document["memory"])
    if "disk_size" in document:
        fields["disk_headroom"] = _size(where, "disk_size", document["disk_size"])
    for key, name in (("entrypoint", "entrypoint"), ("cmd", "cmd"), ("run", "steps"), ("warm", "warm")):
        if key in document:
            fields[name] = tuple(document[key])
    if "env" in document:
        fields["env"] = dict(document["env"])
    if "copy" in document:
        fields["context"] = path.parent.resolve()
        fields["files"] = _copies(where, fields["context"], document["copy"])
    if "ready" in document:
        fields["ready"] = _ready(where, document["ready"])
    if "net" in document:
        try:
            fields["networks"] = NetConfig.parse_flags(document["net"])
        except ConfigError as exc:
            raise ConfigError(f"{where}: 'net': {exc}") from None
    try:  # the file's values, checked as the API checks them (a vCPU count, a size of RAM, env names)
        recipe = ImageRecipe(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.naming(_FIELDS)}") from None
    return dataclasses.replace(recipe, **overrides)
