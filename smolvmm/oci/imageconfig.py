"""The part of an image's config a machine runs with: Env, WorkingDir, User, Entrypoint, Cmd."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from smolvmm.errors import ImageError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LABEL = "smolvmm.image-config"  # the bundle label that holds it (JSON)
PLATFORM = ("linux", "amd64")  # the guest's, as an image config names it
_MAX_JSON = 256 << 10


def _strings(where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) and "\0" not in item for item in value):
        raise ImageError(f"{where} must be a list of strings")
    return tuple(value)


def _text(where: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or "\0" in value:
        raise ImageError(f"{where} must be a string")
    return value


@dataclass(frozen=True)
class ImageConfig:
    """How the image's process runs; ``env`` holds ``NAME=VALUE`` strings in image order."""

    env: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()

    @classmethod
    def from_image(cls, document: Any) -> ImageConfig:
        """From an OCI/Docker image config document (its ``config`` object); unknown fields are ignored."""
        if not isinstance(document, dict):
            raise ImageError("the image config is not a JSON object")
        platform = tuple(str(document.get(key, want))[:40] for key, want in zip(("os", "architecture"), PLATFORM))
        if platform != PLATFORM:  # its programs could not run in the guest
            raise ImageError(f"the image is for {'/'.join(platform)}; the guest runs {'/'.join(PLATFORM)} programs")
        config = document.get("config") or {}
        if not isinstance(config, dict):
            raise ImageError("the image config's 'config' is not a JSON object")
        env = _strings("the image config's Env", config.get("Env"))
        for item in env:
            if "=" not in item:
                raise ImageError(f"the image config's Env holds {item!r}, not NAME=VALUE")
        return cls(
            env=env,
            workdir=_text("the image config's WorkingDir", config.get("WorkingDir")),
            user=_text("the image config's User", config.get("User")),
            entrypoint=_strings("the image config's Entrypoint", config.get("Entrypoint")),
            cmd=_strings("the image config's Cmd", config.get("Cmd")),
        )

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The process environment: PATH defaulted as container runtimes do, then Env, then ``extra``."""
        env = {"PATH": DEFAULT_PATH, "HOME": "/root"}
        for item in self.env:
            name, _, value = item.partition("=")
            env[name] = value
        env.update(extra or {})
        return env

    def command(self, override: list[str] | None = None) -> list[str]:
        """``override`` when given (``run APP -- CMD`` runs CMD as it is), else Entrypoint + Cmd;
        ImageError when nothing is left to run."""
        argv = override if override else [*self.entrypoint, *self.cmd]
        if not argv:
            raise ImageError("the image sets no Entrypoint or Cmd: give a command after --")
        return argv

    def with_changes(self, **changes: Any) -> ImageConfig:
        """A copy with fields replaced (a Smolfile's env, workdir, user, cmd)."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values.update(changes)
        return ImageConfig(**values)

    def to_json(self) -> str:
        """This config as the JSON a bundle's label holds (``bundle_image_config`` reads it back)."""
        return json.dumps(
            {
                "Env": list(self.env),
                "WorkingDir": self.workdir,
                "User": self.user,
                "Entrypoint": list(self.entrypoint),
                "Cmd": list(self.cmd),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> ImageConfig:
        """From a bundle label (untrusted: checked like an image's config)."""
        if len(text) > _MAX_JSON:
            raise ImageError("the bundle's image config is too large")
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise ImageError(f"the bundle's image config is not JSON: {exc}") from None
        return cls.from_image({"config": document})


def bundle_image_config(labels: dict[str, str]) -> ImageConfig | None:
    """The image config a bundle was built with (from its labels), or None for other bundles."""
    text = labels.get(LABEL)
    return None if text is None else ImageConfig.from_json(text)
