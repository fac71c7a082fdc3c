"""rock_serve.envs.hub: a registry of versioned env specs with their task bundles.

Metadata lives in SQLite (``<home>/envhub.sqlite3`` by default, ``home`` being ``$ROCK_HOME`` or
``~/.local/share/rock-serve``); task bundles (a directory or a tarball of task data) live in a
content-addressed artifact store: a local directory by default, or S3 through boto3. Pushing a
new version keeps the old ones, ``get(name)`` gives the latest, and deleting removes the
metadata and the bundles nothing else uses.

:class:`EnvHub` is synchronous (SQLite and boto3 block); :class:`AsyncEnvHub` offers the same
methods as coroutines that run them off the event loop.

Example::

    from rock_serve.envs.hub import EnvHub

    with EnvHub() as hub:
        hub.push({"name": "acme/Echo-v0", "version": "1", "entry_point": "acme.envs:Echo"},
                 bundle="tasks/")
        env = hub.make("acme/Echo-v0")
"""

from rock_serve.envs.hub._config import (
    HubConfig,
    LocalStoreConfig,
    S3StoreConfig,
    default_home,
    parse_hub_config,
)
from rock_serve.envs.hub._hub import AsyncEnvHub, EnvHub, build_store
from rock_serve.envs.hub._s3 import S3ArtifactStore
from rock_serve.envs.hub._spec import EnvRecord, HubEnvSpec, parse_spec
from rock_serve.envs.hub._store import (
    ArtifactCorrupt,
    ArtifactStore,
    LocalArtifactStore,
    pack_bundle,
    sha256_file,
    unpack_bundle,
)

__all__ = [
    "ArtifactCorrupt",
    "ArtifactStore",
    "AsyncEnvHub",
    "EnvHub",
    "EnvRecord",
    "HubConfig",
    "HubEnvSpec",
    "LocalArtifactStore",
    "LocalStoreConfig",
    "S3ArtifactStore",
    "S3StoreConfig",
    "build_store",
    "default_home",
    "pack_bundle",
    "parse_hub_config",
    "parse_spec",
    "sha256_file",
    "unpack_bundle",
]
