"""The Worker: owns one node's sandboxes through a Runtime and one RockletHandle each.

A plain async class; ``_ray.py`` runs it as a detached, node-pinned Ray actor named
``rock-worker-<short>``. Models cross Ray as pydantic objects. Errors are typed
:class:`~rock_serve.errors.RockError` subclasses; callers unwrap them with ``_ray.call``.

Every sandbox it makes carries the label ``rock.worker=<short>``. On start it removes the
sandboxes a previous incarnation left behind (adopting them instead is future work), so a
restarted Worker leaks nothing. A reaper task removes sandboxes past their TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from rock_serve.config import ServerArgs
from rock_serve.deployments._metrics import metrics
from rock_serve.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    RateLimited,
    RockError,
    SandboxNotFound,
)
from rock_serve.protocol import (
    CreateSandboxRequest,
    ExecRequest,
    ExecResult,
    FileInfo,
    ListDirResult,
    MkdirRequest,
    OutputChunk,
    RemoveRequest,
    SandboxRecord,
    SandboxSpec,
    SandboxState,
    SandboxStats,
    SessionCreateRequest,
    SessionCreateResponse,
    SessionRunRequest,
    SessionRunResult,
    WorkerStatus,
)
from rock_serve.protocol.api import LIFECYCLE_FIELDS
from rock_serve.rocklet.handle import PtyProcess, RockletHandle
from rock_serve.runtime.base import Runtime

__all__ = ["LABEL_WORKER", "Worker"]

log = logging.getLogger(__name__)

#: Label on every sandbox a Worker makes: the Worker's short name.
LABEL_WORKER = "rock.worker"


@dataclass
class _Box:
    record: SandboxRecord
    handle: RockletHandle


class Worker:
    """One node's sandboxes: create/remove, TTL reaping and the data plane."""

    def __init__(
        self,
        args: ServerArgs,
        name: str,
        node_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.args = args
        self.name = name
        self.node_id = node_id
        self._clock = clock
        self._boxes: dict[str, _Box] = {}
        self._creating: set[str] = set()
        self._runtime: Runtime | None = None
        self._broken: RockError | None = None
        self._startup: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._ptys: dict[str, PtyProcess] = {}
        self._metrics = metrics("worker", name)
        try:
            self._runtime = args.runtime.build()
        except RockError as exc:
            log.error("worker %s: runtime unusable: %s", name, exc)
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
            self._startup = asyncio.ensure_future(self._start(self._runtime))
        await asyncio.shield(self._startup)
        return self._runtime

    async def _start(self, runtime: Runtime) -> None:
        for info in await runtime.list(labels={LABEL_WORKER: self.name}):
            log.warning("worker %s: removing leftover sandbox %s", self.name, info.id)
            with contextlib.suppress(Exception):
                await runtime.remove(info.id)
        self._reaper = asyncio.ensure_future(self._reap_loop())

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.args.reap_interval_seconds)
            try:
                await self.reap()
            except Exception:  # pragma: no cover - keep reaping whatever happens
                log.exception("worker %s: reaping failed", self.name)

    async def reap(self) -> list[str]:
        """Remove every sandbox past its TTL; returns their ids."""
        now = self._clock()
        expired = [
            sid
            for sid, box in self._boxes.items()
            if box.record.expires_at is not None and box.record.expires_at <= now
        ]
        for sid in expired:
            log.info("worker %s: sandbox %s expired", self.name, sid)
            with contextlib.suppress(SandboxNotFound):
                await self.remove(sid)
        self._metrics.reaped("ttl", len(expired))
        return expired

    async def shutdown(self) -> int:
        """Remove every sandbox and stop reaping; returns how many were removed."""
        if self._reaper is not None:
            self._reaper.cancel()
        ids = list(self._boxes)
        for sid in ids:
            with contextlib.suppress(SandboxNotFound):
                await self.remove(sid)
        return len(ids)

    # ------------------------------------------------------------------ control plane

    async def create(self, sandbox_id: str, req: CreateSandboxRequest, ttl: float) -> SandboxRecord:
        """Create and start a sandbox. On any failure nothing is left behind.

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
        spec.labels = {**spec.labels, LABEL_WORKER: self.name}
        self._creating.add(sandbox_id)
        started = time.perf_counter()
        try:
            info = await runtime.create(sandbox_id, spec)
            handle = await runtime.start(sandbox_id)
            record = SandboxRecord(
                id=sandbox_id,
                state=SandboxState.RUNNING,
                owner=req.owner,
                labels=dict(req.labels),
                image=req.image,
                resources=req.resources,
                network=req.network,
                worker=self.name,
                node_id=self.node_id,
                created_at=info.created_at,
                expires_at=self._clock() + ttl,
            )
            self._boxes[sandbox_id] = _Box(record, handle)
            self._metrics.created(time.perf_counter() - started, ok=True)
            self._publish()
            log.info(
                "worker %s: created sandbox %s owner=%r in %.1f ms",
                self.name,
                sandbox_id,
                req.owner,
                (time.perf_counter() - started) * 1000,
            )
            return record
        except Conflict:
            raise  # the id belongs to someone else: leave it alone
        except BaseException as exc:
            self._metrics.created(time.perf_counter() - started, ok=False)
            code = exc.code.value if isinstance(exc, RockError) else "internal"
            self._metrics.error("create", code)
            # Removal is idempotent, so this also cleans up a half-made sandbox.
            with contextlib.suppress(Exception):
                await asyncio.shield(runtime.remove(sandbox_id))
            raise
        finally:
            self._creating.discard(sandbox_id)

    async def remove(self, sandbox_id: str) -> None:
        """Stop and remove a sandbox.

        Raises:
            SandboxNotFound: this Worker has no such sandbox.
        """
        box = self._boxes.pop(sandbox_id, None)
        if box is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        runtime = self._runtime
        assert runtime is not None
        with contextlib.suppress(Exception):
            await box.handle.close()
        try:
            await runtime.remove(sandbox_id)
        finally:
            self._publish()
            log.info("worker %s: removed sandbox %s", self.name, sandbox_id)

    def _publish(self) -> None:
        counts: dict[str, int] = {}
        for box in self._boxes.values():
            counts[box.record.state.value] = counts.get(box.record.state.value, 0) + 1
        self._metrics.sandboxes(counts)

    async def get(self, sandbox_id: str) -> SandboxRecord:
        """One sandbox's record; a sandbox whose rocklet is gone shows the runtime's state."""
        box = self._box(sandbox_id)
        if not box.handle.alive and box.record.state == SandboxState.RUNNING:
            assert self._runtime is not None
            with contextlib.suppress(RockError):
                info = await self._runtime.inspect(sandbox_id)
                state = info.state if info.state != SandboxState.RUNNING else SandboxState.FAILED
                box.record = box.record.model_copy(update={"state": state, "reason": info.reason})
        return box.record

    async def list(self) -> list[SandboxRecord]:
        """Every sandbox this Worker owns."""
        return [box.record for box in self._boxes.values()]

    async def status(self) -> WorkerStatus:
        """Load, capacity and runtime."""
        return WorkerStatus(
            name=self.name,
            node_id=self.node_id,
            alive=self._broken is None,
            sandboxes=len(self._boxes) + len(self._creating),
            capacity=self.args.max_sandboxes_per_node,
            runtime=self.args.runtime.type,
        )

    # ------------------------------------------------------------------ data plane

    def _box(self, sandbox_id: str) -> _Box:
        box = self._boxes.get(sandbox_id)
        if box is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return box

    async def exec(self, sandbox_id: str, req: ExecRequest) -> ExecResult:
        """Run one command to completion."""
        started = time.perf_counter()
        result = await self._box(sandbox_id).handle.exec(req)
        self._metrics.op("exec", time.perf_counter() - started)
        return result

    async def stream_exec(
        self, sandbox_id: str, req: ExecRequest
    ) -> AsyncIterator[OutputChunk | ExecResult]:
        """Run one command, yielding output chunks and then the result."""
        async for item in self._box(sandbox_id).handle.stream_exec(req):
            yield item

    async def create_session(
        self, sandbox_id: str, req: SessionCreateRequest
    ) -> SessionCreateResponse:
        """Start a bash session."""
        return await self._box(sandbox_id).handle.create_session(req)

    async def run_in_session(self, sandbox_id: str, req: SessionRunRequest) -> SessionRunResult:
        """Run a command in a session."""
        started = time.perf_counter()
        result = await self._box(sandbox_id).handle.run_in_session(req)
        self._metrics.op("session_run", time.perf_counter() - started)
        return result

    async def stream_in_session(
        self, sandbox_id: str, req: SessionRunRequest
    ) -> AsyncIterator[OutputChunk | SessionRunResult]:
        """Run a command in a session, yielding output chunks and then the result."""
        async for item in self._box(sandbox_id).handle.stream_in_session(req):
            yield item

    async def session_stdin(
        self, sandbox_id: str, session: str, data: bytes, eof: bool = False
    ) -> None:
        """Write to a session's running command's stdin."""
        await self._box(sandbox_id).handle.session_stdin(session, data, eof=eof)

    async def interrupt_session(self, sandbox_id: str, session: str) -> None:
        """Interrupt a session's running command."""
        await self._box(sandbox_id).handle.interrupt_session(session)

    async def close_session(self, sandbox_id: str, session: str) -> None:
        """Close a session."""
        await self._box(sandbox_id).handle.close_session(session)

    async def read_file(self, sandbox_id: str, path: str) -> bytes:
        """A whole file, up to ``max_file_bytes``.

        Raises:
            InvalidRequest: the file is larger than ``max_file_bytes``.
        """
        limit = self.args.max_file_bytes
        data = await self._box(sandbox_id).handle.read_file(path, length=limit + 1)
        if len(data) > limit:
            raise InvalidRequest(f"{path} is over the {limit}-byte limit of one read")
        return data

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes, mode: int | None = None
    ) -> int:
        """Write a file atomically; returns its size.

        Raises:
            InvalidRequest: ``data`` is larger than ``max_file_bytes`` (the Admin checks this
                too; the Ray transport reaches the Worker directly).
        """
        self._check_size(len(data), path)
        return await self._box(sandbox_id).handle.write_file(path, data, mode=mode)

    def _check_size(self, size: int, what: str) -> None:
        if size > self.args.max_file_bytes:
            raise InvalidRequest(
                f"{what}: {size} bytes is over the {self.args.max_file_bytes}-byte limit"
            )

    async def download_archive(self, sandbox_id: str, path: str) -> bytes:
        """A tar of ``path``, up to ``max_file_bytes``.

        Raises:
            InvalidRequest: the tar is larger than ``max_file_bytes``.
        """
        limit = self.args.max_file_bytes
        parts: list[bytes] = []
        size = 0
        async for chunk in self._box(sandbox_id).handle.download_tar(path):
            size += len(chunk)
            if size > limit:
                raise InvalidRequest(f"a tar of {path} is over the {limit}-byte limit")
            parts.append(chunk)
        return b"".join(parts)

    async def upload_archive(self, sandbox_id: str, path: str, data: bytes) -> None:
        """Extract a tar stream into directory ``path``."""
        self._check_size(len(data), path)
        await self._box(sandbox_id).handle.upload_tar(path, data)

    async def stat(self, sandbox_id: str, path: str) -> FileInfo:
        """Stat a path."""
        return await self._box(sandbox_id).handle.stat(path)

    async def list_dir(self, sandbox_id: str, path: str) -> ListDirResult:
        """List a directory."""
        return await self._box(sandbox_id).handle.list_dir(path)

    async def mkdir(self, sandbox_id: str, req: MkdirRequest) -> None:
        """Create a directory."""
        await self._box(sandbox_id).handle.mkdir(
            req.path, parents=req.parents, exist_ok=req.exist_ok
        )

    async def remove_path(self, sandbox_id: str, req: RemoveRequest) -> None:
        """Remove a file or directory."""
        await self._box(sandbox_id).handle.remove(
            req.path, recursive=req.recursive, missing_ok=req.missing_ok
        )

    async def stats(self, sandbox_id: str) -> SandboxStats:
        """Usage and limits of a sandbox."""
        return await self._box(sandbox_id).handle.stats()

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
                async for data in p:
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
