"""The EnvHub: versioned env specs in SQLite, their task bundles in an artifact store.

:class:`EnvHub` is synchronous (SQLite and boto3 are blocking libraries) and thread-safe;
:class:`AsyncEnvHub` has the same methods as coroutines, each running the sync one through
``run_sync`` so that no event loop ever blocks. One process-wide lock orders pushes and deletes,
so a bundle that a concurrent push is about to reference is never garbage-collected under it.
Across processes the metadata stays consistent (SQLite transactions), but a delete racing a push
of the same bundle from another process can remove the artifact; the next push re-uploads it.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import logging
import os
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rock_serve.envs.hub._config import HubConfig, LocalStoreConfig, S3StoreConfig
from rock_serve.envs.hub._meta import MetadataStore
from rock_serve.envs.hub._spec import EnvRecord, HubEnvSpec, parse_spec
from rock_serve.envs.hub._store import (
    ArtifactStore,
    LocalArtifactStore,
    check_digest,
    pack_bundle,
    sha256_file,
    unpack_bundle,
)
from rock_serve.errors import InvalidRequest, NotFound
from rock_serve.runtime._sync import run_sync

__all__ = ["AsyncEnvHub", "EnvHub", "build_store"]

log = logging.getLogger("rock_serve.envs.hub")

SpecLike = HubEnvSpec | Mapping[str, Any]


def build_store(config: HubConfig) -> ArtifactStore:
    """The artifact store that ``config.store`` describes (boto3 is imported for S3 only)."""
    if isinstance(config.store, S3StoreConfig):
        from rock_serve.envs.hub._s3 import S3ArtifactStore

        return S3ArtifactStore(config.store)
    assert isinstance(config.store, LocalStoreConfig)
    return LocalArtifactStore(config.local_root())


def _envs() -> Any:
    """The env registry module (``rock_serve.envs``), looked up when first needed."""
    return importlib.import_module("rock_serve.envs")


class EnvHub:
    """Register, list, get and delete versioned env specs with their task bundles.

    Example::

        hub = EnvHub()                       # ~/.local/share/rock-serve, local artifacts
        hub.push({"name": "acme/Echo-v0", "version": "2", "entry_point": "acme.envs:Echo"},
                 bundle="tasks/")            # a directory or a tarball
        env = hub.make("acme/Echo-v0")       # latest version, bundle unpacked in the cache
    """

    def __init__(
        self,
        config: HubConfig | None = None,
        *,
        store: ArtifactStore | None = None,
    ) -> None:
        """Open the hub.

        Args:
            config: Paths and store (default: :meth:`HubConfig.from_env`).
            store: An artifact store to use instead of the one ``config`` describes.
        """
        self.config = config if config is not None else HubConfig.from_env()
        self.store = store if store is not None else build_store(self.config)
        self.meta = MetadataStore(self.config.db_file())
        self.cache = self.config.cache_path()
        self._lock = threading.RLock()

    @classmethod
    def from_env(cls) -> EnvHub:
        """A hub configured from ``ROCK_*`` variables (see :meth:`HubConfig.from_env`)."""
        return cls(HubConfig.from_env())

    def __enter__(self) -> EnvHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database and the store's connections."""
        self.meta.close()
        self.store.close()

    # ------------------------------------------------------------------------------ specs

    def push(
        self,
        spec: SpecLike,
        bundle: str | os.PathLike[str] | None = None,
        *,
        bundle_sha256: str | None = None,
        replace: bool = False,
    ) -> EnvRecord:
        """Store a version of an env, with its task bundle if given.

        Pushing a new version keeps the older ones; pushing an existing version again with the
        same content is a no-op.

        Args:
            spec: The env spec (a :class:`HubEnvSpec` or its fields).
            bundle: A directory (packed deterministically as ``.tar.gz``) or a tar archive.
            bundle_sha256: Instead of ``bundle``: the digest of an artifact already in the
                store (for example uploaded through :meth:`upload_url`).
            replace: Overwrite an existing version that has other content.

        Returns:
            The stored record.

        Raises:
            InvalidRequest: a bad spec, or a bundle that is neither a directory nor a tar.
            NotFound: ``bundle_sha256`` names no stored artifact.
            Conflict: the version exists with other content and ``replace`` is false.
        """
        checked = parse_spec(spec)
        if bundle is not None and bundle_sha256 is not None:
            raise InvalidRequest("give a bundle or a bundle_sha256, not both")
        with tempfile.TemporaryDirectory(prefix="rock-envhub-") as tmp:
            source: Path | None = None
            sha: str | None = None
            size: int | None = None
            if bundle is not None:
                source, sha, size = _prepare_bundle(Path(bundle), Path(tmp))
            elif bundle_sha256 is not None:
                sha = check_digest(bundle_sha256)
            record = EnvRecord(
                **checked.model_dump(),
                bundle_sha256=sha,
                bundle_size=size,
                pushed_at=time.time(),
            )
            with self._lock:
                if source is not None and sha is not None:
                    self.store.put_file(source, sha)
                elif sha is not None and not self.store.exists(sha):
                    raise NotFound(f"no artifact {sha} in the {self.store.kind} store")
                stored, previous = self.meta.put(record, replace=replace)
                if previous is not None and previous.bundle_sha256 != stored.bundle_sha256:
                    self._collect({previous.bundle_sha256} - {None})
        return stored

    def get(self, name: str, version: str | None = None) -> EnvRecord:
        """One version of an env; the latest pushed when ``version`` is None.

        Raises:
            NotFound: no such env or version.
        """
        return self.meta.get(name, version)

    def versions(self, name: str) -> list[EnvRecord]:
        """Every version of an env, newest first.

        Raises:
            NotFound: no such env.
        """
        found = self.meta.versions(name)
        if not found:
            raise NotFound(f"no env {name} in the hub", name=name)
        return found

    def list(self, *, all_versions: bool = False) -> builtins.list[EnvRecord]:
        """The latest version of each env (or every version), sorted by name."""
        return self.meta.list(all_versions=all_versions)

    def delete(self, name: str, version: str | None = None) -> builtins.list[EnvRecord]:
        """Delete one version (or every version) and the bundles no other version uses.

        Returns:
            The deleted records.

        Raises:
            NotFound: no such env or version.
        """
        with self._lock:
            with self.meta.transaction() as db:
                removed = self.meta.delete(db, name, version)
            self._collect({r.bundle_sha256 for r in removed if r.bundle_sha256})
        return removed

    def _collect(self, digests: set[str | None]) -> None:
        """Remove the artifacts that no version references any more (under ``_lock``)."""
        for sha in sorted(d for d in digests if d):
            with self.meta.transaction() as db:
                if self.meta.references(db, sha):
                    continue
            try:
                self.store.delete(sha)
            except Exception:
                log.warning("could not delete unreferenced artifact %s", sha, exc_info=True)

    # ------------------------------------------------------------------------------ bundles

    def fetch_bundle(self, name: str | EnvRecord, version: str | None = None) -> Path | None:
        """The local directory of an env's unpacked bundle, downloading it on first use.

        Bundles are unpacked once per digest under the cache dir (treat them as read-only).

        Returns:
            The directory, or None when the env has no bundle.

        Raises:
            NotFound: no such env, or its artifact is gone from the store.
            ArtifactCorrupt: the downloaded bytes do not match the digest.
        """
        record = name if isinstance(name, EnvRecord) else self.get(name, version)
        sha = record.bundle_sha256
        if sha is None:
            return None
        target = self.cache / "bundles" / sha
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpack-"))
        try:
            archive = work / "bundle.tar"
            self.store.fetch(sha, archive)
            unpack_bundle(archive, work / "tree")
            try:
                os.rename(work / "tree", target)
            except OSError:
                if not target.is_dir():  # not a concurrent fetch of the same bundle
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return target

    def bundle_url(
        self, name: str, version: str | None = None, *, expires: int | None = None
    ) -> str | None:
        """A download URL of an env's bundle (presigned for S3, ``file://`` locally).

        Returns:
            The URL, or None when the env has no bundle.
        """
        record = self.get(name, version)
        if record.bundle_sha256 is None:
            return None
        return self.store.url(record.bundle_sha256, expires)

    def upload_url(self, sha256: str, *, content_type: str = "application/octet-stream") -> str:
        """A presigned PUT URL for uploading a bundle straight to S3, then :meth:`push` it.

        The uploader must send the same ``Content-Type``. The bytes are checked against the
        digest when they are fetched.

        Raises:
            InvalidRequest: the store is not S3.
        """
        from rock_serve.envs.hub._s3 import S3ArtifactStore

        if not isinstance(self.store, S3ArtifactStore):
            raise InvalidRequest(f"the {self.store.kind} store has no upload URLs")
        return self.store.upload_url(check_digest(sha256), content_type=content_type)

    # ------------------------------------------------------------------------------ envs

    def register(self, name: str, version: str | None = None) -> str:
        """Register an env version in the env registry (``rock_serve.envs``) if needed.

        The registry id is ``name:version``; the bundle is fetched first and its directory is
        given to the env as the keyword argument ``bundle_kwarg`` (``task_dir`` by default).
        A registration that differs from the record (a version pushed again with ``replace``)
        is replaced.

        Returns:
            The registry id.
        """
        record = self.get(name, version)
        task_dir = self.fetch_bundle(record)
        kwargs = dict(record.kwargs)
        if task_dir is not None and record.bundle_kwarg:
            kwargs[record.bundle_kwarg] = str(task_dir)
        envs = _envs()
        rid = record.registry_id
        wanted = {
            "entry_point": record.entry_point,
            "max_episode_steps": record.max_episode_steps,
            "kwargs": kwargs,
            "description": record.description,
            "image": record.image,
            "shared_sandbox": record.shared_sandbox,
        }
        with self._lock:
            try:
                current = envs.spec(rid)
            except LookupError:
                current = None
            if current is not None and all(
                getattr(current, key, None) == value for key, value in wanted.items()
            ):
                return rid
            # The hub's version label is not the registry's -vN: it travels as metadata.
            envs.register(rid, replace=current is not None, hub_version=record.version, **wanted)
        return rid

    def make(self, name: str, version: str | None = None, **kwargs: Any) -> Any:
        """Fetch an env's spec and bundle, register it if needed, and make it.

        Args:
            name: Env name in the hub.
            version: A version label; None for the latest.
            **kwargs: Passed to ``rock_serve.envs.make`` (and so to the env).

        Returns:
            The env that ``rock_serve.envs.make`` returns.
        """
        rid = self.register(name, version)
        return _envs().make(rid, **kwargs)


def _prepare_bundle(path: Path, tmp: Path) -> tuple[Path, str, int]:
    """The archive to upload for ``path`` (packed if a directory) with its digest and size."""
    if path.is_dir():
        archive = tmp / "bundle.tar.gz"
        sha, size = pack_bundle(path, archive)
        return archive, sha, size
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise InvalidRequest(f"bundle {path} is neither a directory nor a tar archive")
        sha, size = sha256_file(path)
        return path, sha, size
    raise InvalidRequest(f"bundle {path} does not exist")


class AsyncEnvHub:
    """The :class:`EnvHub` for event loops: the same methods, run off the loop.

    Example::

        hub = AsyncEnvHub()
        record = await hub.get("acme/Echo-v0")
        env = await hub.make("acme/Echo-v0")   # through rock_serve.envs.make_async
    """

    def __init__(
        self,
        config: HubConfig | None = None,
        *,
        store: ArtifactStore | None = None,
        hub: EnvHub | None = None,
    ) -> None:
        """Open the hub (or wrap an open :class:`EnvHub`)."""
        self.sync = hub if hub is not None else EnvHub(config, store=store)

    async def __aenter__(self) -> AsyncEnvHub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the database and the store's connections."""
        await run_sync(self.sync.close)

    async def push(
        self,
        spec: SpecLike,
        bundle: str | os.PathLike[str] | None = None,
        *,
        bundle_sha256: str | None = None,
        replace: bool = False,
    ) -> EnvRecord:
        """See :meth:`EnvHub.push`."""
        return await run_sync(
            self.sync.push, spec, bundle, bundle_sha256=bundle_sha256, replace=replace
        )

    async def get(self, name: str, version: str | None = None) -> EnvRecord:
        """See :meth:`EnvHub.get`."""
        return await run_sync(self.sync.get, name, version)

    async def versions(self, name: str) -> builtins.list[EnvRecord]:
        """See :meth:`EnvHub.versions`."""
        return await run_sync(self.sync.versions, name)

    async def list(self, *, all_versions: bool = False) -> builtins.list[EnvRecord]:
        """See :meth:`EnvHub.list`."""
        return await run_sync(self.sync.list, all_versions=all_versions)

    async def delete(self, name: str, version: str | None = None) -> builtins.list[EnvRecord]:
        """See :meth:`EnvHub.delete`."""
        return await run_sync(self.sync.delete, name, version)

    async def fetch_bundle(self, name: str | EnvRecord, version: str | None = None) -> Path | None:
        """See :meth:`EnvHub.fetch_bundle`."""
        return await run_sync(self.sync.fetch_bundle, name, version)

    async def bundle_url(
        self, name: str, version: str | None = None, *, expires: int | None = None
    ) -> str | None:
        """See :meth:`EnvHub.bundle_url`."""
        return await run_sync(self.sync.bundle_url, name, version, expires=expires)

    async def upload_url(
        self, sha256: str, *, content_type: str = "application/octet-stream"
    ) -> str:
        """See :meth:`EnvHub.upload_url`."""
        return await run_sync(self.sync.upload_url, sha256, content_type=content_type)

    async def register(self, name: str, version: str | None = None) -> str:
        """See :meth:`EnvHub.register`."""
        return await run_sync(self.sync.register, name, version)

    async def make(self, name: str, version: str | None = None, **kwargs: Any) -> Any:
        """Like :meth:`EnvHub.make`, through ``rock_serve.envs.make_async``."""
        rid = await self.register(name, version)
        env = _envs().make_async(rid, **kwargs)
        if inspect.isawaitable(env):
            env = await env
        return env
