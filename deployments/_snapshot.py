"""Snapshots (issue 16 item 2): the Worker's and the Scheduler's side.

- :class:`SnapshotWorker` (mixed into the Worker): ``snapshot`` has the runtime pack the
  sandbox's writable layer at one atomic point into the node's store
  (``<runtime state_dir>/.snapshots/<digest>.tar[.zst]``) and uploads it to S3 (boto3) when
  ``snapshots.s3`` is set. ``_restore_snapshot`` is what ``Worker.create`` runs for
  ``{"snapshot": id}``: the archive comes from the node store, else it is downloaded from S3
  (streamed to a temp file, digest-checked, renamed into place), and the runtime mounts it as a
  lower layer over the recorded image. A corrupt archive is typed ``artifact_corrupt`` (502),
  the bad local copy is removed, and the runtime leaves nothing half-made.
- :class:`SnapshotScheduler` (mixed into the Scheduler): keeps :class:`SnapshotRecord` in the
  state store (``docs("snapshots")``: memory or Redis, so records survive Admin and, with
  Redis, Scheduler restarts), scopes them by namespace (another namespace's snapshot is a 404)
  and enforces retention (``snapshots.max_per_namespace``, ``snapshots.max_age_seconds``) each
  time a snapshot is made. Deleting a snapshot drops the archive from every node store and S3
  once no other record names the same digest.

Archive bytes move only between a Worker and S3: never through the Admin or the Scheduler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rock_serve.errors import (
    Conflict,
    NotFound,
    NotSupported,
    RockError,
    SandboxNotFound,
    SandboxNotRunning,
)
from rock_serve.protocol import CreateSandboxRequest, SandboxRecord, SandboxSpec, SandboxState
from rock_serve.protocol.snapshot import SnapshotRecord, SnapshotRequest
from rock_serve.runtime._snapshot import SnapshotCorrupt
from rock_serve.runtime._sync import run_sync

if TYPE_CHECKING:
    from rock_serve.deployments.scheduler import Scheduler
    from rock_serve.deployments.worker import Worker
    from rock_serve.runtime.base import Runtime

__all__ = ["SnapshotScheduler", "SnapshotWorker", "snapshot_dir"]

log = logging.getLogger(__name__)

#: Kind of the snapshot records in the state store.
KIND = "snapshots"


def snapshot_dir(state_dir: str) -> str:
    """The node store of snapshot archives under a runtime's state dir."""
    return os.path.join(state_dir, ".snapshots")


def _image_id(runtime: Any, sandbox_id: str) -> str | None:
    """The id of the image a sandbox's layers come from, when the runtime records it."""
    read_root = getattr(runtime, "_read_root", None)
    if read_root is None:
        return None
    with contextlib.suppress(Exception):
        value = read_root(sandbox_id).get("image_id")
        return str(value) if value else None
    return None


class SnapshotWorker:
    """The Worker's snapshot and restore (see the module docstring)."""

    _snap_s3: Any = None
    _archived: dict[str, Any]

    def _snap_dir(self) -> str:
        w = cast("Worker", self)
        state_dir = getattr(w.args.runtime, "state_dir", None)
        if not state_dir:
            raise NotSupported(f"the {w.args.runtime.type} runtime has no node store")
        return snapshot_dir(str(state_dir))

    def _s3(self) -> Any:
        """The S3 store of archives, or None when ``snapshots.s3`` is unset."""
        w = cast("Worker", self)
        config = w.args.snapshots.s3
        if config is None:
            return None
        if self._snap_s3 is None:
            from rock_serve.envs.hub import S3ArtifactStore, S3StoreConfig

            self._snap_s3 = S3ArtifactStore(
                S3StoreConfig(
                    bucket=config.bucket,
                    prefix=config.prefix,
                    endpoint_url=config.endpoint_url,
                    region=config.region,
                )
            )
        return self._snap_s3

    async def snapshot(self, sandbox_id: str) -> dict[str, Any]:
        """Pack a running sandbox's files into the node store (and S3 when configured).

        Returns:
            ``archive`` (file name), ``digest``, ``size``, ``in_s3``, ``env_keys``.

        Raises:
            SandboxNotFound: no such sandbox here.
            SandboxNotRunning: it is not running.
            NotSupported: its runtime cannot snapshot.
        """
        w = cast("Worker", self)
        await w._ready()
        box = w._box(sandbox_id)
        if box.record.state != SandboxState.RUNNING:
            raise SandboxNotRunning(f"sandbox {sandbox_id!r} is {box.record.state.value}")
        runtime = box.runtime
        pack = getattr(runtime, "snapshot", None)
        if pack is None:
            raise NotSupported(f"the {runtime.name} runtime cannot snapshot sandboxes")
        started = time.perf_counter()
        path, digest, size = await pack(sandbox_id, self._snap_dir())
        s3 = self._s3()
        if s3 is not None:
            await run_sync(s3.put_file, Path(path), digest)
        env_keys: list[str] = []
        meta = getattr(runtime, "_meta", None)
        if meta is not None:
            with contextlib.suppress(Exception):
                env_keys = sorted(meta(sandbox_id).spec.get("env", {}))
        image_digest = _image_id(runtime, sandbox_id)
        log.info(
            "worker %s: snapshot of %s: %s (%d bytes%s) in %.1f ms",
            w.name,
            sandbox_id,
            digest[:12],
            size,
            ", in S3" if s3 is not None else "",
            (time.perf_counter() - started) * 1000,
            extra={"sandbox_id": sandbox_id},
        )
        return {
            "archive": os.path.basename(path),
            "digest": digest,
            "size": size,
            "in_s3": s3 is not None,
            "env_keys": env_keys,
            "image_digest": image_digest,
        }

    async def _archive(self, sandbox_id: str) -> dict[str, Any] | None:
        """Snapshot a sandbox whose lease ran out when its create asked for it (before the
        reaper removes it); :meth:`_archived_after_removal` then publishes it.

        Returns:
            The snapshot's fields and the sandbox's ``record``; None when it was not asked for
            or failed (logged: the sandbox is then reaped as usual).
        """
        w = cast("Worker", self)
        box = w._boxes.get(sandbox_id)
        if box is None or not box.record.archive_on_expiry:
            return None
        try:
            if box.record.state == SandboxState.PAUSED:
                await w.resume(sandbox_id)
            made = await self.snapshot(sandbox_id)
        except Exception as exc:
            log.error("worker %s: cannot archive %s: %s", w.name, sandbox_id, exc)
            return None
        return {**made, "record": box.record.model_copy(deep=True)}

    def _archived_after_removal(self, sandbox_id: str, entry: dict[str, Any]) -> None:
        """Hand an archive to the Scheduler (:meth:`take_archived`) once its sandbox is gone.

        Not before: a caller who sees the archive may resume it at once, and a resume while
        the id is still taken here would be refused as a conflict.
        """
        archived: dict[str, Any] = getattr(self, "_archived", None) or {}
        archived[sandbox_id] = entry
        self._archived = archived

    async def take_archived(self) -> list[dict[str, Any]]:
        """The sandboxes archived since the last call (each: the snapshot's fields and the
        sandbox's ``record``); the Scheduler records them as snapshots.
        """
        archived: dict[str, Any] = getattr(self, "_archived", None) or {}
        self._archived: dict[str, Any] = {}
        return list(archived.values())

    async def drop_snapshot(self, archive: str, digest: str, s3: bool = False) -> None:
        """Delete an archive from this node's store (and from S3 when ``s3``); idempotent."""
        w = cast("Worker", self)
        await w._ready()
        with contextlib.suppress(NotSupported, FileNotFoundError):
            os.unlink(os.path.join(self._snap_dir(), os.path.basename(archive)))
        store = self._s3() if s3 else None
        if store is not None:
            await run_sync(store.delete, digest)

    async def _restore_snapshot(
        self, runtime: Runtime, sandbox_id: str, spec: SandboxSpec, snap: SnapshotRecord
    ) -> None:
        """Create (not start) ``sandbox_id`` over ``snap``'s files; nothing is left on error.

        Raises:
            NotFound: the archive is neither on this node nor in S3.
            ArtifactCorrupt: its bytes do not match its digest (or do not unpack).
            NotSupported: the runtime cannot restore snapshots.
        """
        restore = getattr(runtime, "restore", None)
        if restore is None:
            raise NotSupported(f"the {runtime.name} runtime cannot restore snapshots")
        local = os.path.join(self._snap_dir(), os.path.basename(snap.archive))
        if not os.path.exists(local):
            s3 = self._s3()
            if s3 is None or not snap.in_s3:
                raise NotFound(
                    f"snapshot {snap.id!r} is on node {snap.node!r} only and S3 is not configured"
                )
            from rock_serve.envs.hub import ArtifactCorrupt as HubCorrupt

            try:  # streamed to a temp file, digest-checked, renamed into place
                await run_sync(s3.fetch, snap.digest, Path(local))
            except HubCorrupt as exc:
                raise SnapshotCorrupt(f"snapshot {snap.id!r}: {exc.message}") from None
        try:
            await restore(sandbox_id, spec, local, snap.digest)
        except RockError as exc:
            if exc.code.value == "artifact_corrupt":  # a bad local copy: fetch again next time
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(local)
            raise
        now = _image_id(runtime, sandbox_id)
        if snap.image_digest is not None and now is not None and now != snap.image_digest:
            with contextlib.suppress(Exception):
                await runtime.remove(sandbox_id)
            raise Conflict(
                f"snapshot {snap.id!r} was taken over image {snap.image!r} {snap.image_digest}; "
                f"that reference is now {now}: its files would sit over other layers"
            )


class SnapshotScheduler:
    """The Scheduler's snapshot records, namespaces and retention."""

    async def _collect_archived(self) -> None:
        """Record the sandboxes the Workers archived on lease expiry (from ``sync``)."""
        s = cast("Scheduler", self)
        for worker in list(s._workers.values()):
            take = getattr(worker, "take_archived", None)
            if take is None:  # a WorkerRef without archives (tests' fakes)
                continue
            try:
                items = await take()
            except RockError as exc:
                log.warning("scheduler: no archived list from %s: %s", worker.name, exc)
                continue
            for made in items:
                record = made["record"]
                snap = SnapshotRecord(
                    id=f"snap-{secrets.token_hex(12)}",
                    namespace=record.namespace,
                    sandbox_id=record.id,
                    digest=made["digest"],
                    archive=made["archive"],
                    size=made["size"],
                    image=record.image,
                    image_digest=made.get("image_digest"),
                    resources=record.resources,
                    network=record.network,
                    env_keys=made["env_keys"],
                    labels=dict(record.labels),
                    owner=record.owner,
                    node=worker.name,
                    in_s3=made["in_s3"],
                    created_at=time.time(),
                    archived=True,
                )
                await s._store.doc_put(KIND, snap.id, snap.model_dump_json())
                log.info("scheduler: %s archived as %s", record.id, snap.id)

    async def resume(self, sandbox_id: str, namespace: str = "default") -> SandboxRecord:
        """Thaw a paused sandbox, or bring an archived one back with its id (on the node its
        id names, over its archive).

        Raises:
            SandboxNotFound: neither a sandbox nor an archived one of ``namespace``.
            SandboxNotRunning: the node it was archived on is gone (create from the snapshot
                instead: ``{"snapshot": id}`` restores it anywhere with a new id).
        """
        s = cast("Scheduler", self)
        await s.ready()
        if sandbox_id in s._records:
            record: SandboxRecord = await s._on_worker(sandbox_id, namespace, "resume")
            return record
        snap = next(
            (
                r
                for r in await self._snap_records()
                if r.archived and r.sandbox_id == sandbox_id and r.namespace == namespace
            ),
            None,
        )
        if snap is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        worker = next((w for w in s._workers.values() if w.name == snap.node), None)
        if worker is None:
            raise SandboxNotRunning(
                f"the node of archived sandbox {sandbox_id!r} is gone: create from {snap.id}"
            )
        req = CreateSandboxRequest(
            image=snap.image,
            resources=snap.resources,
            network=snap.network,
            labels=snap.labels,
            owner=snap.owner,
            archive_on_expiry=True,
        )
        s._tombstones.pop(sandbox_id, None)
        s._inflight_ids.add(sandbox_id)
        try:
            ttl = s.args.default_ttl_seconds
            made = await worker.create(sandbox_id, req, ttl, namespace, snap)  # type: ignore[call-arg]
        finally:
            s._inflight_ids.discard(sandbox_id)
        s._records[sandbox_id] = made
        s._registered[sandbox_id] = s._clock()
        await s._save(made)
        await self._drop(snap)
        log.info("scheduler: resumed archived %s from %s", sandbox_id, snap.id)
        return made

    async def _snap_records(self) -> list[SnapshotRecord]:
        s = cast("Scheduler", self)
        out = []
        for key, raw in (await s._store.docs(KIND)).items():
            try:
                out.append(SnapshotRecord.model_validate_json(raw))
            except ValueError:
                log.warning("scheduler: skipping an unreadable snapshot record %s", key)
        out.sort(key=lambda r: r.created_at, reverse=True)
        return out

    async def snapshot(
        self, sandbox_id: str, req: SnapshotRequest, namespace: str = "default"
    ) -> SnapshotRecord:
        """Snapshot a running sandbox of ``namespace`` on its Worker and record it.

        Raises:
            SandboxNotFound: no such sandbox in ``namespace``.
            SandboxNotRunning: it is not running, or its node is gone.
            NotSupported: its runtime cannot snapshot.
        """
        s = cast("Scheduler", self)
        await s.ready()
        record = s._records.get(sandbox_id)
        if record is None or record.namespace != namespace:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        worker = next((w for w in s._workers.values() if w.name == record.worker), None)
        if worker is None:
            raise SandboxNotRunning(f"the node of sandbox {sandbox_id!r} is gone")
        made: dict[str, Any] = await worker.snapshot(sandbox_id)  # type: ignore[attr-defined]
        snap = SnapshotRecord(
            id=f"snap-{secrets.token_hex(12)}",
            namespace=namespace,
            sandbox_id=sandbox_id,
            digest=made["digest"],
            archive=made["archive"],
            size=made["size"],
            image=record.image,
            image_digest=made.get("image_digest"),
            resources=record.resources,
            network=record.network,
            env_keys=made["env_keys"],
            labels=dict(req.labels) if req.labels is not None else dict(record.labels),
            owner=record.owner,
            node=worker.name,
            in_s3=made["in_s3"],
            created_at=time.time(),
        )
        await s._store.doc_put(KIND, snap.id, snap.model_dump_json())
        await self._retain(namespace, keep=snap.id)
        log.info("scheduler: snapshot %s of %s (%d bytes)", snap.id, sandbox_id, snap.size)
        return snap

    async def _retain(self, namespace: str, keep: str) -> None:
        """Delete the namespace's snapshots past ``max_age_seconds`` or ``max_per_namespace``."""
        s = cast("Scheduler", self)
        config = s.args.snapshots
        mine = [r for r in await self._snap_records() if r.namespace == namespace]
        now = time.time()
        doomed = []
        if config.max_age_seconds is not None:
            doomed += [
                r for r in mine if r.id != keep and now - r.created_at > config.max_age_seconds
            ]
        kept = [r for r in mine if r not in doomed]
        if config.max_per_namespace is not None and len(kept) > config.max_per_namespace:
            doomed += [r for r in kept[config.max_per_namespace :] if r.id != keep]
        for r in doomed:
            log.info("scheduler: retention deletes snapshot %s of %s", r.id, namespace)
            await self._drop(r)

    async def snapshots(self, namespace: str | None = "default") -> list[SnapshotRecord]:
        """Snapshots of ``namespace`` (None: every namespace), newest first."""
        return [
            r for r in await self._snap_records() if namespace is None or r.namespace == namespace
        ]

    async def get_snapshot(
        self, snapshot_id: str, namespace: str | None = "default"
    ) -> SnapshotRecord:
        """One snapshot of ``namespace`` (None: any).

        Raises:
            NotFound: no such snapshot in ``namespace``.
        """
        s = cast("Scheduler", self)
        raw = (await s._store.docs(KIND)).get(snapshot_id)
        snap = None if raw is None else SnapshotRecord.model_validate_json(raw)
        if snap is None or (namespace is not None and snap.namespace != namespace):
            raise NotFound(f"no snapshot {snapshot_id!r}")
        return snap

    async def delete_snapshot(self, snapshot_id: str, namespace: str | None = "default") -> None:
        """Delete a snapshot of ``namespace`` and, once unused, its archive everywhere."""
        await self._drop(await self.get_snapshot(snapshot_id, namespace))

    async def _drop(self, snap: SnapshotRecord) -> None:
        s = cast("Scheduler", self)
        await s._store.doc_delete(KIND, snap.id)
        if any(r.digest == snap.digest for r in await self._snap_records()):
            return  # another record names the same bytes
        first = True
        for worker in list(s._workers.values()):
            try:
                await worker.drop_snapshot(snap.archive, snap.digest, first and snap.in_s3)  # type: ignore[attr-defined]
                first = False
            except RockError as exc:
                log.warning("scheduler: cannot drop %s on %s: %s", snap.id, worker.name, exc)

    async def _snapshot_for_create(
        self, req: CreateSandboxRequest, namespace: str
    ) -> tuple[CreateSandboxRequest, SnapshotRecord | None]:
        """The create request completed from its snapshot (image, resources, network), and the
        snapshot; ``(req, None)`` when it names none.

        Raises:
            NotFound: no such snapshot in ``namespace``.
        """
        if req.snapshot is None:
            return req, None
        snap = await self.get_snapshot(req.snapshot, namespace)
        fields = req.model_fields_set
        update: dict[str, Any] = {"image": snap.image}  # the files sit over the recorded image
        if "resources" not in fields:
            update["resources"] = snap.resources
        if "network" not in fields:
            update["network"] = snap.network
        return req.model_copy(update=update), snap
