"""What the EnvHub stores: an env spec as pushed, and the record kept for each version."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rock_serve.errors import InvalidRequest

__all__ = ["ENV_NAME", "ENV_VERSION", "SHA256", "EnvRecord", "HubEnvSpec", "parse_spec"]

#: An env name: ``Name`` or ``namespace/Name`` (Gymnasium-style ids such as ``acme/Echo-v0``).
ENV_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}(/[A-Za-z0-9][A-Za-z0-9_.:-]{0,127})?$"
#: A version label (``1``, ``0.3.1``, ``2026-01-rc1``); the latest is the last pushed. Names and
#: labels fit the env registry's ids, where a version becomes ``name:version``.
ENV_VERSION = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: A lowercase hex SHA-256 digest.
SHA256 = r"^[0-9a-f]{64}$"


class HubEnvSpec(BaseModel):
    """An env as pushed to the hub (the body of a spec YAML/JSON file)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = Field(
        pattern=ENV_NAME, max_length=160, description="Env name, e.g. ``acme/Terminal-v0``."
    )
    version: str = Field(
        default="1", pattern=ENV_VERSION, description="Version label of this push."
    )
    entry_point: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
        description="``module:Class`` of the env, importable where it is made.",
    )
    image: str | None = Field(default=None, description="Sandbox image or rootfs the env uses.")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments given to the env's constructor."
    )
    max_episode_steps: int | None = Field(
        default=None, ge=1, description="Steps before the time limit truncates an episode."
    )
    description: str = Field(default="", max_length=4096, description="Free text.")
    shared_sandbox: bool = Field(
        default=False, description="Envs of this id share one sandbox (one session each)."
    )
    bundle_kwarg: str | None = Field(
        default="task_dir",
        pattern=r"^[A-Za-z_]\w*$",
        description="Keyword argument through which the env receives the local directory of "
        "its unpacked task bundle; None to pass nothing.",
    )


class EnvRecord(HubEnvSpec):
    """One stored version of an env: the spec plus its bundle and push time."""

    bundle_sha256: str | None = Field(
        default=None, pattern=SHA256, description="SHA-256 of the task bundle (a tar), if any."
    )
    bundle_size: int | None = Field(default=None, ge=0, description="Bundle size in bytes.")
    pushed_at: float = Field(description="Push time, seconds since the epoch.")

    def spec(self) -> HubEnvSpec:
        """The spec alone (what was pushed)."""
        return HubEnvSpec.model_validate(self.model_dump(include=set(HubEnvSpec.model_fields)))

    @property
    def registry_id(self) -> str:
        """The id under which :meth:`EnvHub.make` registers this version (``name:version``)."""
        return f"{self.name}:{self.version}"


def parse_spec(data: HubEnvSpec | Mapping[str, Any]) -> HubEnvSpec:
    """Validate a spec given as a model or plain data.

    Raises:
        InvalidRequest: unknown fields or bad values (every problem listed).
    """
    if isinstance(data, HubEnvSpec):
        return HubEnvSpec.model_validate(data.model_dump(include=set(HubEnvSpec.model_fields)))
    try:
        return HubEnvSpec.model_validate(dict(data))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidRequest(f"bad env spec: {problems}") from None
    except TypeError:
        raise InvalidRequest("bad env spec: expected a mapping") from None
