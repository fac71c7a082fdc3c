"""The Worker: owns one node's sandboxes through a Runtime and one RockletHandle each.

A plain async class; ``_ray.py`` runs it as a detached, node-pinned Ray actor named
``rock-worker-<short>``. Models cross Ray as pydantic objects. Errors are typed
:class:`~rock_serve.errors.RockError` subclasses; callers unwrap them with ``_ray.call``.

Every sandbox it makes carries the label ``rock.worker=<short>`` and, in ``rock.record``, the
JSON of its record. A restarted Worker (after ``kill -9`` or a node restart) lists its runtime
by that label: sandboxes still running whose runtime can reattach (``Runtime.attach``, e.g.
docker) are adopted with a fresh lease; the rest (bwrap and local sandboxes die with their
Worker) are removed. Nothing leaks either way.

Lifetime: every sandbox has a hard deadline (TTL) and usually a lease, renewed by every call
that names it and by :meth:`renew` (the SDK's heartbeat). A reaper task removes sandboxes past
either, and remembers why for a while, so a late call says "reaped: lease_expired" rather than
a bare "not found".

A redeploy with new args reaches :meth:`reconfigure`: limits apply at once; a changed runtime
is used for new sandboxes while existing ones keep the runtime that made them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from rock_serve.config import RuntimeConfig, ServerArgs
from rock_serve.deployments._dataplane import DataPlaneWorker
from rock_serve.deployments._fork import ForkWorker
from rock_serve.deployments._images import ImagesWorker
from rock_serve.deployments._llm import LLMWorker
from rock_serve.deployments._metrics import metrics
from rock_serve.deployments._node import NodeCapacity, check_resources, effective_resources
from rock_serve.deployments._ops import OpsWorker
from rock_serve.deployments._ports import PortsWorker
from rock_serve.deployments._processes import ProcessesWorker
from rock_serve.deployments._snapshot import SnapshotWorker
from rock_serve.deployments._trace import SPANS, TracedActor, logged_stream, untraced_task
from rock_serve.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    RateLimited,
    RockError,
    SandboxFailed,
    SandboxNotFound,
    SandboxNotRunning,
    TooLarge,
)
from rock_serve.lifetime import Lifetime
from rock_serve.protocol import (
    CreateSandboxRequest,
    ExecRequest,
    FailureReason,
    SandboxInfo,
    SandboxRecord,
    SandboxSpec,
    SandboxState,
    SessionRunRequest,
    StateChange,
    WorkerStatus,
)
from rock_serve.protocol.api import LIFECYCLE_FIELDS
from rock_serve.protocol.snapshot import SnapshotRecord
from rock_serve.rocklet.handle import PtyProcess, RockletHandle
from rock_serve.runtime.base import Runtime

__all__ = ["LABEL_RECORD", "LABEL_WORKER", "Worker"]

T = TypeVar("T")
Req = TypeVar("Req", ExecRequest, SessionRunRequest)

log = logging.getLogger(__name__)

#: Label on every sandbox a Worker makes: the Worker's short name.
LABEL_WORKER = "rock.worker"
#: Label holding the sandbox's record as JSON, so a restarted Worker can adopt it.
LABEL_RECORD = "rock.record"
#: Label of sandboxes made for the warm pool (a restarted Worker removes them).
LABEL_WARM = "rock.warm"


def _pool_key(spec: SandboxSpec) -> str:
    """Which warm pool can serve ``spec`` (equal keys: interchangeable sandboxes)."""
    return json.dumps(spec.model_dump(mode="json", exclude={"labels", "owner"}), sort_keys=True)


#: How many removed sandboxes a Worker remembers (and why) for late callers.
_GRAVEYARD = 4096
#: Idempotency keys of commands a Worker remembers, and for how long (seconds).
_KEYS = 10_000
_KEY_SECONDS = 600.0
#: Chunks an upload may queue ahead of the rocklet (backpressure on the sender).
_UPLOAD_QUEUE = 4


@dataclass
class _Box:
    record: SandboxRecord
    handle: RockletHandle
    runtime: Runtime
    watcher: asyncio.Task[None] | None = None
    pool: str = ""  # the warm pool's key, while it waits in one


@dataclass
class _Upload:
    """A file or tar body arriving in chunks (``upload_open`` .. ``upload_close``)."""

    sandbox_id: str
    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(_UPLOAD_QUEUE))
    size: int = 0
    task: asyncio.Task[int] | None = None
    last: float = 0.0


async def _size_of(done: Awaitable[None]) -> int:
    await done
    return 0


async def _drain_queue(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    while (chunk := await queue.get()) is not None:
        yield chunk


def _step(record: SandboxRecord, state: SandboxState, at: float, reason: str | None = None) -> None:
    record.state = state
    record.history.append(StateChange(state=state, at=at, reason=reason))


class Worker(
    OpsWorker,
    ProcessesWorker,
    ImagesWorker,
    DataPlaneWorker,
    PortsWorker,
    ForkWorker,
    LLMWorker,
    SnapshotWorker,
    TracedActor,
):
    """One node's sandboxes: create/remove, TTL reaping and the data plane."""

    def __init__(
        self,
        args: ServerArgs,
        name: str,
        node_id: str,
        clock: Callable[[], float] = time.time,
        runtime: Runtime | None = None,
    ) -> None:
        self.args = args
        self.name = name
        self.node_id = node_id
        self._clock = clock
        if args.tracing.otlp_endpoint:  # spans of its calls and rocklet ops, under the Admin's
            SPANS.configure(args.tracing.otlp_endpoint, args.tracing.service_name)
        self._boxes: dict[str, _Box] = {}
        self._creating: set[str] = set()
        self._runtime: Runtime | None = runtime
        self._old_runtimes: list[Runtime] = []
        self._broken: RockError | None = None
        self._startup: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._ptys: dict[str, PtyProcess] = {}
        self._uploads: dict[str, _Upload] = {}
        self._graveyard: OrderedDict[str, StateChange] = OrderedDict()
        self._done_keys: OrderedDict[str, tuple[float, asyncio.Future[Any]]] = OrderedDict()
        self._warm: list[_Box] = []
        self._warm_wanted = asyncio.Event()
        self._warmer: asyncio.Task[None] | None = None
        self._metrics = metrics("worker", name, args.runtime.type)
        self._node = NodeCapacity.measure(args.runtime)
        if runtime is None:
            self._build_runtime(args.runtime)

    def _build_runtime(self, config: RuntimeConfig) -> None:
        try:
            self._runtime = config.build()
            self._broken = None
        except RockError as exc:
            log.error("worker %s: runtime unusable: %s", self.name, exc)
            self._broken = exc

    # ------------------------------------------------------------------ life cycle

    async def ready(self) -> None:
        """Finish start-up (idempotent): remove leftovers, start the reaper."""
        await self._ready()

    async def _ready(self) -> Runtime:
        if self._broken is not None:
            raise self._broken
        assert self._runtime is not None
        if self._startup is None:
            self._startup = untraced_task(self._start(self._runtime))
        await asyncio.shield(self._startup)
        return self._runtime

    async def _start(self, runtime: Runtime) -> None:
        for info in await runtime.list(labels={LABEL_WORKER: self.name}):
            if info.id in self._boxes:
                continue
            if await self._adopt(runtime, info):
                continue
            log.warning("worker %s: removing leftover sandbox %s", self.name, info.id)
            self._metrics.reaped("leftover")
            with contextlib.suppress(Exception):
                await runtime.remove(info.id)
        await self._start_dataplane_at_start()
        self._reaper = untraced_task(self._reap_loop())
        self._warmer = untraced_task(self._warm_loop())
        self._warm_wanted.set()

    # ------------------------------------------------------------------ warm pool

    def _warm_target(self) -> int:
        return sum(target for _, _, target in self._pool_targets())

    def _pool_targets(self) -> list[tuple[str, SandboxSpec, int]]:
        """(key, spec, target) of each warm pool: the default one, then ``warm_pools``."""
        if self._runtime is None or self._runtime.name in ("docker", "gvisor"):
            return []
        room = self.args.max_sandboxes_per_node - len(self._boxes) - len(self._creating)
        out = []
        pools = [(SandboxSpec(), self.args.warm_pool_size)] + [
            (SandboxSpec(image=p.image, resources=p.resources), p.size)
            for p in self.args.warm_pools
        ]
        for spec, size in pools:
            target = max(0, min(size, room))
            room -= target
            out.append((_pool_key(spec), spec, target))
        return out

    async def _warm_loop(self) -> None:
        """Keep each pool at its target: one sandbox at a time, so it never crowds creates."""
        while True:
            await self._warm_wanted.wait()
            self._warm_wanted.clear()
            targets = self._pool_targets()
            for key, spec, target in targets:
                while sum(b.pool == key for b in self._warm) < target and self._broken is None:
                    try:
                        self._warm.append(await self._make_warm(spec, key))
                    except Exception as exc:
                        log.warning("worker %s: warm pool refill failed: %r", self.name, exc)
                        break
            wanted = {key: target for key, _, target in targets}
            for box in list(reversed(self._warm)):
                if sum(b.pool == box.pool for b in self._warm) > wanted.get(box.pool, 0):
                    self._warm.remove(box)
                    await self._discard(box)
            self._publish()

    async def _make_warm(self, pool: SandboxSpec | None = None, key: str = "") -> _Box:
        runtime = self._runtime
        assert runtime is not None
        sandbox_id = f"sb-{self.name}-{secrets.token_hex(8)}"
        now = self._clock()
        record = SandboxRecord(
            id=sandbox_id,
            state=SandboxState.RUNNING,
            worker=self.name,
            node_id=self.node_id,
            created_at=now,
        )
        spec = (pool or SandboxSpec()).model_copy(
            update={"labels": {LABEL_WORKER: self.name, LABEL_WARM: "1"}}
        )
        record.image, record.resources = spec.image, spec.resources
        try:
            await runtime.create(sandbox_id, spec)
            handle = await runtime.start(sandbox_id)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(runtime.remove(sandbox_id))
            raise
        return _Box(record, handle, runtime, pool=key or _pool_key(spec))

    async def _discard(self, box: _Box) -> None:
        with contextlib.suppress(Exception):
            await box.handle.close()
        with contextlib.suppress(Exception):
            await box.runtime.remove(box.record.id)

    def _take_warm(self, spec: SandboxSpec) -> _Box | None:
        """A started sandbox from the pool whose spec is the create's, if any."""
        if not self._warm:
            return None
        key = _pool_key(spec)
        while True:
            box = next((b for b in self._warm if b.pool == key), None)
            if box is None:
                break
            self._warm.remove(box)
            if box.handle.alive and box.runtime is self._runtime:
                self._warm_wanted.set()
                box.pool = ""
                return box
            untraced_task(self._discard(box))
        self._warm_wanted.set()
        return None

    async def _adopt(self, runtime: Runtime, info: SandboxInfo) -> bool:
        """Take back a sandbox an earlier incarnation left running; False if it cannot be."""
        raw = info.labels.get(LABEL_RECORD)
        # A container outlives its Worker but its rocklet does not (EOF on its stdin): such a
        # sandbox shows failed/agent_exited and can be reattached with a fresh rocklet.
        alive = info.state == SandboxState.RUNNING or (
            info.state == SandboxState.FAILED and info.reason == FailureReason.AGENT_EXITED
        )
        if not alive or raw is None or LABEL_WARM in info.labels:
            return False
        try:
            record = SandboxRecord.model_validate_json(raw)
        except ValueError:
            return False
        now = self._clock()
        if not Lifetime.adoptable(record, now):
            return False
        try:
            handle = await runtime.attach(info.id)
        except RockError as exc:
            log.info("worker %s: cannot adopt %s: %s", self.name, info.id, exc)
            return False
        record.worker, record.node_id = self.name, self.node_id
        _step(record, SandboxState.RUNNING, now, "adopted")
        self._boxes[info.id] = _Box(record, handle, runtime)
        self._watch(self._boxes[info.id])
        self._touch(self._boxes[info.id], now)
        self._metrics.reaped("adopted", 0)
        log.warning("worker %s: adopted sandbox %s owner=%r", self.name, info.id, record.owner)
        self._publish()
        return True

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.args.reap_interval_seconds)
            try:
                await self.reap()
            except Exception:  # pragma: no cover - keep reaping whatever happens
                log.exception("worker %s: reaping failed", self.name)

    async def reap(self) -> list[str]:
        """Remove every sandbox past its TTL or its lease; returns their ids."""
        now = self._clock()
        await self._reap_uploads(now)
        expired: list[tuple[str, str]] = []
        for sid, box in self._boxes.items():
            why = Lifetime.reap_reason(box.record, now)
            if why is not None:
                expired.append((sid, why))
        for i, (sid, reason) in enumerate(expired):
            if reason == "lease_expired" and await self._archive(sid):  # issue 16
                expired[i] = (sid, reason := "archived")
            log.info(
                "worker %s: reaping sandbox %s (%s)",
                self.name,
                sid,
                reason,
                extra={"sandbox_id": sid, "reason": reason},
            )
            with contextlib.suppress(SandboxNotFound):
                await self.remove(sid, reason=reason)
            self._metrics.reaped(reason)
        return [sid for sid, _ in expired]

    async def reap_ids(self, ids: list[str], reason: str) -> list[str]:
        """Remove the given sandboxes (e.g. their Ray job died); returns those removed."""
        removed = []
        for sid in ids:
            if sid in self._boxes:
                with contextlib.suppress(SandboxNotFound):
                    await self.remove(sid, reason=reason)
                    removed.append(sid)
        self._metrics.reaped(reason, len(removed))
        return removed

    async def reconfigure(self, args: ServerArgs) -> None:
        """Take a redeploy's args: limits at once; a changed runtime for new sandboxes."""
        old = self.args
        self.args = args
        SPANS.configure(args.tracing.otlp_endpoint, args.tracing.service_name)
        self._node = NodeCapacity.measure(args.runtime)
        self._warm_wanted.set()
        if args.runtime != old.runtime:
            log.warning(
                "worker %s: runtime changed from %s to %s; existing sandboxes keep theirs",
                self.name,
                old.runtime.type,
                args.runtime.type,
            )
            if self._runtime is not None:
                self._old_runtimes.append(self._runtime)
            previous = self._runtime
            self._build_runtime(args.runtime)
            while self._warm:
                await self._discard(self._warm.pop())
            if self._broken is None and self._runtime is not None and previous is not None:
                # Leftovers of the new runtime from an earlier life of this Worker.
                for info in await self._runtime.list(labels={LABEL_WORKER: self.name}):
                    if info.id not in self._boxes and not await self._adopt(self._runtime, info):
                        with contextlib.suppress(Exception):
                            await self._runtime.remove(info.id)

    async def shutdown(self) -> int:
        """Remove every sandbox (and the warm pool), stop reaping and close the runtimes (which
        releases what they hold on the host, e.g. bwrap's user-namespace mounts); returns how
        many sandboxes were removed.
        """
        for task in (self._reaper, self._warmer):
            if task is not None:
                task.cancel()
        await self._stop_dataplane()
        while self._warm:
            await self._discard(self._warm.pop())
        ids = list(self._boxes)
        for sid in ids:
            with contextlib.suppress(SandboxNotFound):
                await self.remove(sid, reason="shutdown")
        await self._llm_shutdown()  # model service (issue 15.3)
        for runtime in {id(r): r for r in [*self._old_runtimes, self._runtime] if r}.values():
            with contextlib.suppress(Exception):
                await runtime.close()
        return len(ids)

    # ------------------------------------------------------------------ control plane

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
        runtime = await self._ready()
        if len(self._boxes) + len(self._creating) >= self.args.max_sandboxes_per_node:
            raise RateLimited(
                f"worker {self.name} is full", retry_after=self.args.create_retry_after_seconds
            )
        if sandbox_id in self._boxes or sandbox_id in self._creating:
            raise Conflict(f"sandbox {sandbox_id!r} exists already")
        spec = SandboxSpec.model_validate(req.model_dump(exclude=set(LIFECYCLE_FIELDS)))
        spec.registry_auth = req.registry_auth  # excluded from dumps: never stored
        resources = effective_resources(req.resources, self.args.runtime)
        check_resources(resources, self._node, self.args)
        await self._llm_prepare(sandbox_id, req, spec)  # OPENAI_* env, reverse ports (15.3)
        now = self._clock()
        lease = Lifetime.of(self.args).lease(req.lease_seconds)
        record = SandboxRecord(
            id=sandbox_id,
            state=SandboxState.PENDING,
            owner=req.owner,
            labels=dict(req.labels),
            image=req.image,
            resources=resources,
            network=req.network,
            egress=req.egress,
            worker=self.name,
            node_id=self.node_id,
            created_at=now,
            expires_at=Lifetime.expires_at(now, ttl),
            namespace=namespace,
            ray_job_id=req.ray_job_id,
            trajectory_id=req.trajectory_id,
            endpoint=self.dataplane_address(),
            lease_seconds=lease,
            archive_on_expiry=req.archive_on_expiry,
            history=[StateChange(state=SandboxState.PENDING, at=now)],
        )
        spec.labels = {
            **spec.labels,
            LABEL_WORKER: self.name,
            LABEL_RECORD: record.model_dump_json(exclude={"history"}),
        }
        warm = self._take_warm(spec) if snapshot is None else None
        if warm is not None:
            record.id = warm.record.id  # the pool's sandbox keeps its id
            self._llm_rekey(sandbox_id, record.id)
            try:
                await self._llm_attach(record.id, warm.handle)
            except BaseException:
                await self._llm_close(record.id)
                await self._discard(warm)
                raise
            _step(record, SandboxState.STARTING, now, "warm_pool")
            _step(record, SandboxState.RUNNING, now, "warm_pool")
            box = _Box(record, warm.handle, warm.runtime)
            self._touch(box, now)
            self._boxes[record.id] = box
            self._watch(box)
            self._metrics.created(0.0, ok=True, namespace=namespace)
            self._publish()
            log.info(
                "worker %s: created sandbox %s from the warm pool owner=%r",
                self.name,
                record.id,
                req.owner,
                extra={"sandbox_id": record.id, "owner": req.owner, "namespace": namespace},
            )
            return record
        self._creating.add(sandbox_id)
        started = time.perf_counter()
        try:
            _step(record, SandboxState.STARTING, self._clock())
            if snapshot is None:
                await runtime.create(sandbox_id, spec)
            else:
                await self._restore_snapshot(runtime, sandbox_id, spec, snapshot)
            handle = await runtime.start(sandbox_id)
            try:
                await self._llm_attach(sandbox_id, handle)
            except BaseException:
                await handle.close()
                raise
            _step(record, SandboxState.RUNNING, self._clock())
            box = _Box(record, handle, runtime)
            self._touch(box, self._clock())
            self._boxes[sandbox_id] = box
            self._watch(box)
            self._warm_wanted.set()  # less room: the pool may have to shrink
            self._metrics.created(time.perf_counter() - started, ok=True, namespace=namespace)
            self._publish()
            log.info(
                "worker %s: created sandbox %s owner=%r in %.1f ms",
                self.name,
                sandbox_id,
                req.owner,
                (time.perf_counter() - started) * 1000,
                extra={"sandbox_id": sandbox_id, "owner": req.owner, "namespace": namespace},
            )
            return record
        except Conflict:
            await self._llm_close(sandbox_id)
            raise  # the id belongs to someone else: leave it alone
        except BaseException as exc:
            self._metrics.created(time.perf_counter() - started, ok=False, namespace=namespace)
            code = exc.code.value if isinstance(exc, RockError) else "internal"
            self._metrics.error("create", code)
            # Removal is idempotent, so this also cleans up a half-made sandbox.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._llm_close(sandbox_id))
            with contextlib.suppress(Exception):
                await asyncio.shield(runtime.remove(sandbox_id))
            raise
        finally:
            self._creating.discard(sandbox_id)

    async def remove(self, sandbox_id: str, reason: str = "deleted") -> None:
        """Stop and remove a sandbox.

        Raises:
            SandboxNotFound: this Worker has no such sandbox.
        """
        box = self._boxes.pop(sandbox_id, None)
        if box is None:
            raise self._not_found(sandbox_id)
        self._graveyard[sandbox_id] = StateChange(
            state=SandboxState.REMOVED, at=self._clock(), reason=reason
        )
        while len(self._graveyard) > _GRAVEYARD:
            self._graveyard.popitem(last=False)
        if box.watcher is not None:
            box.watcher.cancel()
        if box.record.state == SandboxState.PAUSED:  # a frozen rocklet cannot exit
            with contextlib.suppress(Exception):
                await box.runtime.resume(sandbox_id)
        with contextlib.suppress(Exception):
            await self._llm_close(sandbox_id)  # its tunnels and pending model calls
        with contextlib.suppress(Exception):
            await box.handle.close()
        try:
            await box.runtime.remove(sandbox_id)
        finally:
            self._warm_wanted.set()
            self._publish()
            log.info(
                "worker %s: removed sandbox %s (%s)",
                self.name,
                sandbox_id,
                reason,
                extra={"sandbox_id": sandbox_id, "owner": box.record.owner, "reason": reason},
            )

    # ------------------------------------------------------------------ liveness

    def _watch(self, box: _Box) -> None:
        """Ping the box's rocklet when it is silent, and mark the sandbox failed (with the
        reason) as soon as its rocklet exits or stops answering: never 'running' with a dead
        agent.
        """
        interval = self.args.rocklet_ping_interval_seconds
        if interval is not None:
            box.handle.watch(interval, self.args.rocklet_ping_timeout_seconds)
        box.watcher = untraced_task(self._await_failure(box))  # outlives the traced create

    async def _await_failure(self, box: _Box) -> None:
        await box.handle.wait_closed()
        if self._boxes.get(box.record.id) is not box or box.handle.failure is None:
            return  # removed (its handle closed by us)
        await self._mark_failed(box)

    async def _mark_failed(self, box: _Box) -> None:
        record = box.record
        if not self._still_running(box):
            return
        if box.handle.failure == FailureReason.AGENT_UNRESPONSIVE.value:
            reason = FailureReason.AGENT_UNRESPONSIVE
        else:
            reason = FailureReason.AGENT_EXITED
            with contextlib.suppress(RockError):  # the runtime may know better (OOM)
                info = await box.runtime.inspect(record.id)
                if info.reason is not None:
                    reason = info.reason
        if not self._still_running(box):  # removed or marked while we asked the runtime
            return
        record.reason = reason
        _step(record, SandboxState.FAILED, self._clock(), reason.value)
        self._metrics.error("rocklet", reason.value)
        self._publish()
        log.warning(
            "worker %s: sandbox %s failed (%s)",
            self.name,
            record.id,
            reason.value,
            extra={"sandbox_id": record.id, "owner": record.owner, "reason": reason.value},
        )

    def _still_running(self, box: _Box) -> bool:
        return self._boxes.get(box.record.id) is box and box.record.state == SandboxState.RUNNING

    def _not_found(self, sandbox_id: str) -> SandboxNotFound:
        gone = self._graveyard.get(sandbox_id)
        if gone is None:
            return SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return SandboxNotFound(
            f"sandbox {sandbox_id!r} was removed ({gone.reason})",
            reason=gone.reason,
            removed_at=gone.at,
        )

    def _touch(self, box: _Box, now: float) -> None:
        deadline = Lifetime.lease_deadline(box.record.lease_seconds, now)
        if deadline is not None:
            box.record.lease_expires_at = deadline

    async def renew(self, sandbox_id: str) -> SandboxRecord:
        """Renew a sandbox's lease (any call naming it does too); returns its record."""
        return self._box(sandbox_id).record

    def _publish(self) -> None:
        counts: dict[str, int] = {}
        by_namespace: dict[str, int] = {}
        for box in self._boxes.values():
            counts[box.record.state.value] = counts.get(box.record.state.value, 0) + 1
            by_namespace[box.record.namespace] = by_namespace.get(box.record.namespace, 0) + 1
        self._metrics.sandboxes(counts, by_namespace)
        self._publish_images()

    async def get(self, sandbox_id: str) -> SandboxRecord:
        """One sandbox's record; a sandbox whose rocklet is gone shows the runtime's state."""
        box = self._boxes.get(sandbox_id)
        if box is None:
            raise self._not_found(sandbox_id)
        self._touch(box, self._clock())
        if not box.handle.alive:
            await self._mark_failed(box)  # before its watcher does, if need be
        return box.record

    async def list(self) -> list[SandboxRecord]:
        """Every sandbox this Worker owns (a restarted Worker adopts its leftovers first)."""
        if self._broken is None:
            await self._ready()
        return [box.record for box in self._boxes.values()]

    async def pid(self) -> int:
        """The Worker's process id (for operators and chaos tests)."""
        return os.getpid()

    async def status(self) -> WorkerStatus:
        """Load, capacity and runtime."""
        processes = await self.processes_running()
        self._metrics.processes(processes)
        return WorkerStatus(
            name=self.name,
            node_id=self.node_id,
            alive=self._broken is None,
            sandboxes=len(self._boxes) + len(self._creating),
            capacity=self.args.max_sandboxes_per_node,
            runtime=self.args.runtime.type,
            warm=len(self._warm),
            reaped=dict(self._metrics.reaped_counts),
            processes_running=processes,
        )

    # ------------------------------------------------------------------ data plane

    def _box(self, sandbox_id: str) -> _Box:
        """The sandbox named by a call; the call renews its lease.

        Raises:
            SandboxNotFound: no such sandbox (or it was removed: the reason is in the details).
            SandboxFailed: its rocklet exited or stopped answering (``details['reason']``).
        """
        box = self._boxes.get(sandbox_id)
        if box is None:
            raise self._not_found(sandbox_id)
        self._touch(box, self._clock())
        if box.record.state == SandboxState.FAILED:
            reason = box.record.reason.value if box.record.reason else "failed"
            raise SandboxFailed(f"sandbox {sandbox_id!r} failed ({reason})", reason=reason)
        if box.record.state == SandboxState.PAUSED:
            raise SandboxNotRunning(f"sandbox {sandbox_id!r} is paused: resume it first")
        return box

    async def _once(self, sandbox_id: str, key: str | None, work: Awaitable[T]) -> T:
        """Do ``work`` once per idempotency key: a resend awaits (or gets) the first result."""
        if key is None:
            return await work
        slot = f"{sandbox_id}/{key}"
        known = self._done_keys.get(slot)
        if known is not None:
            if asyncio.iscoroutine(work):
                work.close()
            return cast("T", await asyncio.shield(known[1]))
        future: asyncio.Future[T] = asyncio.ensure_future(work)
        self._done_keys[slot] = (self._clock(), future)
        horizon = self._clock() - _KEY_SECONDS
        while self._done_keys:  # forget the oldest finished keys past the bounds
            oldest_at, oldest = next(iter(self._done_keys.values()))
            if not oldest.done() or (len(self._done_keys) <= _KEYS and oldest_at >= horizon):
                break
            self._done_keys.popitem(last=False)
        return await asyncio.shield(future)

    def _capped(self, req: Req) -> Req:
        """The request with its output cap held to ``max_output_bytes``.

        The result's ``truncated`` says when output was cut there.
        """
        if req.max_output_bytes <= self.args.max_output_bytes:
            return req
        return req.model_copy(update={"max_output_bytes": self.args.max_output_bytes})

    def _read_limit(self) -> int:
        return min(self.args.max_file_bytes, self.args.max_read_bytes)

    def _check_size(self, size: int, what: str) -> None:
        if size > self.args.max_file_bytes:
            raise TooLarge(
                f"{what}: {size} bytes is over the {self.args.max_file_bytes}-byte limit"
            )

    async def upload_open(
        self, sandbox_id: str, kind: str, path: str, mode: int | None = None
    ) -> str:
        """Start a chunked upload of a file (``kind="file"``) or a tar (``"archive"``).

        Send the body with :meth:`upload_chunk` and finish with :meth:`upload_close`. An
        upload idle for longer than ``upload_idle_seconds`` is aborted by the reaper.
        """
        handle = self._box(sandbox_id).handle
        upload = _Upload(sandbox_id, last=self._clock())
        body = _drain_queue(upload.queue)
        if kind == "file":
            upload.task = asyncio.ensure_future(handle.write_file(path, body, mode=mode))
        elif kind == "archive":
            upload.task = asyncio.ensure_future(_size_of(handle.upload_tar(path, body)))
        else:
            raise InvalidRequest(f"unknown upload kind {kind!r}")
        upload_id = uuid.uuid4().hex
        self._uploads[upload_id] = upload
        return upload_id

    def _upload(self, upload_id: str) -> _Upload:
        upload = self._uploads.get(upload_id)
        if upload is None:
            raise NotFound(f"no upload {upload_id!r} (finished, aborted or timed out)")
        upload.last = self._clock()
        return upload

    async def upload_chunk(self, upload_id: str, data: bytes) -> None:
        """Queue one chunk; waits while the rocklet is behind (backpressure)."""
        upload = self._upload(upload_id)
        assert upload.task is not None
        upload.size += len(data)
        if upload.size > self.args.max_file_bytes:
            await self._abort_upload(upload_id)
            raise TooLarge(f"body is over the {self.args.max_file_bytes}-byte limit")
        self._box(upload.sandbox_id)  # renews the lease (and fails if the sandbox is gone)
        put = asyncio.ensure_future(upload.queue.put(data))
        await asyncio.wait({put, upload.task}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():  # the write failed while we waited: report its error
            put.cancel()
            self._uploads.pop(upload_id, None)
            upload.task.result()
            raise InvalidRequest("the upload ended early")

    async def upload_close(self, upload_id: str) -> int:
        """Finish an upload; returns the bytes written (file) or received (archive)."""
        upload = self._upload(upload_id)
        assert upload.task is not None
        try:
            put = asyncio.ensure_future(upload.queue.put(None))
            await asyncio.wait({put, upload.task}, return_when=asyncio.FIRST_COMPLETED)
            written = await upload.task
        finally:
            self._uploads.pop(upload_id, None)
        return written if written else upload.size

    async def upload_abort(self, upload_id: str) -> None:
        """Abandon an upload (the client went away); nothing partial is kept for files."""
        await self._abort_upload(upload_id)

    async def _abort_upload(self, upload_id: str) -> None:
        upload = self._uploads.pop(upload_id, None)
        if upload is not None and upload.task is not None:
            upload.task.cancel()
            await asyncio.gather(upload.task, return_exceptions=True)

    async def _reap_uploads(self, now: float) -> None:
        idle = [
            uid
            for uid, up in self._uploads.items()
            if now - up.last > self.args.upload_idle_seconds
        ]
        for uid in idle:
            log.warning("worker %s: aborting idle upload %s", self.name, uid)
            await self._abort_upload(uid)

    # ------------------------------------------------------------------ pty

    async def stream_pty(
        self, sandbox_id: str, pty_id: str, cols: int = 80, rows: int = 24
    ) -> AsyncIterator[bytes | int]:
        """Run an interactive bash on a pty in the sandbox.

        Yields ``b""`` once the pty is registered under ``pty_id`` (from then on
        :meth:`pty_input` and :meth:`pty_resize` reach it), then output bytes, and last the exit
        code (an ``int``). Stopping the iteration kills the process tree.
        """
        handle = self._box(sandbox_id).handle
        if pty_id in self._ptys:
            raise Conflict(f"pty {pty_id!r} exists already")
        async with handle.pty(cols=cols, rows=rows) as p:
            self._ptys[pty_id] = p
            try:
                yield b""
                async for data in logged_stream("pty", sandbox_id, aiter(p), log):
                    yield data
                assert p.exit_code is not None
                yield p.exit_code
            finally:
                self._ptys.pop(pty_id, None)

    def _pty(self, pty_id: str) -> PtyProcess:
        p = self._ptys.get(pty_id)
        if p is None:
            raise NotFound(f"no pty {pty_id!r} (it has ended)")
        return p

    async def pty_input(self, pty_id: str, data: bytes) -> None:
        """Write keystrokes to the pty opened by :meth:`stream_pty`."""
        await self._pty(pty_id).send(data)

    async def pty_resize(self, pty_id: str, cols: int, rows: int) -> None:
        """Resize the pty opened by :meth:`stream_pty`."""
        await self._pty(pty_id).resize(cols, rows)

    async def pty_close(self, pty_id: str) -> None:
        """Kill the pty's process tree (a no-op once it has ended)."""
        p = self._ptys.get(pty_id)
        if p is not None:
            await p.kill()

    # ------------------------------------------------------------------ Ray transport

    def _ray_gate(self) -> Any:
        """The Worker's :class:`~rock_serve.deployments._raygate.RayGate` (made on first use)."""
        from rock_serve.deployments._raygate import RayGate

        gate = cast("RayGate | None", getattr(self, "_gate", None))
        if gate is None:
            gate = self._gate = RayGate(self.args)
        return gate.use(self.args)

    async def ray_call(self, token: str | None, method: str, sandbox_id: str, *args: Any) -> Any:
        """A data-plane call of ``AsyncClient.from_ray``: the caller's platform token is checked
        (namespace scoping as over HTTP) and the call audited (see ``_raygate``).
        """
        return await self._ray_gate().data(self, token, method, sandbox_id, args)

    async def ray_stream(
        self, token: str | None, method: str, sandbox_id: str, *args: Any
    ) -> AsyncIterator[Any]:
        """A streaming data-plane call of ``AsyncClient.from_ray`` (see :meth:`ray_call`)."""
        async for item in self._ray_gate().data_stream(self, token, method, sandbox_id, args):
            yield item
