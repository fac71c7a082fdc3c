"""The audit log: who did what to which sandbox, when, and how it ended.

The Admin records one :class:`AuditEvent` per mutating call (create, delete, exec, session
create/run/stdin/interrupt/close, file write/mkdir/remove, archive upload, pty open/close)
and per refused credential. Command texts are kept (cut to ``max_command_chars``);
environment values, stdin data, file contents and tokens never are: an event names the env
*keys* and the token's *name* only.

:meth:`AuditLog.record` never blocks and never raises: events go to a bounded queue that a
background task drains into every configured sink (a JSONL file written from a thread, a Redis
stream through ``redis.asyncio`` with ``XADD ... MAXLEN ~``). A sink that fails is logged
(at most once a minute) and counted (``rock_audit_errors_total``); the request it describes
has already been answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from rock_serve.auth import Principal
from rock_serve.config import AuditConfig
from rock_serve.deployments._trace import untraced_task
from rock_serve.errors import ErrorCode, InvalidConfig, RockError
from rock_serve.runtime._sync import run_sync

__all__ = ["TEXT_FIELDS", "AuditEvent", "AuditLog", "JsonlSink", "RedisSink"]

log = logging.getLogger(__name__)

#: Seconds one sink write may take before it counts as failed.
_WRITE_TIMEOUT = 10.0
#: Most events written in one batch.
_BATCH = 512
#: Seconds between two log lines about the same failing sink.
_LOG_EVERY = 60.0


class AuditEvent(BaseModel):
    """One audited call (a JSONL line; a Redis stream entry with these fields)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, description="Event id.")
    ts: float = Field(default_factory=time.time, description="When, seconds since the epoch.")
    action: str = Field(description="What: create, delete, exec, session.run, file.write, ...")
    token_name: str = Field(description="Name of the token used ('anonymous', or '-' if none).")
    namespace: str = Field(description="The caller's namespace ('-' if unauthenticated).")
    admin: bool = Field(default=False, description="The caller holds an admin token.")
    sandbox_id: str | None = Field(default=None, description="Which sandbox, if any.")
    status: int = Field(description="HTTP status of the reply.")
    code: str = Field(description="'ok', or the error code of the reply.")
    duration_ms: float = Field(default=0.0, description="Time the call took.")
    client: str | None = Field(default=None, description="Caller's address, if known.")
    command: str | list[str] | None = Field(
        default=None, description="Command text of exec/session run (cut to the limit)."
    )
    env_keys: list[str] | None = Field(
        default=None, description="Names of environment variables given (never values)."
    )
    session: str | None = Field(default=None, description="Session name, if any.")
    path: str | None = Field(default=None, description="Path in the sandbox, if any.")
    detail: dict[str, Any] = Field(
        default_factory=dict, description="Other facts (sizes, exit code, method, route...)."
    )

    def stream_fields(self) -> dict[str, str]:
        """The event as flat Redis stream fields, None fields left out.

        The plain-text fields (:data:`TEXT_FIELDS`) are stored as is; every other one
        (numbers, booleans, ``command``, ``env_keys``, ``detail``) as JSON.
        """
        out: dict[str, str] = {}
        for key, value in self.model_dump(mode="json", exclude_none=True).items():
            if key == "detail" and not value:
                continue
            out[key] = value if key in TEXT_FIELDS else json.dumps(value)
        return out


#: Fields of :class:`AuditEvent` stored as plain text in a Redis stream entry.
TEXT_FIELDS = frozenset(
    {"id", "action", "token_name", "namespace", "sandbox_id", "code", "client", "session", "path"}
)


class Sink(Protocol):
    """Where audit events go."""

    name: str

    async def write(self, events: Sequence[AuditEvent]) -> None:
        """Write a batch of events (raise on failure)."""
        ...

    async def aclose(self) -> None:
        """Release what the sink holds."""
        ...


class JsonlSink:
    """Appends one JSON line per event to a file (mode 0600), from a worker thread.

    The file is opened with ``O_APPEND``, so several Admin replicas on one host may share it
    (each batch is one ``write``); it is reopened when rotated away (its inode changed).
    """

    name = "file"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is not None:
            try:
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    return self._fd
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._fd

    def _write(self, data: bytes) -> None:
        fd = self._open()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    async def write(self, events: Sequence[AuditEvent]) -> None:
        """Append the events as JSON lines."""
        data = b"".join(e.model_dump_json().encode() + b"\n" for e in events)
        await run_sync(self._write, data)

    async def aclose(self) -> None:
        """Close the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RedisSink:
    """``XADD``s each event to a Redis stream, capped with ``MAXLEN ~``."""

    name = "redis"

    def __init__(self, url: str, stream: str, maxlen: int) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError:  # pragma: no cover - the state extra is not installed
            raise InvalidConfig(
                "audit.redis_url needs the 'redis' package (rock-serve[state])"
            ) from None
        self.stream = stream
        self.maxlen = maxlen
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=_WRITE_TIMEOUT, socket_connect_timeout=_WRITE_TIMEOUT
        )

    async def write(self, events: Sequence[AuditEvent]) -> None:
        """Add the events to the stream in one pipeline."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.xadd(
                    self.stream,
                    event.stream_fields(),  # type: ignore[arg-type]
                    maxlen=self.maxlen,
                    approximate=True,
                )
            await pipe.execute()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


class AuditLog:
    """The Admin replica's audit log: a bounded queue drained into the sinks.

    Args:
        config: Which sinks, limits.
        on_error: Called with ``(sink, n)`` for every ``n`` events a sink failed to write or
            the full queue dropped (``sink="queue"``); metrics hook in here.
    """

    def __init__(
        self, config: AuditConfig, on_error: Callable[[str, int], None] | None = None
    ) -> None:
        self.config = config
        self.sinks: list[Sink] = []
        if config.path:
            self.sinks.append(JsonlSink(config.path))
        if config.redis_url:
            self.sinks.append(RedisSink(config.redis_url, config.redis_stream, config.redis_maxlen))
        self._on_error = on_error
        self._queue: asyncio.Queue[AuditEvent] | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_log: dict[str, float] = {}
        #: Events not written, by sink ("queue" for dropped ones).
        self.failures: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        """True when at least one sink is configured."""
        return bool(self.sinks)

    def command(self, command: str | list[str]) -> str | list[str]:
        """A command text as recorded: cut to ``max_command_chars`` (in total for a list)."""
        limit = self.config.max_command_chars
        if isinstance(command, str):
            return command if len(command) <= limit else command[:limit] + "...[cut]"
        out: list[str] = []
        used = 0
        for arg in command:
            if used + len(arg) > limit:
                out.append(arg[: max(0, limit - used)] + "...[cut]")
                break
            out.append(arg)
            used += len(arg)
        return out

    @contextlib.asynccontextmanager
    async def scope(
        self,
        principal: Principal,
        action: str,
        sandbox_id: str | None = None,
        *,
        client: str | None,
        status: int = 200,
        **fields: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Record one event for the block: its outcome is the block's (or its error's).

        Every transport (the Admin's routes, the Ray gate) audits through here. The block may
        add to the yielded dict (``sandbox_id``, ``detail`` entries...).
        """
        started = time.perf_counter()
        event: dict[str, Any] = {"sandbox_id": sandbox_id, "detail": {}, **fields}
        if event.get("command") is not None:
            event["command"] = self.command(event["command"])
        code = "ok"
        try:
            yield event
        except BaseException as exc:
            if isinstance(exc, RockError):
                status, code = exc.status, exc.code.value
            elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
                status, code = 499, "cancelled"
            else:
                status, code = 500, ErrorCode.INTERNAL.value
            raise
        finally:
            if self.enabled:
                self.record(
                    AuditEvent(
                        action=action,
                        token_name=principal.name,
                        namespace=principal.namespace,
                        admin=principal.admin,
                        status=status,
                        code=code,
                        duration_ms=round((time.perf_counter() - started) * 1000, 3),
                        client=client,
                        **event,
                    )
                )

    def record(self, event: AuditEvent) -> None:
        """Queue ``event`` for the sinks; never blocks, never raises."""
        if not self.sinks:
            return
        try:
            if self._queue is None:
                self._queue = asyncio.Queue(self.config.queue_size)
            if self._task is None or self._task.done():
                self._task = untraced_task(self._drain())  # outlives the call
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._failed("queue", 1, "the queue is full; event dropped")
        except Exception as exc:  # pragma: no cover - no running loop, say
            self._failed("queue", 1, repr(exc))

    async def flush(self) -> None:
        """Wait until every queued event went through the sinks (or failed)."""
        if self._queue is not None and self._task is not None and not self._task.done():
            await self._queue.join()

    async def aclose(self) -> None:
        """Flush (bounded), stop the drain task, close the sinks."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), _WRITE_TIMEOUT)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                await sink.aclose()

    async def _drain(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < _BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                results = await asyncio.gather(
                    *(asyncio.wait_for(s.write(batch), _WRITE_TIMEOUT) for s in self.sinks),
                    return_exceptions=True,
                )
                for sink, result in zip(self.sinks, results, strict=True):
                    if isinstance(result, BaseException):
                        self._failed(sink.name, len(batch), repr(result))
            finally:
                for _ in batch:
                    queue.task_done()

    def _failed(self, sink: str, n: int, why: str) -> None:
        self.failures[sink] = self.failures.get(sink, 0) + n
        now = time.monotonic()
        if now - self._last_log.get(sink, -_LOG_EVERY) >= _LOG_EVERY:
            self._last_log[sink] = now
            log.error("audit: %d event(s) not written by sink %s: %s", n, sink, why)
        if self._on_error is not None:
            with contextlib.suppress(Exception):
                self._on_error(sink, n)
