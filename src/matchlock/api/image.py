"""OCI image configuration as the runtime uses it, and Docker's command composition."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# The image `run` boots when none is named; built from Debian's busybox on first use.
DEFAULT_IMAGE = "matchlock/busybox:builtin"


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an OCI image config that shape how a command runs.

    `entrypoint` and `cmd` are None when the image does not set them, which
    differs from an explicitly empty list (an override that clears them).
    Field names match the `image_config` object of the RPC `create` call.
    """

    user: str = ""
    working_dir: str = ""
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_oci(cls, config: dict) -> ImageConfig:
        """Build from the `config` object of an OCI/Docker image config blob."""
        env: dict[str, str] = {}
        for entry in config.get("Env") or []:
            key, sep, value = str(entry).partition("=")
            if key and sep:
                env[key] = value
        entrypoint = config.get("Entrypoint")
        cmd = config.get("Cmd")
        return cls(
            user=str(config.get("User") or ""),
            working_dir=str(config.get("WorkingDir") or ""),
            entrypoint=tuple(map(str, entrypoint)) if entrypoint is not None else None,
            cmd=tuple(map(str, cmd)) if cmd is not None else None,
            env=env,
        )

    def to_json(self) -> dict:
        out: dict = {}
        if self.user:
            out["user"] = self.user
        if self.working_dir:
            out["working_dir"] = self.working_dir
        if self.entrypoint is not None:
            out["entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            out["cmd"] = list(self.cmd)
        if self.env:
            out["env"] = dict(self.env)
        return out

    @classmethod
    def from_json(cls, data: dict) -> ImageConfig:
        return cls(
            user=data.get("user", ""),
            working_dir=data.get("working_dir", ""),
            entrypoint=tuple(data["entrypoint"]) if data.get("entrypoint") is not None else None,
            cmd=tuple(data["cmd"]) if data.get("cmd") is not None else None,
            env=dict(data.get("env") or {}),
        )

    def merged(self, override: ImageConfig) -> ImageConfig:
        """Apply an override: non-empty strings and non-None lists/maps replace."""
        return replace(
            self,
            user=override.user or self.user,
            working_dir=override.working_dir or self.working_dir,
            entrypoint=override.entrypoint if override.entrypoint is not None else self.entrypoint,
            cmd=override.cmd if override.cmd is not None else self.cmd,
            env={**self.env, **override.env} if override.env else self.env,
        )


def compose_command(image: ImageConfig, args: tuple[str, ...] | list[str]) -> list[str]:
    """Docker's rule: ENTRYPOINT is always prepended; arguments replace CMD."""
    entrypoint = list(image.entrypoint or ())
    if args:
        return entrypoint + list(args)
    return entrypoint + list(image.cmd or ())
