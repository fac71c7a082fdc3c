"""Snapshot routes (issue 16 item 2) on the Admin.

- ``POST /v1/sandboxes/{id}/snapshot`` (:class:`SnapshotRequest`) -> 201 :class:`SnapshotRecord`
- ``GET /v1/snapshots`` -> :class:`SnapshotList` (the caller's namespace; admins: every one)
- ``GET /v1/snapshots/{id}`` -> :class:`SnapshotRecord`; ``DELETE`` -> 204
- ``POST /v1/sandboxes {"snapshot": id}`` (the create route) restores one on any node.

Another namespace's snapshot is a 404 (``not_found``), as an unknown one. The archive's bytes
move between the sandbox's Worker and S3 only, never through here.
"""

# No "from __future__ import annotations": FastAPI reads these annotations at include time.

from typing import Any

from fastapi import APIRouter, Response

from rock_serve.deployments._auth import Auth
from rock_serve.deployments._ray import call
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.protocol.snapshot import SnapshotList, SnapshotRecord, SnapshotRequest

__all__ = ["router"]

router = APIRouter(tags=["snapshots"])


def _admin() -> Any:
    from ray import serve  # here: the Worker imports deployments modules, and must not load Serve

    return serve.get_replica_context().servable_object


def _scope(principal: Any) -> str | None:
    return None if getattr(principal, "all_namespaces", False) else str(principal.namespace)


@router.post("/v1/sandboxes/{sandbox_id}/snapshot", status_code=201, response_model=SnapshotRecord)
async def snapshot_sandbox(
    sandbox_id: str, principal: Auth, req: SnapshotRequest | None = None
) -> SnapshotRecord:
    """Snapshot a running sandbox's files at one atomic point into an immutable record.

    The archive is content-addressed (``digest``), kept in the node's store and in S3 when
    configured; the record has the image, resources, env KEYS (never values) and labels. The
    namespace's retention (count, age) runs afterwards. 409 ``sandbox_not_running``, 501
    ``not_supported`` on a runtime without layers.
    """
    admin = _admin()
    await admin._guard.check(principal, sandbox_id)  # 404 for another namespace's sandbox
    namespace = await admin._guard.namespace_of(sandbox_id)
    snap: SnapshotRecord = await call(
        admin._scheduler, Scheduler.snapshot, sandbox_id, req or SnapshotRequest(), namespace
    )
    return snap


@router.get("/v1/snapshots", response_model=SnapshotList)
async def list_snapshots(principal: Auth) -> SnapshotList:
    """The caller's namespace's snapshots, newest first."""
    items = await call(_admin()._scheduler, Scheduler.snapshots, _scope(principal))
    return SnapshotList(items=items)


@router.get("/v1/snapshots/{snapshot_id}", response_model=SnapshotRecord)
async def get_snapshot(snapshot_id: str, principal: Auth) -> SnapshotRecord:
    """One snapshot (404 ``not_found`` for an unknown one or another namespace's)."""
    snap: SnapshotRecord = await call(
        _admin()._scheduler, Scheduler.get_snapshot, snapshot_id, _scope(principal)
    )
    return snap


@router.delete("/v1/snapshots/{snapshot_id}", status_code=204)
async def delete_snapshot(snapshot_id: str, principal: Auth) -> Response:
    """Delete a snapshot; its archive goes from the node stores and S3 once unused."""
    await call(_admin()._scheduler, Scheduler.delete_snapshot, snapshot_id, _scope(principal))
    return Response(status_code=204)
