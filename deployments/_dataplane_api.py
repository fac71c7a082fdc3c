"""``POST /v1/sandboxes/{id}/dataplane`` on the Admin: a grant to reach the sandbox's node.

The caller's token is checked as for any data-plane route (namespaces, roles), then the Admin
signs a short-lived token scoped to that one sandbox (:mod:`rock_serve.dataplane_token`) and
answers it with the address of the node's data-plane server (``deployments/_dataplane.py``).
A disabled data plane is ``not_found`` (the SDK then keeps to the Admin path).

Wiring: ``admin.py`` includes :data:`router` and calls :func:`bind` (one line each).
"""

# No "from __future__ import annotations": FastAPI reads these annotations at include time.

import re
import time
from typing import Any

from fastapi import APIRouter

from rock_serve import dataplane_token
from rock_serve.config import ServerArgs
from rock_serve.deployments._auth import Auth
from rock_serve.deployments._dataplane import DataPlaneWorker, cluster_secret
from rock_serve.deployments._ray import WorkerHandles, call, get_scheduler
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.errors import NotFound, PermissionDenied, RuntimeUnavailable, SandboxNotFound
from rock_serve.protocol import SandboxRecord
from rock_serve.protocol.api import SANDBOX_ID
from rock_serve.protocol.dataplane import DataPlaneGrant
from rock_serve.runtime._sync import run_sync

__all__ = ["bind", "router"]

router = APIRouter(tags=["dataplane"])
#: Seconds a secret fetched from the Scheduler is used before it is asked again.
_SECRET_SECONDS = 60.0
_PLATFORM: dict[str, Any] = {}


def bind(args: ServerArgs) -> None:
    """Tell this process's grant route which platform it serves (from ``Admin.__init__``)."""
    if _PLATFORM.get("args") != args:
        _PLATFORM.clear()
        _PLATFORM.update(args=args, workers=WorkerHandles(args.namespace), endpoints={})


async def _secret(args: ServerArgs) -> bytes:
    cached = _PLATFORM.get("secret")
    if cached is not None and time.monotonic() - cached[1] < _SECRET_SECONDS:
        return bytes(cached[0])
    secret = await cluster_secret(args)
    _PLATFORM["secret"] = (secret, time.monotonic())
    return secret


async def _endpoint(short: str) -> str | None:
    """The node's data-plane address (asked again after a while: a restarted Worker moves)."""
    endpoints: dict[str, tuple[str | None, float]] = _PLATFORM["endpoints"]
    known = endpoints.get(short)
    if known is not None and time.monotonic() - known[1] < _SECRET_SECONDS:
        return known[0]
    worker = await _PLATFORM["workers"].get(short)
    endpoint: str | None = await call(worker, DataPlaneWorker.dataplane_endpoint)
    endpoints[short] = (endpoint, time.monotonic())
    return endpoint


@router.post("/v1/sandboxes/{sandbox_id}/dataplane", response_model=DataPlaneGrant)
async def grant(sandbox_id: str, principal: Auth) -> DataPlaneGrant:
    """The node's data-plane address and a token for this sandbox only (short-lived).

    Send the sandbox's exec, session, file, archive, stats and renew calls there, with the
    same paths and bodies, and ``Authorization: Bearer <token>``.
    """
    args: ServerArgs | None = _PLATFORM.get("args")
    if args is None:
        raise RuntimeUnavailable("the data-plane route is not bound to a platform")
    if not args.dataplane.enabled:
        raise NotFound("the direct data plane is disabled on this platform")
    if not re.match(SANDBOX_ID, sandbox_id):
        raise SandboxNotFound(f"no sandbox {sandbox_id!r} (malformed id)")
    if not principal.may_act:
        raise PermissionDenied(f"token {principal.name!r} is read-only: use the Admin routes")
    scheduler = await run_sync(get_scheduler, args.namespace)
    record: SandboxRecord = await call(scheduler, Scheduler.get, sandbox_id)
    if not principal.may_see(record.namespace):
        raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
    endpoint = await _endpoint(sandbox_id.split("-")[1])
    if endpoint is None:
        raise NotFound("the direct data plane is disabled on this node")
    token, expires = dataplane_token.sign(
        await _secret(args),
        sandbox_id,
        namespace=principal.namespace,
        token_name=principal.name,
        admin=principal.admin,
        ttl=args.dataplane.token_ttl_seconds,
    )
    return DataPlaneGrant(sandbox_id=sandbox_id, endpoint=endpoint, token=token, expires_at=expires)
