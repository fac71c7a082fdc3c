"""The GEM env API's own Serve deployment (issue 13 item 5), composed in ``build_app``.

The routes (``/apis/v1/envs/gem/*``, see ``_gem.py``) stay on the Admin's FastAPI app, so
clients see the same URLs, bodies and errors; each route's call comes here through a
deployment handle, and only this deployment talks to the platform's env table actor. The GEM
API thus scales, restarts and is configured (``ServerArgs.gem``: idle TTL, instance limits) on
its own, apart from the REST v1 Admin.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from rock_serve.auth import Principal
from rock_serve.config import ServerArgs, parse_server_args
from rock_serve.deployments import _gem
from rock_serve.deployments._ray import pin_replica_grpc
from rock_serve.deployments._trace import TracedActor
from rock_serve.envs.integrations import (
    GemCloseRequest,
    GemCloseResponse,
    GemListRequest,
    GemListResponse,
    GemMakeRequest,
    GemMakeResponse,
    GemResetRequest,
    GemResetResponse,
    GemStepRequest,
    GemStepResponse,
)

__all__ = ["GemApi"]


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class GemApi(TracedActor):
    """The GEM env API: one method per route, each a call to the env table for the caller."""

    def __init__(self, args: dict[str, Any] | ServerArgs) -> None:
        self.args = args if isinstance(args, ServerArgs) else parse_server_args(args)
        pin_replica_grpc()
        _gem.bind(self.args.namespace, self.args.gem)  # the table: its namespace and config

    async def make(self, caller: Principal, req: GemMakeRequest) -> GemMakeResponse:
        """ROCK's ``make``."""
        result: GemMakeResponse = await _gem.table_call("make", caller, req)
        return result

    async def reset(self, caller: Principal, req: GemResetRequest) -> GemResetResponse:
        """ROCK's ``reset``."""
        result: GemResetResponse = await _gem.table_call("reset", caller, req)
        return result

    async def step(self, caller: Principal, req: GemStepRequest) -> GemStepResponse:
        """ROCK's ``step``."""
        result: GemStepResponse = await _gem.table_call("step", caller, req)
        return result

    async def close(self, caller: Principal, req: GemCloseRequest) -> GemCloseResponse:
        """ROCK's ``close``."""
        result: GemCloseResponse = await _gem.table_call("close", caller, req)
        return result

    async def list_ids(self, caller: Principal, req: GemListRequest) -> GemListResponse:
        """ROCK's ``list``."""
        result: GemListResponse = await _gem.table_call("list_ids", caller, req)
        return result
