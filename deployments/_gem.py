"""ROCK's GEM env API on the Admin: ``POST /apis/v1/envs/gem/make|reset|step|close|list``.

Bodies and replies are ROCK's (see :mod:`rock_serve.envs.integrations` for the models): bare JSON
objects, the instance id named ``sandbox_id``. Errors are the one error body: an unknown env id
or instance 404, bad kwargs or actions 400, a step before reset or after the episode ended 409.

**Where the envs live.** The Admin is stateless and runs several replicas, so env instances
cannot live in a replica: they live in one detached actor per platform, :class:`EnvTable`
(``rock-envs`` in the platform's Ray namespace, on the head node like the Scheduler, made on
first use). It makes each env with :func:`rock_serve.envs.make_async` and an SDK client over the
Ray transport, so the env's sandbox is an ordinary platform sandbox in the caller's namespace
(quotas apply), created at the instance's first reset and deleted when it closes. Instances
belong to the caller's namespace: another namespace sees them as unknown (admins see all).

**Nothing leaks.** An instance unused for ``gem.idle_ttl_seconds`` (``ServerArgs.gem``: the idle
TTL and the instance limits) is closed by the table's reaper.
Its sandbox carries a lease a bit longer than that, renewed by every step: if the table itself
dies, the platform reaps the sandboxes on its own. Sandboxes are labelled
``rock-serve/integration=gem-api``. They carry no Ray job id: the table outlives the job that
happened to create it.

Wiring: ``app.include_router(_gem.router, ...)`` before ``@serve.ingress`` (``admin.py``), so the
routes and their URLs stay the Admin's; their calls go to the ``GemApi`` deployment
(``_gem_app.py``), which ``build_app`` composes beside the Admin and which alone talks to the
env table. ``_gem.bind(args.namespace, args.gem, via)`` in ``Admin.__init__`` wires them; an
Admin deployed on its own (no ``GemApi`` handle) calls the table itself. Every route takes the
caller (``Auth``).
"""

# No "from __future__ import annotations": FastAPI reads these annotations at include time.

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from fastapi import APIRouter
from pydantic import BaseModel

from rock_serve.auth import Principal
from rock_serve.config import GemConfig
from rock_serve.deployments._auth import Auth
from rock_serve.deployments._episodes import EpisodeLog
from rock_serve.deployments._ray import ActorHandle, call
from rock_serve.deployments._trace import untraced_task
from rock_serve.deployments.client import AsyncRayClient
from rock_serve.envs import AsyncEnv, list_envs, make_async
from rock_serve.envs.integrations import (
    GEM_PREFIX,
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
from rock_serve.errors import (
    InvalidRequest,
    NotFound,
    RateLimited,
    RockError,
    RuntimeUnavailable,
)
from rock_serve.lifetime import IdleLifetime
from rock_serve.protocol import CreateSandboxRequest, SandboxRecord
from rock_serve.protocol.trajectories import EpisodeList, EpisodeStepPage
from rock_serve.runtime._sync import run_sync

__all__ = [
    "ENV_TABLE_NAME",
    "GEM_LABEL",
    "EnvTable",
    "bind",
    "env_table",
    "get_or_create_env_table",
    "router",
]

log = logging.getLogger(__name__)

#: Actor name of the env table (in the platform's Ray namespace).
ENV_TABLE_NAME = "rock-envs"
#: Label key and value on the sandboxes of GEM env instances.
GEM_LABEL = ("rock-serve/integration", "gem-api")
#: Closed instances whose episodes the console can still show (the newest closed).
MAX_ENDED = 100
_HEAD_RESOURCE = "node:__internal_head__"

router = APIRouter(prefix=GEM_PREFIX, tags=["gem"])


# ----------------------------------------------------------------------------- the table


class _CallerClient(AsyncRayClient):
    """The Ray-transport client of one caller namespace (its ``tenant``), whose sandboxes are
    labelled, leased, and owned by no Ray job.
    """

    def __init__(self, platform: str, caller: str, lease_seconds: Callable[[], float]) -> None:
        super().__init__(platform, tenant=caller)
        self._lease_seconds = lease_seconds

    async def create_sandbox(
        self, request: CreateSandboxRequest | None = None, /, **spec: Any
    ) -> SandboxRecord:
        """Create a sandbox in the caller's namespace, labelled and leased (no Ray job: the
        table outlives whichever job created it).
        """
        if request is None:
            request = CreateSandboxRequest(**spec)
        elif spec:
            request = request.model_copy(update=spec)
        update: dict[str, Any] = {"labels": {**request.labels, GEM_LABEL[0]: GEM_LABEL[1]}}
        if request.lease_seconds is None:
            update["lease_seconds"] = self._lease_seconds()
        request = CreateSandboxRequest.model_validate({**request.model_dump(), **update})
        record: SandboxRecord = await self._call(None, "create", request, self.tenant)
        return record


@dataclass
class _Instance:
    id: str
    namespace: str
    env_id: str
    env: AsyncEnv[Any, Any]
    last_used: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Its last episodes, for the console (bounded; see ``_episodes``).
    episodes: EpisodeLog = field(default_factory=EpisodeLog)
    sandbox_id: str | None = None
    closed: bool = False


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (numpy arrays and scalars, tuples, models, bytes)."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return str(value)


class EnvTable:
    """The platform's GEM env instances (a detached actor; see the module docstring).

    Each method takes the caller (a :class:`~rock_serve.auth.Principal`); one instance's calls
    run one at a time, different instances' concurrently.
    """

    def __init__(
        self,
        namespace: str,
        config: GemConfig | dict[str, Any] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Serve the platform whose actors live in Ray namespace ``namespace``, with the idle
        TTL and limits of ``config`` (``ServerArgs.gem``).
        """
        self.namespace = namespace
        self.config = GemConfig.model_validate(config or {})
        self._clock = clock
        self._instances: dict[str, _Instance] = {}
        #: Closed instances kept for their episodes (console), oldest first.
        self._ended: OrderedDict[str, _Instance] = OrderedDict()
        self._clients: dict[str, AsyncRayClient] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------ routes

    async def make(self, caller: Principal, req: GemMakeRequest) -> GemMakeResponse:
        """Make an instance of a registered env in the caller's namespace.

        Raises:
            EnvNotFound: Unknown env id (404).
            InvalidRequest: Keyword arguments the env does not take, or bad values (400).
            RateLimited: The table is full (429).
        """
        self._start()
        if "client" in req.env_kwargs:
            raise InvalidRequest("'client' cannot be given over HTTP: the platform sets it")
        if len(self._instances) >= self.config.max_instances:
            raise RateLimited(f"{len(self._instances)} env instances are open", retry_after=5)
        mine = sum(1 for i in self._instances.values() if i.namespace == caller.namespace)
        if mine >= self.config.max_instances_per_namespace:
            raise RateLimited(
                f"namespace {caller.namespace!r} has {mine} env instances open; close some",
                retry_after=5,
            )
        client = await self._client(caller.namespace)
        try:
            env = make_async(req.env_id, client=client, **req.env_kwargs)
        except RockError:
            raise
        except (TypeError, ValueError) as exc:  # an env's own check of its arguments
            raise InvalidRequest(f"{req.env_id}: {exc}") from None
        instance_id = f"gem-{secrets.token_hex(16)}"
        self._instances[instance_id] = _Instance(
            id=instance_id,
            namespace=caller.namespace,
            env_id=req.env_id,
            env=env,
            last_used=self._clock(),
        )
        log.info("gem: made %s (%s) for namespace %s", instance_id, req.env_id, caller.namespace)
        return GemMakeResponse(sandbox_id=instance_id)

    async def reset(self, caller: Principal, req: GemResetRequest) -> GemResetResponse:
        """Start an episode (the first one creates the instance's sandbox).

        Raises:
            NotFound: Unknown instance, or one of another namespace (404).
        """
        instance = self._get(caller, req.sandbox_id)
        async with self._using(instance):
            obs, info = await instance.env.reset(seed=req.seed, options=req.options)
            instance.sandbox_id = getattr(instance.env.unwrapped, "sandbox_id", None)
            reply = GemResetResponse(observation=_jsonable(obs), info=_jsonable(info))
            instance.episodes.reset(reply.observation, reply.info, instance.sandbox_id)
        return reply

    async def step(self, caller: Principal, req: GemStepRequest) -> GemStepResponse:
        """Apply an action.

        Raises:
            NotFound: Unknown instance (404).
            ResetNeeded: Before the first reset, or after the episode ended (409).
            InvalidAction: The action is not in the env's action space (400).
        """
        instance = self._get(caller, req.sandbox_id)
        async with self._using(instance):
            obs, reward, terminated, truncated, info = await instance.env.step(req.action)
            reply = GemStepResponse(
                observation=_jsonable(obs),
                reward=float(reward),
                terminated=bool(terminated),
                truncated=bool(truncated),
                info=_jsonable(info),
            )
            instance.episodes.step(
                _jsonable(req.action),
                reply.observation,
                reply.reward,
                reply.terminated,
                reply.truncated,
                reply.info,
            )
        return reply

    async def close(self, caller: Principal, req: GemCloseRequest) -> GemCloseResponse:
        """Close an instance and delete its sandbox.

        Raises:
            NotFound: Unknown (or already closed) instance (404).
        """
        instance = self._get(caller, req.sandbox_id)
        async with instance.lock:  # let a running step finish first
            if self._instances.pop(instance.id, None) is None:
                raise NotFound(f"no env instance {req.sandbox_id!r}")
            await self._close(instance, "closed")
        return GemCloseResponse(sandbox_id=instance.id)

    async def list_ids(self, caller: Principal, req: GemListRequest) -> GemListResponse:
        """The env ids ``make`` accepts.

        Raises:
            NotFound: ``sandbox_id`` is given and names no instance of the caller (404).
        """
        if req.sandbox_id is not None:
            self._get(caller, req.sandbox_id)
        return GemListResponse(env_id=[s.id for s in list_envs()])

    # ------------------------------------------------------------------ operations

    async def configure(
        self,
        config: GemConfig | dict[str, Any] | None = None,
        *,
        idle_ttl_seconds: float | None = None,
        reap_interval_seconds: float | None = None,
    ) -> None:
        """Take a new config (a redeploy's ``ServerArgs.gem``) and/or change the idle TTL and
        the reap interval; applies to open instances too.
        """
        update: dict[str, float] = {}
        if idle_ttl_seconds is not None:
            update["idle_ttl_seconds"] = float(idle_ttl_seconds)
        if reap_interval_seconds is not None:
            update["reap_interval_seconds"] = float(reap_interval_seconds)
        base = self.config if config is None else GemConfig.model_validate(config)
        self.config = GemConfig.model_validate({**base.model_dump(), **update})
        self._start()
        self._wake.set()

    async def describe(self, caller: Principal) -> list[dict[str, Any]]:
        """The instances the caller may see (the console's envs page): open ones, then the
        last closed ones, newest use first.
        """
        now = self._clock()
        rows = [
            {
                "id": i.id,
                "env_id": i.env_id,
                "namespace": i.namespace,
                "idle_seconds": round(now - i.last_used, 1),
                "busy": i.lock.locked(),
                "sandbox_id": i.sandbox_id,
                "episodes": len(i.episodes),
                "closed": i.closed,
            }
            for i in [*self._instances.values(), *self._ended.values()]
            if caller.may_see(i.namespace)
        ]
        return sorted(rows, key=lambda r: (r["closed"], r["idle_seconds"]))

    async def episodes(
        self, caller: Principal, instance_id: str, offset: int, limit: int
    ) -> EpisodeList:
        """A page of an instance's kept episodes, newest first (closed instances too).

        Raises:
            NotFound: Unknown instance, or one of another namespace (404).
        """
        instance = self._seen(caller, instance_id)
        total, items = instance.episodes.page(offset, limit)
        return EpisodeList(
            instance_id=instance.id, env_id=instance.env_id, total=total, offset=offset, items=items
        )

    async def episode_steps(
        self, caller: Principal, instance_id: str, index: int, offset: int, limit: int
    ) -> EpisodeStepPage:
        """A page of one episode's steps.

        Raises:
            NotFound: Unknown instance or episode (404).
        """
        instance = self._seen(caller, instance_id)
        summary, total, items = instance.episodes.steps(index, offset, limit)
        return EpisodeStepPage(
            instance_id=instance.id, episode=summary, total=total, offset=offset, items=items
        )

    async def instances(self) -> dict[str, int]:
        """How many instances each namespace has open."""
        counts: dict[str, int] = {}
        for instance in self._instances.values():
            counts[instance.namespace] = counts.get(instance.namespace, 0) + 1
        return counts

    async def reap(self) -> list[str]:
        """Close every instance unused for ``idle_ttl_seconds``; returns their ids."""
        now, life = self._clock(), self.lifetime
        idle = [
            i
            for i in self._instances.values()
            if life.idle(i.last_used, now) and not i.lock.locked()
        ]
        for instance in idle:
            if self._instances.get(instance.id) is instance:
                del self._instances[instance.id]
                await self._close(instance, "idle")
        return [i.id for i in idle]

    # ------------------------------------------------------------------ internals

    def _seen(self, caller: Principal, instance_id: str) -> _Instance:
        instance = self._instances.get(instance_id) or self._ended.get(instance_id)
        if instance is None or not caller.may_see(instance.namespace):
            raise NotFound(f"no env instance {instance_id!r} (never made, or closed long ago)")
        return instance

    def _get(self, caller: Principal, instance_id: str) -> _Instance:
        instance = self._instances.get(instance_id)
        if instance is None or not caller.may_see(instance.namespace):
            raise NotFound(f"no env instance {instance_id!r} (closed, reaped or never made)")
        return instance

    @contextlib.asynccontextmanager
    async def _using(self, instance: _Instance) -> Any:
        async with instance.lock:
            if self._instances.get(instance.id) is not instance:  # closed while we waited
                raise NotFound(f"no env instance {instance.id!r} (closed)")
            instance.last_used = self._clock()
            try:
                yield
            finally:
                instance.last_used = self._clock()

    async def _close(self, instance: _Instance, why: str) -> None:
        instance.closed = True
        self._ended[instance.id] = instance
        while len(self._ended) > MAX_ENDED:
            self._ended.popitem(last=False)
        try:
            await instance.env.close()
        except Exception:
            # The sandbox's lease ends it if this delete was lost.
            log.warning("gem: closing %s (%s) failed", instance.id, why, exc_info=True)
        log.info("gem: %s %s (%s)", why, instance.id, instance.env_id)

    async def _client(self, caller: str) -> AsyncRayClient:
        client = self._clients.get(caller)
        if client is None:
            # Looking the Scheduler actor up by name blocks: keep it off the event loop.
            client = await run_sync(_CallerClient, self.namespace, caller, self._lease)
            self._clients[caller] = client
        return client

    @property
    def lifetime(self) -> IdleLifetime:
        """The instances' idle rule (from :attr:`config`)."""
        c = self.config
        return IdleLifetime(c.idle_ttl_seconds, c.reap_interval_seconds, c.lease_margin_seconds)

    def _lease(self) -> float:
        return self.lifetime.lease_seconds()

    def _start(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = untraced_task(self._reap_loop())  # not under a call's trace

    async def _reap_loop(self) -> None:
        while True:
            self._wake = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                interval = self.lifetime.reap_pause()
                await asyncio.wait_for(self._wake.wait(), interval)
            try:
                await self.reap()
            except Exception:
                log.exception("gem: reaping idle env instances failed")


# ----------------------------------------------------------------------------- Ray wiring


def get_or_create_env_table(namespace: str, config: GemConfig | None = None) -> ActorHandle:
    """The platform's detached :class:`EnvTable` actor (created on first use); blocks."""
    cls = ray.remote(EnvTable)
    return cls.options(
        name=ENV_TABLE_NAME,
        namespace=namespace,
        get_if_exists=True,
        lifetime="detached",
        num_cpus=0,
        max_concurrency=1000,
        max_restarts=-1,
        max_task_retries=0,
        # On the head node, as the Scheduler: it outlives every other node.
        resources={_HEAD_RESOURCE: 0.001},
    ).remote(namespace, (config or GemConfig()).model_dump())


#: Per-replica state: the platform namespace (set by :func:`bind`) and the table's handle.
_PLATFORM: dict[str, Any] = {}


def bind(namespace: str, config: GemConfig | None = None, via: Any = None) -> None:
    """Tell this process's GEM routes which platform they serve and the table's config
    (``ServerArgs.gem``; from ``Admin.__init__`` and ``GemApi.__init__``). With ``via`` (the
    handle of the ``GemApi`` deployment, as ``build_app`` composes it) the routes call that
    deployment; without (an Admin deployed on its own) they call the table themselves.
    """
    config = config or GemConfig()
    if _PLATFORM.get("namespace") != namespace or _PLATFORM.get("config") != config:
        _PLATFORM.clear()
        _PLATFORM["namespace"] = namespace
        _PLATFORM["config"] = config
    _PLATFORM["via"] = via


async def env_table() -> ActorHandle:
    """The env table of the bound platform (looked up or created once per replica).

    Raises:
        RuntimeUnavailable: :func:`bind` was not called.
    """
    actor = _PLATFORM.get("table")
    if actor is None:
        namespace = _PLATFORM.get("namespace")
        if namespace is None:
            raise RuntimeUnavailable("the GEM routes are not bound to a platform")
        config: GemConfig = _PLATFORM["config"]
        actor = await run_sync(get_or_create_env_table, namespace, config)
        # An existing table (made before a redeploy) takes this deploy's config.
        await call(actor, EnvTable.configure, config.model_dump())
        _PLATFORM["table"] = actor
    return actor


async def table_call(method: str, caller: Principal, body: BaseModel) -> Any:
    """Call the env table's ``method`` for ``caller`` (looked up once; again if it died)."""
    table = await env_table()
    try:
        return await call(table, method, caller, body)
    except RuntimeUnavailable:
        _PLATFORM.pop("table", None)  # a killed table: look it up (or make it) again next time
        raise


async def _call(method: str, caller: Principal, body: BaseModel) -> Any:
    """A route's call: through the ``GemApi`` deployment when bound to one, else direct."""
    via = _PLATFORM.get("via")
    if via is not None:
        return await call(via, method, caller, body)
    return await table_call(method, caller, body)


@router.post("/make", response_model=GemMakeResponse)
async def gem_make(req: GemMakeRequest, caller: Auth) -> GemMakeResponse:
    """Make an env instance (ROCK's ``make``; ``kwargs`` reach the env).

    Returns ``{"sandbox_id": <instance id>}``; the instance's sandbox is created at its first
    reset. Unknown env id: 404; keyword arguments the env does not take: 400.
    """
    result: GemMakeResponse = await _call("make", caller, req)
    return result


@router.post("/reset", response_model=GemResetResponse)
async def gem_reset(req: GemResetRequest, caller: Auth) -> GemResetResponse:
    """Start an episode: ``{"observation", "info"}``. Unknown instance: 404."""
    result: GemResetResponse = await _call("reset", caller, req)
    return result


@router.post("/step", response_model=GemStepResponse)
async def gem_step(req: GemStepRequest, caller: Auth) -> GemStepResponse:
    """Apply an action: ``{"observation", "reward", "terminated", "truncated", "info"}``.

    Before the first reset or after the episode ended: 409; an action outside the action
    space: 400; unknown instance: 404.
    """
    result: GemStepResponse = await _call("step", caller, req)
    return result


@router.post("/close", response_model=GemCloseResponse)
async def gem_close(req: GemCloseRequest, caller: Auth) -> GemCloseResponse:
    """Close an instance and delete its sandbox: ``{"sandbox_id"}``. Unknown instance: 404."""
    result: GemCloseResponse = await _call("close", caller, req)
    return result


@router.post("/list", response_model=GemListResponse)
async def gem_list(req: GemListRequest, caller: Auth) -> GemListResponse:
    """The env ids ``make`` accepts: ``{"env_id": [...]}``."""
    result: GemListResponse = await _call("list_ids", caller, req)
    return result
