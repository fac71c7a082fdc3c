"""Compatibility routes on the Admin: SandboxFusion's ``POST /run_code``.

verl's code-reward path and its SandboxFusion tool post to a SandboxFusion URL; pointing that URL
at ``<platform>/run_code`` runs the code in one of our sandboxes instead (see
:mod:`rock_serve.envs.integrations` for the models and the run). The route reaches the platform
through the SDK's Ray transport: the Admin runs inside Ray, so its calls go straight to the
Scheduler and Worker actors.

Wiring (``admin.py``): ``app.include_router(compat.router)`` before the ``@serve.ingress``
class is defined (Serve freezes the app at that point), and ``compat.bind(args.namespace)`` in
``Admin.__init__`` so that each replica knows its platform's namespace. The route has no
dependencies of its own but the platform client, so an app-wide auth dependency applies as is.
"""

# No "from __future__ import annotations": FastAPI reads these annotations at include time.

import functools
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from rock_serve.deployments._auth import Auth
from rock_serve.deployments.client import platform_client as ray_platform_client
from rock_serve.envs.integrations import RunCodeRequest, RunCodeResponse, run_code
from rock_serve.errors import RuntimeUnavailable
from rock_serve.runtime._sync import run_sync
from rock_serve.sdk import AsyncClient

__all__ = ["bind", "platform_client", "router"]

router = APIRouter(tags=["compat"])

#: Per-replica state: the platform namespace (set by :func:`bind`) and its client.
_PLATFORM: dict[str, Any] = {}


def bind(namespace: str) -> None:
    """Tell this process's compat routes which platform they serve (from ``Admin.__init__``)."""
    if _PLATFORM.get("namespace") != namespace:
        _PLATFORM.clear()
        _PLATFORM["namespace"] = namespace


async def platform_client(principal: Auth) -> AsyncClient:
    """The Ray-transport SDK client of the bound platform for the caller's namespace (one per
    namespace per replica), so its sandboxes count against the caller's quota.

    Raises:
        RuntimeUnavailable: :func:`bind` was not called, or the platform is not up.
    """
    key = f"client:{principal.namespace}"
    client: AsyncClient | None = _PLATFORM.get(key)
    if client is None:
        namespace = _PLATFORM.get("namespace")
        if namespace is None:
            raise RuntimeUnavailable("the compat routes are not bound to a platform")
        # Looking the Scheduler actor up by name blocks: keep it off the event loop.
        client = await run_sync(
            functools.partial(ray_platform_client, namespace, tenant=principal.namespace)
        )
        _PLATFORM[key] = client
    return client


@router.post("/run_code", response_model=RunCodeResponse)
async def sandbox_fusion_run_code(
    request: RunCodeRequest,
    client: Annotated[AsyncClient, Depends(platform_client)],
) -> RunCodeResponse:
    """SandboxFusion's ``/run_code``: run the code in a fresh sandbox, then delete it.

    Request and reply are SandboxFusion's (``status``: ``Success``, ``Failed`` or
    ``SandboxError``; ``compile_result`` for compiled languages; ``run_result.status``:
    ``Finished`` or ``TimeLimitExceeded``). An unsupported language, or one whose toolchain
    the image lacks, is a ``SandboxError`` reply, as in SandboxFusion. The token may come as
    ``?token=`` (verl's and sandbox-fusion's clients send no header).
    """
    from ray import serve  # the replica's args: the image with the toolchains

    admin: Any = serve.get_replica_context().servable_object
    return await run_code(client, request, image=admin.args.compat.run_code_image)
