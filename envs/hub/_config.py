"""Where the EnvHub keeps its metadata, its artifacts and its cache.

Defaults put everything under one home directory: ``$ROCK_HOME`` or
``~/.local/share/rock-serve`` (``$XDG_DATA_HOME/rock-serve`` when that is set). The artifact
store is a tagged union (``type: local | s3``); S3 credentials come from boto3's usual chain
(environment, shared config files, instance roles), never from this config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rock_serve.errors import InvalidConfig

__all__ = [
    "HubConfig",
    "LocalStoreConfig",
    "S3StoreConfig",
    "StoreConfig",
    "default_home",
    "parse_hub_config",
]


def default_home(environ: Mapping[str, str] | None = None) -> Path:
    """The directory that holds rock-serve's local data.

    ``$ROCK_HOME`` if set, else ``$XDG_DATA_HOME/rock-serve``, else
    ``~/.local/share/rock-serve``.
    """
    env = os.environ if environ is None else environ
    if env.get("ROCK_HOME"):
        return Path(env["ROCK_HOME"]).expanduser()
    if env.get("XDG_DATA_HOME"):
        return Path(env["XDG_DATA_HOME"]).expanduser() / "rock-serve"
    return Path.home() / ".local" / "share" / "rock-serve"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class LocalStoreConfig(_Config):
    """Artifacts as files in a local directory (the default store)."""

    type: Literal["local"] = Field(default="local", description="Selects the local store.")
    root: str | None = Field(
        default=None, description="Directory of the artifacts; None = ``<home>/artifacts``."
    )


class S3StoreConfig(_Config):
    """Artifacts as objects in an S3 bucket (any S3-protocol server), through boto3."""

    type: Literal["s3"] = Field(default="s3", description="Selects the S3 store.")
    bucket: str = Field(min_length=3, max_length=63, description="Bucket name (must exist).")
    prefix: str = Field(
        default="rock-serve/envhub",
        max_length=512,
        description="Key prefix; objects live at ``<prefix>/sha256/<digest>``.",
    )
    endpoint_url: str | None = Field(
        default=None, description="S3 endpoint (None = AWS); e.g. a MinIO or Ceph URL."
    )
    region: str | None = Field(default=None, description="Region name (None = boto3's default).")
    presign_seconds: int = Field(
        default=3600, ge=1, le=7 * 86_400, description="Lifetime of presigned URLs."
    )


StoreConfig = Annotated[LocalStoreConfig | S3StoreConfig, Field(discriminator="type")]


class HubConfig(_Config):
    """The EnvHub's settings; :meth:`from_env` reads them from ``ROCK_*`` variables."""

    home: str | None = Field(
        default=None, description="Base directory; None = ``$ROCK_HOME`` or the XDG default."
    )
    db_path: str | None = Field(
        default=None, description="SQLite file of the metadata; None = ``<home>/envhub.sqlite3``."
    )
    cache_dir: str | None = Field(
        default=None,
        description="Where fetched bundles are unpacked; None = ``<home>/cache/envhub``.",
    )
    store: StoreConfig = Field(
        default_factory=LocalStoreConfig, description="Artifact store of the task bundles."
    )

    @model_validator(mode="before")
    @classmethod
    def _store_type(cls, data: object) -> object:
        """A store given without ``type`` is S3 when it names a bucket, else local."""
        if isinstance(data, dict) and isinstance(data.get("store"), dict):
            store = data["store"]
            if "type" not in store:
                data = {**data, "store": {"type": "s3" if "bucket" in store else "local", **store}}
        return data

    def home_path(self) -> Path:
        """The base directory."""
        return Path(self.home).expanduser() if self.home else default_home()

    def db_file(self) -> Path:
        """The SQLite file."""
        if self.db_path:
            return Path(self.db_path).expanduser()
        return self.home_path() / "envhub.sqlite3"

    def cache_path(self) -> Path:
        """The bundle cache directory."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return self.home_path() / "cache" / "envhub"

    def local_root(self) -> Path:
        """The local store's directory (meaningful for ``store.type == "local"``)."""
        if isinstance(self.store, LocalStoreConfig) and self.store.root:
            return Path(self.store.root).expanduser()
        return self.home_path() / "artifacts"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HubConfig:
        """Settings from the environment.

        ``ROCK_HOME``, ``ROCK_HUB_DB``, ``ROCK_HUB_CACHE``, ``ROCK_HUB_STORE_DIR``; setting
        ``ROCK_HUB_S3_BUCKET`` selects the S3 store, with ``ROCK_HUB_S3_PREFIX``,
        ``ROCK_HUB_S3_ENDPOINT_URL`` and ``ROCK_HUB_S3_REGION``.

        Raises:
            InvalidConfig: a value does not validate.
        """
        env = os.environ if environ is None else environ
        data: dict[str, object] = {}
        if env.get("ROCK_HOME"):
            data["home"] = env["ROCK_HOME"]
        if env.get("ROCK_HUB_DB"):
            data["db_path"] = env["ROCK_HUB_DB"]
        if env.get("ROCK_HUB_CACHE"):
            data["cache_dir"] = env["ROCK_HUB_CACHE"]
        if env.get("ROCK_HUB_S3_BUCKET"):
            store: dict[str, object] = {"type": "s3", "bucket": env["ROCK_HUB_S3_BUCKET"]}
            for key, var in (
                ("prefix", "ROCK_HUB_S3_PREFIX"),
                ("endpoint_url", "ROCK_HUB_S3_ENDPOINT_URL"),
                ("region", "ROCK_HUB_S3_REGION"),
            ):
                if env.get(var):
                    store[key] = env[var]
            data["store"] = store
        elif env.get("ROCK_HUB_STORE_DIR"):
            data["store"] = {"type": "local", "root": env["ROCK_HUB_STORE_DIR"]}
        return parse_hub_config(data)


def parse_hub_config(data: object) -> HubConfig:
    """Parse :class:`HubConfig` from plain data.

    Raises:
        InvalidConfig: unknown fields or bad values.
    """
    try:
        return HubConfig.model_validate(data or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidConfig(f"bad hub config: {problems}") from None
