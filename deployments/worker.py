"""The Worker: owns one node's sandboxes through a Runtime and one RockletHandle each.

A plain async class; ``_ray.py`` runs it as a detached, node-pinned Ray actor named
``rock-worker-<short>``. Models cross Ray as pydantic objects. Errors are typed
:class:`~rock_serve.errors.RockError` subclasses; callers unwrap them with ``_ray.call``.

A facade over its parts, each a module of its own: the table of sandboxes
(``_worker_table``), the warm pool (``_warm_pool``), adoption of an earlier incarnation's
sandboxes (``_adoption``), chunked uploads (``_uploads``), the idempotency cache
(``_idempotency``), open ptys (``_ptys``) and a sandbox's create/watch/remove
(``_lifecycle``). What Ray calls are this class's methods.

Every sandbox it makes carries the label ``rock.worker=<short>`` and, in ``rock.record``, the
JSON of its record, so a restarted Worker adopts what it can and removes the rest (see
``_adoption``). Nothing leaks either way.

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
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

from rock_serve.config import RuntimeConfig, ServerArgs
from rock_serve.deployments import _adoption
from rock_serve.deployments._dataplane import DataPlaneWorker
from rock_serve.deployments._fork import ForkWorker
from rock_serve.deployments._idempotency import KeyCache
from rock_serve.deployments._images import ImagesWorker
from rock_serve.deployments._lifecycle import LifecycleWorker
from rock_serve.deployments._llm import LLMWorker
from rock_serve.deployments._metrics import metrics
from rock_serve.deployments._node import NodeCapacity
from rock_serve.deployments._ops import OpsWorker
from rock_serve.deployments._ports import PortsWorker
from rock_serve.deployments._processes import ProcessesWorker
from rock_serve.deployments._ptys import PtyRegistry
from rock_serve.deployments._snapshot import SnapshotWorker
from rock_serve.deployments._trace import SPANS, TracedActor, logged_stream, untraced_task
from rock_serve.deployments._uploads import Uploads
from rock_serve.deployments._warm_pool import LABEL_WARM, WarmPool, pool_targets
from rock_serve.deployments._worker_table import (
    LABEL_RECORD,
    LABEL_WORKER,
    Box,
    SandboxTable,
    step,
)
from rock_serve.errors import (
    RockError,
    SandboxNotFound,
    TooLarge,
)
from rock_serve.protocol import (
    ExecRequest,
    SandboxInfo,
    SandboxRecord,
    SessionRunRequest,
    WorkerStatus,
)
from rock_serve.runtime.base import Runtime

__all__ = ["LABEL_RECORD", "LABEL_WARM", "LABEL_WORKER", "Worker"]

T = TypeVar("T")
Req = TypeVar("Req", ExecRequest, SessionRunRequest)

log = logging.getLogger(__name__)

#: The table's row (``_fork`` and older code import it under this name).
_Box = Box
_step = step


class Worker(
    LifecycleWorker,
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
        self._table = SandboxTable(clock)
        self._boxes: dict[str, Box] = (
            self._table.boxes
        )  # the same dict and set: the mixins use these names
        self._creating: set[str] = self._table.creating
        self._runtime: Runtime | None = runtime
        self._old_runtimes: list[Runtime] = []
        self._broken: RockError | None = None
        self._startup: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._ptys = PtyRegistry()
        self._uploads = Uploads(
            clock, lambda: self.args.max_file_bytes, lambda: self.args.upload_idle_seconds
        )
        self._keys = KeyCache(clock)
        self._pool = WarmPool(
            name,
            node_id,
            clock,
            lambda: self._runtime if self._broken is None else None,
            lambda: pool_targets(
                self.args, self._runtime, self.args.max_sandboxes_per_node - self._table.load()
            ),
            changed=self._publish,
        )
        self._warm: list[Box] = (
            self._pool.boxes
        )  # the same list (tests and bench/images.py read it)
        self._warm_wanted: asyncio.Event = self._pool.wanted
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
        removed = await _adoption.sweep(runtime, self.name, self._boxes, self._adopt)
        self._metrics.reaped("leftover", len(removed))
        await self._start_dataplane_at_start()
        self._reaper = untraced_task(self._reap_loop())
        self._pool.start()

    async def _adopt(self, runtime: Runtime, info: SandboxInfo) -> bool:
        """Take back a sandbox an earlier incarnation left running; False if it cannot be."""
        now = self._clock()
        adopted = await _adoption.adopt(runtime, info, self.name, self.node_id, now)
        if adopted is None:
            return False
        record, handle = adopted
        box = Box(record, handle, runtime)
        self._table.add(box, now)
        self._watch(box)
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
        await self._uploads.reap(now)
        expired = self._table.expired(now)
        for i, (sid, reason) in enumerate(expired):
            archive = await self._archive(sid) if reason == "lease_expired" else None  # issue 16
            if archive is not None:
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
            if archive is not None:
                self._archived_after_removal(sid, archive)
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
        self._pool.want()
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
            await self._pool.drain()
            if self._broken is None and self._runtime is not None and previous is not None:
                # Leftovers of the new runtime from an earlier life of this Worker.
                await _adoption.sweep(self._runtime, self.name, self._boxes, self._adopt)

    async def shutdown(self) -> int:
        """Remove every sandbox (and the warm pool, a refill in flight included), stop reaping
        and close the runtimes (which releases what they hold on the host, e.g. bwrap's
        user-namespace mounts); returns how many sandboxes were removed.
        """
        if self._reaper is not None:
            self._reaper.cancel()
        await self._stop_dataplane()
        await self._pool.shutdown()
        await self._uploads.close_all()
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

    def _not_found(self, sandbox_id: str) -> SandboxNotFound:
        return self._table.not_found(sandbox_id)

    def _touch(self, box: Box, now: float) -> None:
        self._table.touch(box, now)

    async def renew(self, sandbox_id: str) -> SandboxRecord:
        """Renew a sandbox's lease (any call naming it does too); returns its record."""
        return self._box(sandbox_id).record

    def _publish(self) -> None:
        self._metrics.sandboxes(*self._table.counts())
        self._publish_images()

    async def get(self, sandbox_id: str) -> SandboxRecord:
        """One sandbox's record; a sandbox whose rocklet is gone shows the runtime's state."""
        box = self._table.lookup(sandbox_id)
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
            sandboxes=self._table.load(),
            capacity=self.args.max_sandboxes_per_node,
            runtime=self.args.runtime.type,
            warm=len(self._pool),
            reaped=dict(self._metrics.reaped_counts),
            processes_running=processes,
        )

    # ------------------------------------------------------------------ data plane

    def _box(self, sandbox_id: str) -> Box:
        """The sandbox named by a call; the call renews its lease.

        Raises:
            SandboxNotFound: no such sandbox (or it was removed: the reason is in the details).
            SandboxFailed: its rocklet exited or stopped answering (``details['reason']``).
        """
        return self._table.live(sandbox_id)

    async def _once(self, sandbox_id: str, key: str | None, work: Awaitable[T]) -> T:
        """Do ``work`` once per idempotency key: a resend awaits (or gets) the first result."""
        return await self._keys.once(None if key is None else f"{sandbox_id}/{key}", work)

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
        return self._uploads.open(sandbox_id, handle, kind, path, mode)

    async def upload_chunk(self, upload_id: str, data: bytes) -> None:
        """Queue one chunk; waits while the rocklet is behind (backpressure)."""
        await self._uploads.chunk(upload_id, data, renew=self._box)  # fails if the box is gone

    async def upload_close(self, upload_id: str) -> int:
        """Finish an upload; returns the bytes written (file) or received (archive)."""
        return await self._uploads.close(upload_id)

    async def upload_abort(self, upload_id: str) -> None:
        """Abandon an upload (the client went away); nothing partial is kept for files."""
        await self._uploads.abort(upload_id)

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
        async with self._ptys.open(pty_id, handle, cols, rows) as p:
            yield b""
            async for data in logged_stream("pty", sandbox_id, aiter(p), log):
                yield data
            assert p.exit_code is not None
            yield p.exit_code

    async def pty_input(self, pty_id: str, data: bytes) -> None:
        """Write keystrokes to the pty opened by :meth:`stream_pty`."""
        await self._ptys.get(pty_id).send(data)

    async def pty_resize(self, pty_id: str, cols: int, rows: int) -> None:
        """Resize the pty opened by :meth:`stream_pty`."""
        await self._ptys.get(pty_id).resize(cols, rows)

    async def pty_close(self, pty_id: str) -> None:
        """Kill the pty's process tree (a no-op once it has ended)."""
        await self._ptys.kill(pty_id)

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
