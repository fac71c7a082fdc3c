"""Fork, pause and resume (issue 16): the Worker's and the Scheduler's side.

- :class:`ForkWorker` (mixed into the Worker): ``fork`` asks the parent's rocklet for the cwd
  and exported env of its ``default`` session, has the runtime make the children at one atomic
  fork point (``Runtime.fork``: bwrap freezes the parent and copies its layer once), starts
  them concurrently and registers them like created sandboxes. All or nothing: a failure
  removes every child made so far. ``pause``/``resume`` freeze and thaw a sandbox; a paused
  sandbox's rocklet is not pinged (it cannot answer) and data-plane calls get
  ``sandbox_not_running`` until it is resumed.
- :class:`ForkScheduler` (mixed into the Scheduler): checks the namespace (another
  namespace's sandbox is a 404) and the quota for all ``count`` children at once (429, typed
  ``rate_limited`` with ``quota``), then asks the parent's Worker and registers the children.

Bytes never pass through the Admin or the Scheduler: the copy happens on the parent's node.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, cast

from rock_serve.deployments._worker_table import LABEL_RECORD, LABEL_WORKER
from rock_serve.deployments._worker_table import Box as _Box
from rock_serve.deployments._worker_table import step as _step
from rock_serve.errors import (
    RateLimited,
    RockError,
    SandboxNotFound,
    SandboxNotRunning,
)
from rock_serve.lifetime import Lifetime
from rock_serve.protocol import (
    SandboxRecord,
    SandboxSpec,
    SandboxState,
    SessionRunRequest,
    StateChange,
)
from rock_serve.protocol.fork import ForkRequest, ForkResult

if TYPE_CHECKING:
    from rock_serve.deployments.scheduler import Scheduler
    from rock_serve.deployments.worker import Worker

__all__ = ["ForkScheduler", "ForkWorker", "SESSION_PROBE", "parse_session_probe"]

log = logging.getLogger(__name__)

#: Run in the parent's default session: its cwd, then its exported env (NUL-separated, base64).
SESSION_PROBE = "pwd; env -0 | base64 -w0; echo"
#: Variables of a session that describe that shell, not what it exported.
_SHELL_OWN = frozenset({"PWD", "OLDPWD", "SHLVL", "_", "HOSTNAME"})


def parse_session_probe(output: str) -> tuple[str, dict[str, str]] | None:
    """(cwd, exported env) from :data:`SESSION_PROBE`'s output; None if it is not that."""
    lines = output.strip("\n").split("\n")
    if len(lines) < 2 or not lines[0].startswith("/"):
        return None
    try:
        raw = base64.b64decode(lines[-1], validate=True)
    except ValueError:
        return None
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if not sep or not key:
            continue
        name = key.decode(errors="replace")
        if name not in _SHELL_OWN:
            env[name] = value.decode(errors="replace")
    return lines[0], env


class ForkWorker:
    """The Worker's fork, pause and resume (see the module docstring)."""

    async def _session_state(self, box: _Box) -> tuple[str, dict[str, str]] | None:
        """The parent's default session's cwd and exported env, or None (no such session,
        or it is busy with a command: then the children start as the parent did).
        """
        req = SessionRunRequest(session="default", command=SESSION_PROBE, timeout=10)
        try:
            result = await box.handle.run_in_session(req)
        except RockError as exc:
            log.info("fork of %s: no default session state (%s)", box.record.id, exc.code.value)
            return None
        if result.exit_code != 0:
            return None
        return parse_session_probe(result.output)

    async def fork(
        self,
        parent_id: str,
        child_ids: list[str],
        req: ForkRequest,
        ttl: float,
        namespace: str = "default",
    ) -> list[SandboxRecord]:
        """Make, start and register ``child_ids`` as children of the running ``parent_id``.

        Raises:
            SandboxNotFound: no such parent.
            SandboxNotRunning: the parent is not running (or is paused).
            RateLimited: the node has no room for ``len(child_ids)`` more sandboxes.
            NotSupported: the parent's runtime cannot fork.
        """
        w = cast("Worker", self)
        await w._ready()
        box = w._box(parent_id)
        if box.record.state != SandboxState.RUNNING:
            raise SandboxNotRunning(f"sandbox {parent_id!r} is {box.record.state.value}")
        if len(w._boxes) + len(w._creating) + len(child_ids) > w.args.max_sandboxes_per_node:
            raise RateLimited(
                f"worker {w.name} has no room for {len(child_ids)} more sandboxes",
                retry_after=w.args.create_retry_after_seconds,
            )
        parent = box.record
        session = await self._session_state(box) if req.session else None
        now = w._clock()
        lease = Lifetime.fork_lease(req.lease_seconds, parent.lease_seconds)
        records: dict[str, SandboxRecord] = {}
        for child_id in child_ids:
            record = parent.model_copy(deep=True)
            record.id = child_id
            record.state = SandboxState.PENDING
            record.reason = None
            record.owner = req.owner if req.owner is not None else parent.owner
            record.labels = dict(req.labels) if req.labels is not None else dict(parent.labels)
            record.created_at = now
            record.expires_at = Lifetime.expires_at(now, ttl)
            record.namespace = namespace
            record.lease_seconds = lease
            record.lease_expires_at = None
            record.history = [StateChange(state=SandboxState.PENDING, at=now, reason="fork")]
            records[child_id] = record

        # A parent with a model service: each child gets its own (key, trajectory, tunnel).
        services = {c: w._llm_fork(parent_id, c) for c in child_ids}

        def make_spec(child_id: str, spec: SandboxSpec) -> SandboxSpec:
            record = records[child_id]
            env = dict(spec.env)
            workdir = spec.workdir
            if session is not None:
                workdir, exported = session
                env.update(exported)
            env.update(req.env or {})
            env.update(services[child_id])
            labels = {
                **record.labels,
                LABEL_WORKER: w.name,
                LABEL_RECORD: record.model_dump_json(exclude={"history"}),
            }
            return spec.model_copy(
                update={"env": env, "workdir": workdir, "labels": labels, "owner": record.owner}
            )

        runtime = box.runtime
        w._creating.update(child_ids)
        started = time.perf_counter()
        handles: dict[str, Any] = {}
        try:
            await runtime.fork(parent_id, child_ids, make_spec)
            for record in records.values():
                _step(record, SandboxState.STARTING, w._clock())

            async def start(child_id: str) -> None:
                handles[child_id] = await runtime.start(child_id)
                await w._llm_attach(child_id, handles[child_id])

            await asyncio.gather(*(start(c) for c in child_ids))
        except BaseException:
            for handle in handles.values():
                with contextlib.suppress(Exception):
                    await handle.close()
            for child_id in child_ids:
                await w._undo_create(runtime, child_id)
            raise
        finally:
            w._creating.difference_update(child_ids)
        at = w._clock()
        for child_id, record in records.items():
            _step(record, SandboxState.RUNNING, at)
            child = _Box(record, handles[child_id], runtime)
            w._touch(child, at)
            w._boxes[child_id] = child
            w._watch(child)
        w._warm_wanted.set()
        w._publish()
        log.info(
            "worker %s: forked %s into %d in %.1f ms",
            w.name,
            parent_id,
            len(child_ids),
            (time.perf_counter() - started) * 1000,
            extra={"sandbox_id": parent_id, "namespace": namespace},
        )
        return list(records.values())

    async def pause(self, sandbox_id: str) -> SandboxRecord:
        """Freeze a running sandbox's processes (its files and memory stay); idempotent.

        Raises:
            SandboxNotRunning: it is not running.
            NotSupported: its runtime cannot pause.
        """
        w = cast("Worker", self)
        box = w._boxes.get(sandbox_id)
        if box is None:
            raise w._not_found(sandbox_id)
        if box.record.state == SandboxState.PAUSED:
            return box.record
        if box.record.state != SandboxState.RUNNING:
            raise SandboxNotRunning(f"sandbox {sandbox_id!r} is {box.record.state.value}")
        box.handle.unwatch()  # a frozen rocklet cannot answer pings
        try:
            await box.runtime.pause(sandbox_id)
        except BaseException:
            self._rewatch(box)
            raise
        _step(box.record, SandboxState.PAUSED, w._clock())
        w._publish()
        return box.record

    def _rewatch(self, box: _Box) -> None:
        w = cast("Worker", self)
        interval = w.args.rocklet_ping_interval_seconds
        if interval is not None:
            box.handle.watch(interval, w.args.rocklet_ping_timeout_seconds)

    async def resume(self, sandbox_id: str) -> SandboxRecord:
        """Thaw a paused sandbox; a running one is returned as it is.

        Raises:
            SandboxNotRunning: it is neither paused nor running.
        """
        w = cast("Worker", self)
        box = w._boxes.get(sandbox_id)
        if box is None:
            raise w._not_found(sandbox_id)
        w._touch(box, w._clock())
        if box.record.state == SandboxState.RUNNING:
            return box.record
        if box.record.state != SandboxState.PAUSED:
            raise SandboxNotRunning(f"sandbox {sandbox_id!r} is {box.record.state.value}")
        await box.runtime.resume(sandbox_id)
        _step(box.record, SandboxState.RUNNING, w._clock())
        self._rewatch(box)
        w._publish()
        return box.record


class ForkScheduler:
    """The Scheduler's fork: namespace and quota checks, then the parent's Worker."""

    def _check_fork_quota(self, namespace: str, parent: SandboxRecord, count: int) -> None:
        s = cast("Scheduler", self)
        quota = s.args.quotas.get(namespace, s.args.default_quota)
        if quota is None:
            return
        mine = s._records.usage(namespace, s._clock())
        retry = s.args.create_retry_after_seconds
        have = mine.sandboxes + s._inflight_ns.get(namespace, 0)
        if quota.max_sandboxes is not None and have + count > quota.max_sandboxes:
            raise RateLimited(
                f"namespace {namespace!r} has {have} sandboxes: {count} more would pass its "
                f"quota of {quota.max_sandboxes}",
                retry_after=retry,
                quota="sandboxes",
            )
        held = s._inflight_res.get(namespace, [])
        for field, limit in (
            ("cpus", quota.max_cpus),
            ("memory_mb", quota.max_memory_mb),
            ("disk_mb", quota.max_disk_mb),
        ):
            if limit is None:
                continue
            each = getattr(parent.resources, field) or 0
            total = mine.total(field) + sum(getattr(r, field) or 0 for r in held) + each * count
            if total > limit:
                raise RateLimited(
                    f"namespace {namespace!r} would use {total:g} {field}, over its quota of "
                    f"{limit:g}",
                    retry_after=retry,
                    quota=field,
                )

    async def fork(
        self, parent_id: str, req: ForkRequest, namespace: str = "default"
    ) -> ForkResult:
        """Fork ``parent_id`` (in ``namespace``) into ``req.count`` children on its node.

        Raises:
            SandboxNotFound: no such sandbox in ``namespace``.
            SandboxNotRunning: it is not running.
            RateLimited: the namespace's quota (or the node) has no room for the children.
            InvalidRequest: ``ttl_seconds``/``lease_seconds`` over their limits.
        """
        s = cast("Scheduler", self)
        await s.ready()
        parent = s._records.get(parent_id)
        if parent is None or parent.namespace != namespace:
            raise SandboxNotFound(f"no sandbox {parent_id!r}")
        ttl = Lifetime.of(s.args).admit(req.ttl_seconds, req.lease_seconds)
        worker = next((w for w in s._workers.values() if w.name == parent.worker), None)
        if worker is None:
            raise SandboxNotRunning(f"the node of sandbox {parent_id!r} is gone")
        self._check_fork_quota(namespace, parent, req.count)
        ids = [f"sb-{worker.name}-{secrets.token_hex(8)}" for _ in range(req.count)]
        s._inflight_ids.update(ids)
        try:
            records = await worker.fork(parent_id, ids, req, ttl, namespace)
        finally:
            s._inflight_ids.difference_update(ids)
        for record in records:
            s._records[record.id] = record
            s._registered[record.id] = s._clock()
        await s._save(*records)
        log.info("scheduler: forked %s into %d on %s", parent_id, len(records), worker.name)
        return ForkResult(parent=parent_id, items=records)

    async def pause(self, sandbox_id: str, namespace: str = "default") -> SandboxRecord:
        """Pause a sandbox of ``namespace`` on its Worker (see :meth:`ForkWorker.pause`)."""
        return await self._on_worker(sandbox_id, namespace, "pause")

    async def resume(self, sandbox_id: str, namespace: str = "default") -> SandboxRecord:
        """Resume a paused sandbox of ``namespace``."""
        return await self._on_worker(sandbox_id, namespace, "resume")

    async def _on_worker(self, sandbox_id: str, namespace: str, what: str) -> SandboxRecord:
        s = cast("Scheduler", self)
        await s.ready()
        record = s._records.get(sandbox_id)
        if record is None or record.namespace != namespace:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        worker = next((w for w in s._workers.values() if w.name == record.worker), None)
        if worker is None:
            raise SandboxNotRunning(f"the node of sandbox {sandbox_id!r} is gone")
        fresh: SandboxRecord = await getattr(worker, what)(sandbox_id)
        s._records[sandbox_id] = fresh
        return fresh
