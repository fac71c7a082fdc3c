"""Image routes (``/v1/images``) on the Admin and their Worker side.

- ``POST /v1/images/pull`` (:class:`ImagePullRequest`): every named image on every (or the
  named) Worker, concurrently; the reply is NDJSON :class:`ImagePullEvent` lines (each tagged
  with its node) ending, per node and image, with ``done`` or ``error``. A pull already in
  flight on a node (a create's, say) is joined, not repeated.
- ``GET /v1/images``: :class:`ImageList`, per node: refs, digest, size, last use, in use.
- ``DELETE /v1/images/{ref}``: removes it from every node's store (409 where a sandbox uses it).
- ``POST /v1/images/push`` (:class:`ImagePushRequest`, admin): a stored image (a committed
  one, say) to a registry, with per-request credentials; :class:`ImagePushResult`.

Wiring: ``admin.py`` includes :data:`router` (one line) and calls :func:`bind`; the Worker
class inherits :class:`ImagesWorker`, whose methods reach its runtime's image store.
"""

# No "from __future__ import annotations": FastAPI reads these annotations at include time.

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import StreamingResponse
from pydantic import BeforeValidator

from rock_serve.auth import Principal
from rock_serve.deployments._auth import Auth
from rock_serve.deployments._ray import (
    WORKER_PREFIX,
    ActorHandle,
    WorkerHandles,
    call,
    get_scheduler,
    stream,
)
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.errors import (
    Conflict,
    ImageNotFound,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RockError,
    RuntimeUnavailable,
)
from rock_serve.protocol import (
    CommitRequest,
    CommitResult,
    Health,
    ImageInfo,
    ImageList,
    ImagePullEvent,
    ImagePullRequest,
    ImagePushRequest,
    ImagePushResult,
    RegistryAuth,
    parse_image_ref,
)
from rock_serve.protocol.images import IMAGE_REF_PATTERN, check_image_ref
from rock_serve.runtime._sync import run_sync
from rock_serve.runtime.images import ImageStore

__all__ = ["ImagesWorker", "bind", "router"]

router = APIRouter(tags=["images"])
_NDJSON = "application/x-ndjson"
_PLATFORM: dict[str, Any] = {}


def bind(namespace: str) -> None:
    """Tell this process's image routes which platform they serve (from ``Admin.__init__``)."""
    if _PLATFORM.get("namespace") != namespace:
        _PLATFORM.clear()
        _PLATFORM["namespace"] = namespace
        _PLATFORM["workers"] = WorkerHandles(namespace)


async def _workers(names: list[str] | None) -> list[tuple[str, ActorHandle]]:
    namespace = _PLATFORM.get("namespace")
    if namespace is None:
        raise RuntimeUnavailable("the image routes are not bound to a platform")
    health: Health = await call(await run_sync(get_scheduler, namespace), Scheduler.health)
    alive = [w.name.removeprefix(WORKER_PREFIX) for w in health.workers if w.alive]
    if names is not None:
        unknown = sorted(set(names) - set(alive))
        if unknown:
            # Schema-valid names that match no live Worker: not found, not a malformed request.
            raise NotFound(f"no live Worker named {unknown}; live: {alive}")
        alive = [n for n in alive if n in names]
    handles: WorkerHandles = _PLATFORM["workers"]
    return [(name, await handles.get(name)) for name in alive]


def _admin_only(principal: Principal, what: str) -> None:
    if not principal.admin:
        raise PermissionDenied(f"{what} needs an admin token")


@router.post(
    "/v1/images/pull",
    response_class=StreamingResponse,
    responses={200: {"content": {_NDJSON: {"schema": {"type": "string"}}}}},
)
async def pull_images(req: ImagePullRequest, principal: Auth) -> StreamingResponse:
    """Prepull images on nodes; progress as NDJSON ``ImagePullEvent`` lines."""
    # A malformed reference refuses the whole batch (422 invalid_image_reference, from the
    # schema's ImageRefText) before any pull starts: a typo is an answer, not a stream line.
    workers = await _workers(req.nodes)
    queue: asyncio.Queue[ImagePullEvent | None] = asyncio.Queue()

    scheduler = await run_sync(get_scheduler, _PLATFORM["namespace"])

    async def one(name: str, actor: ActorHandle, ref: str) -> None:
        try:
            async for event in stream(actor, ImagesWorker.image_pull_events, ref, req.auth):
                if event.phase == "done":
                    await call(scheduler, Scheduler.note_image, name, ref)
                await queue.put(event.model_copy(update={"node": name}))
        except RockError as exc:
            error = {"code": exc.code.value, "message": exc.message}
            await queue.put(ImagePullEvent(node=name, image=ref, phase="error", error=error))

    async def run_all() -> None:
        try:
            await asyncio.gather(*(one(n, a, r) for n, a in workers for r in req.images))
        finally:
            await queue.put(None)

    async def body() -> AsyncIterator[bytes]:
        task = asyncio.ensure_future(run_all())
        try:
            while (event := await queue.get()) is not None:
                yield event.model_dump_json().encode() + b"\n"
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    return StreamingResponse(body(), media_type=_NDJSON)


@router.post("/v1/images/push", response_model=ImagePushResult)
async def push_image(req: ImagePushRequest, principal: Auth) -> ImagePushResult:
    """Push an image of a node's store to a registry (admin only: the stores are shared).

    The credentials are used for this push only: never logged, stored or returned.
    """
    _admin_only(principal, "pushing images")
    dest = parse_image_ref(req.destination)  # schema-checked (ImageRefText): never malformed
    if dest.transport != "docker" or "@" in dest.name:
        # schema-valid, but not a place one can push to
        raise Conflict(f"push to a registry tag (host/repo:tag), not {req.destination!r}")
    workers = await _workers([req.node] if req.node is not None else None)
    for name, actor in workers:
        try:
            digest: str = await call(
                actor, ImagesWorker.image_push, req.image, req.destination, req.auth
            )
        except ImageNotFound:
            continue
        return ImagePushResult(destination=str(dest), digest=digest, node=name)
    raise ImageNotFound(f"no node holds image {req.image!r}")


@router.get("/v1/images", response_model=ImageList)
async def list_images(principal: Auth) -> ImageList:
    """Images held by each node's store."""
    images: list[ImageInfo] = []
    disk: dict[str, int] = {}
    pulls: list[ImagePullEvent] = []
    for name, actor in await _workers(None):
        infos, used, inflight = await call(actor, ImagesWorker.images_list)
        images += [i.model_copy(update={"node": name}) for i in infos]
        pulls += [p.model_copy(update={"node": name}) for p in inflight]
        disk[name] = used
    return ImageList(images=images, disk_bytes=disk, pulls=pulls)


@router.delete("/v1/images/{ref:path}", status_code=204)
async def remove_image(
    ref: Annotated[
        str,
        Path(description="Reference or image id.", max_length=512, pattern=IMAGE_REF_PATTERN),
        BeforeValidator(check_image_ref),  # malformed: 422 invalid_image_reference
    ],
    principal: Auth,
) -> None:
    """Remove an image from every node's store (admin only)."""
    _admin_only(principal, "removing images")
    removed = 0
    busy: list[str] = []
    for name, actor in await _workers(None):
        try:
            await call(actor, ImagesWorker.image_remove, ref)
            removed += 1
            scheduler = await run_sync(get_scheduler, _PLATFORM["namespace"])
            await call(scheduler, Scheduler.note_image, name, ref, False)
        except ImageNotFound:
            continue
        except Conflict:
            busy.append(name)
    if busy:
        raise Conflict(f"image {ref!r} is in use on {busy}")
    if not removed:
        raise ImageNotFound(f"no node holds image {ref!r}")


@router.post("/v1/sandboxes/{sandbox_id}/commit", response_model=CommitResult)
async def commit_sandbox(sandbox_id: str, req: CommitRequest, principal: Auth) -> CommitResult:
    """Save a sandbox's files as a new image on its node.

    bwrap: its upper dir becomes a layer in the node's store; docker: ``docker commit``.
    """
    from ray import serve  # here: the Worker imports this module, and must not load Serve

    admin: Any = serve.get_replica_context().servable_object
    worker = await admin._worker(sandbox_id)  # checks the caller may use that sandbox
    ref: str = await call(worker, ImagesWorker.commit_sandbox, sandbox_id, req.image)
    return CommitResult(image=ref, node=sandbox_id.split("-")[1])


def _split_ref(ref: str) -> tuple[str, str]:
    """``repo[:tag]`` -> (repo, tag); a digest cannot be a commit's name."""
    if "@" in ref:
        raise InvalidRequest(f"commit to a tag, not a digest: {ref!r}")
    head, sep, tail = ref.rpartition(":")
    if sep and "/" not in tail:
        return head, tail
    return ref, "latest"


class ImageMetrics:
    """The node's image store on /metrics (Ray prefixes the names with ``ray_``).

    Gauges ``rock_image_store_bytes``, ``rock_image_store_budget_bytes``,
    ``rock_image_store_images``, ``rock_image_pulls_in_flight`` and counters
    ``rock_image_pull_failures_total``, ``rock_image_pulls_total``,
    ``rock_image_pushes_total``, all by ``worker``; refreshed on every change of the store.
    A no-op outside a Ray process. Alert: ``ImageStoreNearBudget`` (configs/alerts.yaml).
    """

    def __init__(self, worker: str) -> None:
        self.tags = {"worker": worker}
        self._m: dict[str, Any] = {}
        self._last: dict[str, int] = {}
        try:
            import ray
            from ray.util import metrics as rm
        except ImportError:  # pragma: no cover - the server extra is not installed
            return
        if not ray.is_initialized():
            return
        keys = ("worker",)
        self._m = {
            "bytes": rm.Gauge(
                "rock_image_store_bytes", "Bytes of unpacked layers in the store.", keys
            ),
            "budget": rm.Gauge(
                "rock_image_store_budget_bytes", "The store's disk budget (0 = none).", keys
            ),
            "images": rm.Gauge("rock_image_store_images", "Images in the store.", keys),
            "pulls_in_flight": rm.Gauge(
                "rock_image_pulls_in_flight", "Pulls running now (shared ones once).", keys
            ),
            "pull_failures": rm.Counter(
                "rock_image_pull_failures_total", "Pulls that ended in an error.", keys
            ),
            "pulls": rm.Counter("rock_image_pulls_total", "Transfers done by the store.", keys),
            "pushes": rm.Counter("rock_image_pushes_total", "Images pushed to registries.", keys),
        }

    def update(self, store: ImageStore) -> None:
        """Set the gauges and advance the counters from ``store.stats()``."""
        if not self._m:
            return
        for key, value in store.stats().items():
            metric = self._m.get(key)
            if metric is None:
                continue
            if key in ("pull_failures", "pulls", "pushes"):
                delta = value - self._last.get(key, 0)
                if delta > 0:
                    metric.inc(delta, tags=self.tags)
                self._last[key] = value
            else:
                metric.set(value, tags=self.tags)


class ImagesWorker:
    """The Worker's image methods (mixed into the Worker class)."""

    async def _ready(self) -> Any:  # provided by the Worker
        raise NotImplementedError

    def _publish_images(self) -> None:
        """Hang the store's metrics on it once (the Worker calls this when it publishes)."""
        if getattr(self, "_image_metrics", None) is not None:
            return
        store = getattr(getattr(self, "_runtime", None), "images", None)
        if not isinstance(store, ImageStore):
            return
        metrics = ImageMetrics(str(getattr(self, "name", "")))
        self._image_metrics = metrics
        store.listeners.append(metrics.update)
        metrics.update(store)

    async def _store(self) -> ImageStore:
        runtime = await self._ready()
        store = getattr(runtime, "images", None)
        if not isinstance(store, ImageStore):
            # The platform's config, not the request, is what lacks it.
            raise Conflict(f"the {runtime.name} runtime has no image store")
        return store

    async def image_pull_events(
        self, ref: str, auth: RegistryAuth | None = None
    ) -> AsyncIterator[ImagePullEvent]:
        """Pull ``ref`` into this node's store (or join its pull), yielding progress."""
        store = await self._store()
        async for event in store.events(ref, auth, force=True):
            yield event

    async def images_list(self) -> tuple[list[ImageInfo], int, list[ImagePullEvent]]:
        """The node's images, the bytes of their layers and the pulls in flight."""
        store = await self._store()
        return store.list(), store.disk_bytes(), store.pulls()

    async def commit_sandbox(self, sandbox_id: str, ref: str) -> str:
        """Commit a sandbox of this node as image ``ref``; returns its reference."""
        box: Any = self._box(sandbox_id)  # type: ignore[attr-defined]
        commit = getattr(box.runtime, "commit", None)
        if commit is None:
            raise Conflict(f"the {box.runtime.name} runtime cannot commit sandboxes")
        repo, tag = _split_ref(ref)
        return str(await commit(sandbox_id, repo, tag))

    async def image_push(self, ref: str, dest: str, auth: RegistryAuth | None = None) -> str:
        """Push ``ref`` of this node's store to the registry reference ``dest``; its digest."""
        store = await self._store()
        return await store.push(ref, dest, auth)

    async def image_remove(self, ref: str) -> None:
        """Remove ``ref`` from this node's store."""
        store = await self._store()
        await store.remove(ref)
