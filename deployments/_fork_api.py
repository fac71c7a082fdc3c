"""Fork, pause and resume routes (issue 16) on the Admin.

- ``POST /v1/sandboxes/{id}/fork`` (:class:`ForkRequest`) -> 201 :class:`ForkResult`: ``count``
  children of a running sandbox, made on its node by its Worker (bytes never pass here).
- ``POST /v1/sandboxes/{id}/pause`` and ``/resume`` -> the :class:`SandboxRecord`.

Wiring: ``admin.py`` includes :data:`router` (one line). The caller must see the sandbox's
namespace (another namespace's sandbox is a 404, as an unknown one); the children go to the
parent's namespace and count against its quota.
"""

# No "from __future__ import annotations": FastAPI reads these annotations at include time.

from typing import Any

from fastapi import APIRouter

from rock_serve.deployments._auth import Auth
from rock_serve.deployments._ray import call
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.errors import SandboxNotFound
from rock_serve.protocol import SandboxRecord
from rock_serve.protocol.fork import ForkRequest, ForkResult

__all__ = ["router"]

router = APIRouter(tags=["fork"])


def _admin() -> Any:
    from ray import serve  # here: the Worker imports deployments modules, and must not load Serve

    return serve.get_replica_context().servable_object


async def _namespace(admin: Any, principal: Any, sandbox_id: str) -> str:
    await admin._guard.check(principal, sandbox_id)  # 404 for another namespace's sandbox
    namespace: str = await admin._guard.namespace_of(sandbox_id)
    return namespace


@router.post("/v1/sandboxes/{sandbox_id}/fork", status_code=201, response_model=ForkResult)
async def fork_sandbox(sandbox_id: str, req: ForkRequest, principal: Auth) -> ForkResult:
    """Fork a running sandbox into ``count`` copy-on-write children on its node.

    Children see the parent's files as they were at one atomic point (the parent is frozen
    while its layer is copied once), inherit its image, resources, env and labels (the body
    overrides env, labels, owner, ttl and lease) and start in the cwd and exported env of the
    parent's ``default`` session. 409 ``sandbox_not_running`` when the parent is not running,
    429 ``rate_limited`` when the children would pass the namespace's quota, 501
    ``not_supported`` on a runtime that cannot fork.
    """
    admin = _admin()
    namespace = await _namespace(admin, principal, sandbox_id)
    result: ForkResult = await call(admin._scheduler, Scheduler.fork, sandbox_id, req, namespace)
    for record in result.items:
        admin._guard.remember(record.id, record.namespace)
    return result


@router.post("/v1/sandboxes/{sandbox_id}/pause", response_model=SandboxRecord)
async def pause_sandbox(sandbox_id: str, principal: Auth) -> SandboxRecord:
    """Freeze every process of a sandbox (no CPU; its memory stays resident, its files stay).

    Data-plane calls get 409 ``sandbox_not_running`` until ``/resume``.
    """
    admin = _admin()
    namespace = await _namespace(admin, principal, sandbox_id)
    record: SandboxRecord = await call(admin._scheduler, Scheduler.pause, sandbox_id, namespace)
    return record


@router.post("/v1/sandboxes/{sandbox_id}/resume", response_model=SandboxRecord)
async def resume_sandbox(sandbox_id: str, principal: Auth) -> SandboxRecord:
    """Thaw a paused sandbox (a running one is returned as it is); an archived one (its
    lease ran out with ``archive_on_expiry``) comes back with its id over its snapshot.
    """
    admin = _admin()
    try:
        namespace = await _namespace(admin, principal, sandbox_id)
    except SandboxNotFound:  # archived? The Scheduler looks in the caller's namespace.
        namespace = principal.namespace
    record: SandboxRecord = await call(admin._scheduler, Scheduler.resume, sandbox_id, namespace)
    admin._guard.remember(record.id, record.namespace)
    return record
