"""A sandbox's life on its Worker: create (from the warm pool, an image or a snapshot),
watch its rocklet, mark it failed with the reason, remove it. The Worker class inherits
:class:`LifecycleWorker`; nothing of a failed create is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, cast

from rock_serve.deployments._node import check_resources, effective_resources
from rock_serve.deployments._trace import untraced_task
from rock_serve.deployments._worker_table import LABEL_RECORD, LABEL_WORKER, Box, step
from rock_serve.errors import Conflict, RateLimited, RockError
from rock_serve.lifetime import Lifetime
from rock_serve.protocol import (
    CreateSandboxRequest,
    FailureReason,
    SandboxRecord,
    SandboxSpec,
    SandboxState,
    StateChange,
)
from rock_serve.protocol.api import LIFECYCLE_FIELDS
from rock_serve.protocol.snapshot import SnapshotRecord
from rock_serve.runtime.base import Runtime

if TYPE_CHECKING:
    from rock_serve.deployments.worker import Worker

__all__ = ["LifecycleWorker"]

log = logging.getLogger("rock_serve.deployments.worker")


class LifecycleWorker:
    """Create, watch and remove (the Worker class inherits it)."""

    async def create(
        self,
        sandbox_id: str,
        req: CreateSandboxRequest,
        ttl: float,
        namespace: str = "default",
        snapshot: SnapshotRecord | None = None,
    ) -> SandboxRecord:
        """Create and start a sandbox (over ``snapshot``'s files when given). On any failure
        nothing is left behind.

        Raises:
            RateLimited: the node is at ``max_sandboxes_per_node``.
            Conflict: the id is taken.
            ImageNotFound, InvalidConfig: the runtime refused the spec.
        """
        w = cast("Worker", self)
        runtime = await w._ready()
        if w._table.load() >= w.args.max_sandboxes_per_node:
            raise RateLimited(
                f"worker {w.name} is full", retry_after=w.args.create_retry_after_seconds
            )
        if w._table.taken(sandbox_id):
            raise Conflict(f"sandbox {sandbox_id!r} exists already")
        spec = SandboxSpec.model_validate(req.model_dump(exclude=set(LIFECYCLE_FIELDS)))
        spec.registry_auth = req.registry_auth  # excluded from dumps: never stored
        resources = effective_resources(req.resources, w.args.runtime)
        check_resources(resources, w._node, w.args)
        await w._llm_prepare(sandbox_id, req, spec)  # OPENAI_* env, reverse ports (15.3)
        now = w._clock()
        lease = Lifetime.of(w.args).lease(req.lease_seconds)
        record = SandboxRecord(
            id=sandbox_id,
            state=SandboxState.PENDING,
            owner=req.owner,
            labels=dict(req.labels),
            image=req.image,
            resources=resources,
            network=req.network,
            egress=req.egress,
            worker=w.name,
            node_id=w.node_id,
            created_at=now,
            expires_at=Lifetime.expires_at(now, ttl),
            namespace=namespace,
            ray_job_id=req.ray_job_id,
            trajectory_id=req.trajectory_id,
            endpoint=w.dataplane_address(),
            lease_seconds=lease,
            archive_on_expiry=req.archive_on_expiry,
            history=[StateChange(state=SandboxState.PENDING, at=now)],
        )
        spec.labels = {
            **spec.labels,
            LABEL_WORKER: w.name,
            LABEL_RECORD: record.model_dump_json(exclude={"history"}),
        }
        warm = w._pool.take(spec) if snapshot is None else None
        if warm is not None:
            record.id = warm.record.id  # the pool's sandbox keeps its id
            w._llm_rekey(sandbox_id, record.id)
            try:
                await w._llm_attach(record.id, warm.handle)
            except BaseException:
                await w._llm_close(record.id)
                await w._pool.discard(warm)
                raise
            step(record, SandboxState.STARTING, now, "warm_pool")
            step(record, SandboxState.RUNNING, now, "warm_pool")
            box = Box(record, warm.handle, warm.runtime)
            w._table.add(box, now)
            w._watch(box)
            w._metrics.created(0.0, ok=True, namespace=namespace)
            w._publish()
            log.info(
                "worker %s: created sandbox %s from the warm pool owner=%r",
                w.name,
                record.id,
                req.owner,
                extra={"sandbox_id": record.id, "owner": req.owner, "namespace": namespace},
            )
            return record
        w._creating.add(sandbox_id)
        started = time.perf_counter()
        try:
            step(record, SandboxState.STARTING, w._clock())
            if snapshot is None:
                await runtime.create(sandbox_id, spec)
            else:
                await w._restore_snapshot(runtime, sandbox_id, spec, snapshot)
            handle = await runtime.start(sandbox_id)
            try:
                await w._llm_attach(sandbox_id, handle)
            except BaseException:
                await handle.close()
                raise
            step(record, SandboxState.RUNNING, w._clock())
            box = Box(record, handle, runtime)
            w._table.add(box, w._clock())
            w._watch(box)
            w._pool.want()  # less room: the pool may have to shrink
            w._metrics.created(time.perf_counter() - started, ok=True, namespace=namespace)
            w._publish()
            log.info(
                "worker %s: created sandbox %s owner=%r in %.1f ms",
                w.name,
                sandbox_id,
                req.owner,
                (time.perf_counter() - started) * 1000,
                extra={"sandbox_id": sandbox_id, "owner": req.owner, "namespace": namespace},
            )
            return record
        except Conflict:
            await w._llm_close(sandbox_id)
            raise  # the id belongs to someone else: leave it alone
        except BaseException as exc:
            w._metrics.created(time.perf_counter() - started, ok=False, namespace=namespace)
            code = exc.code.value if isinstance(exc, RockError) else "internal"
            w._metrics.error("create", code)
            await w._undo_create(runtime, sandbox_id)
            raise
        finally:
            w._creating.discard(sandbox_id)

    async def _undo_create(self, runtime: Runtime, sandbox_id: str) -> None:
        """Remove what a failed create made of ``sandbox_id`` (its model service, the
        runtime's sandbox), shielded from the caller's cancellation. Removal is idempotent, so
        a half-made sandbox goes too.
        """
        w = cast("Worker", self)
        with contextlib.suppress(Exception):
            await asyncio.shield(w._llm_close(sandbox_id))
        with contextlib.suppress(Exception):
            await asyncio.shield(runtime.remove(sandbox_id))

    async def remove(self, sandbox_id: str, reason: str = "deleted") -> None:
        """Stop and remove a sandbox.

        Raises:
            SandboxNotFound: this Worker has no such sandbox.
        """
        w = cast("Worker", self)
        box = w._table.pop(sandbox_id, reason)
        if box.watcher is not None:
            box.watcher.cancel()
        if box.record.state == SandboxState.PAUSED:  # a frozen rocklet cannot exit
            with contextlib.suppress(Exception):
                await box.runtime.resume(sandbox_id)
        with contextlib.suppress(Exception):
            await w._llm_close(sandbox_id)  # its tunnels and pending model calls
        with contextlib.suppress(Exception):
            await box.handle.close()
        try:
            await box.runtime.remove(sandbox_id)
        finally:
            w._pool.want()
            w._publish()
            log.info(
                "worker %s: removed sandbox %s (%s)",
                w.name,
                sandbox_id,
                reason,
                extra={"sandbox_id": sandbox_id, "owner": box.record.owner, "reason": reason},
            )

    def _watch(self, box: Box) -> None:
        """Ping the box's rocklet when it is silent, and mark the sandbox failed (with the
        reason) as soon as its rocklet exits or stops answering: never 'running' with a dead
        agent.
        """
        w = cast("Worker", self)
        interval = w.args.rocklet_ping_interval_seconds
        if interval is not None:
            box.handle.watch(interval, w.args.rocklet_ping_timeout_seconds)
        box.watcher = untraced_task(w._await_failure(box))  # outlives the traced create

    async def _await_failure(self, box: Box) -> None:
        w = cast("Worker", self)
        await box.handle.wait_closed()
        if w._boxes.get(box.record.id) is not box or box.handle.failure is None:
            return  # removed (its handle closed by us)
        await w._mark_failed(box)

    async def _mark_failed(self, box: Box) -> None:
        w = cast("Worker", self)
        record = box.record
        if not w._still_running(box):
            return
        if box.handle.failure == FailureReason.AGENT_UNRESPONSIVE.value:
            reason = FailureReason.AGENT_UNRESPONSIVE
        else:
            reason = FailureReason.AGENT_EXITED
            with contextlib.suppress(RockError):  # the runtime may know better (OOM)
                info = await box.runtime.inspect(record.id)
                if info.reason is not None:
                    reason = info.reason
        if not w._still_running(box):  # removed or marked while we asked the runtime
            return
        record.reason = reason
        step(record, SandboxState.FAILED, w._clock(), reason.value)
        w._metrics.error("rocklet", reason.value)
        w._publish()
        log.warning(
            "worker %s: sandbox %s failed (%s)",
            w.name,
            record.id,
            reason.value,
            extra={"sandbox_id": record.id, "owner": record.owner, "reason": reason.value},
        )

    def _still_running(self, box: Box) -> bool:
        w = cast("Worker", self)
        return w._table.still_running(box)
