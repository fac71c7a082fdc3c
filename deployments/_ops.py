"""The Worker's one entry point for sandbox operations, and typed calls to it over Ray.

``Worker.op(sandbox_id, operation)`` runs any :data:`~rock_serve.protocol.ops.Operation`;
``Worker.op_stream`` runs the ones that stream (:class:`~rock_serve.protocol.ops.Streams`).
Both send the model to the sandbox's rocklet as one frame, applying the Worker's policies from
the model's declared traits (``Op.idempotent``, ``output_capped``, ``upload``, ``limits``,
``metric``): no Worker code per operation. The Admin's
data-plane routes (through :func:`worker_op` / :func:`worker_op_stream`), the direct data plane
and the Ray gate (``ray_op`` / ``ray_op_stream``) all come in here, so no caller names a Worker
method by a string for these operations.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from rock_serve.deployments._ray import ActorHandle, call, stream_ahead
from rock_serve.deployments._trace import logged_stream
from rock_serve.errors import InvalidRequest, to_body
from rock_serve.protocol import SessionRunResult
from rock_serve.protocol.dataplane import MAX_BATCH, BatchRunItem, BatchRunOutcome
from rock_serve.protocol.ops import OPS, Op, Streams

if TYPE_CHECKING:
    from rock_serve.deployments.worker import Worker

__all__ = ["LIMITS", "OpsWorker", "batch_outcome", "worker_op", "worker_op_stream"]

log = logging.getLogger(__name__)

OpT = TypeVar("OpT", bound=Op[Any])
R = TypeVar("R")
ItemT = TypeVar("ItemT")


def _read_limit(w: Worker, streamed: bool) -> int:
    # A whole read is held in memory: also within max_file_bytes; a stream only max_read_bytes.
    return int(w.args.max_read_bytes) if streamed else w._read_limit()


#: The frame arguments a Worker adds from its config (``Op.limits``): name -> value.
LIMITS: dict[str, Any] = {
    "max_bytes": _read_limit,
    "max_sessions": lambda w, streamed: w.args.max_sessions_per_sandbox,
}


def _checked(operation: Any, streamed: bool) -> type[Op[Any]]:
    """The operation's model, if it is a registered operation (one that streams, if asked).

    Raises:
        InvalidRequest: not an operation model, or it does not stream.
    """
    kind = type(operation)
    spec = OPS.get(str(getattr(operation, "op", ""))) if isinstance(operation, Op) else None
    if spec is None or spec.model is not kind:
        raise InvalidRequest(f"unknown operation {kind.__name__}")
    if streamed and spec.item is None:
        raise InvalidRequest(f"operation {kind.__name__} does not stream")
    return kind


def _policed(w: Worker, kind: type[Op[Any]], operation: OpT) -> OpT:
    """``operation`` with the Worker's generic policies applied (see the traits of ``Op``)."""
    if kind.output_capped:
        operation = cast(OpT, w._capped(cast(Any, operation)))
    if kind.upload and kind.payload is not None:
        size = len(getattr(operation, kind.payload))
        w._check_size(size, str(getattr(operation, "path", kind.__name__)))
    return operation


def _limits(w: Worker, kind: type[Op[Any]], streamed: bool) -> dict[str, Any] | None:
    if not kind.limits:
        return None
    return {name: LIMITS[name](w, streamed) for name in kind.limits}


async def batch_outcome(work: Awaitable[SessionRunResult]) -> BatchRunOutcome:
    """One batch item's outcome: its result, or the error body of what it met (never raised)."""
    try:
        return BatchRunOutcome(result=await work)
    except Exception as exc:
        return BatchRunOutcome(error=to_body(exc)["error"])


def _batch(items: list[BatchRunItem]) -> list[BatchRunItem]:
    if len(items) > MAX_BATCH:
        raise InvalidRequest(f"a batch carries at most {MAX_BATCH} commands, not {len(items)}")
    return items


# ---------------------------------------------------------------------------- the Worker's side


class OpsWorker:
    """The Worker's entry points for operations (the Worker class inherits it).

    Every operation takes the same path: the sandbox's rocklet handle sends the model as one
    frame (``RockletHandle.op``), with the Worker's policies applied from the model's traits
    (output cap, upload size, read and session limits, idempotency key, latency metric).
    """

    async def op(self, sandbox_id: str, operation: Op[R]) -> R:
        """Run one operation on sandbox ``sandbox_id``; returns its result.

        Raises:
            InvalidRequest: ``operation`` is not an operation model.
        """
        w = cast("Worker", self)
        kind = _checked(operation, False)
        operation = _policed(w, kind, operation)
        box = w._box(sandbox_id)
        started = time.perf_counter()
        work = box.handle.op(operation, _limits(w, kind, False))
        if kind.idempotent:
            key = cast(Any, operation).idempotency_key
            result: R = await w._once(sandbox_id, key, work)
        else:
            result = await work
        if kind.metric is not None:
            w._metrics.op(kind.metric, time.perf_counter() - started, box.record.namespace)
        return result

    async def op_stream(self, sandbox_id: str, operation: Streams[ItemT]) -> AsyncIterator[ItemT]:
        """Run one streaming operation, yielding its items (see :class:`Streams`).

        Raises:
            InvalidRequest: ``operation`` does not stream.
        """
        w = cast("Worker", self)
        kind = _checked(operation, True)
        policed = _policed(w, kind, cast(Op[Any], operation))
        items = w._box(sandbox_id).handle.op_stream(
            cast(Streams[ItemT], policed), _limits(w, kind, True)
        )
        async for item in logged_stream(str(cast(Any, operation).op), sandbox_id, items, log):
            yield item

    async def run_many(self, items: list[BatchRunItem]) -> list[BatchRunOutcome]:
        """One command in each of many of this Worker's sandboxes, all at once (a GRPO group's
        step in one actor call; ``items``' tokens are unused): per item, in order, its result
        or its error body. The platform's own entry; callers come in through
        :meth:`ray_run_many`.

        Raises:
            InvalidRequest: more than ``MAX_BATCH`` items.
        """
        runs = (batch_outcome(self.op(i.sandbox_id, i.op())) for i in _batch(items))
        return list(await asyncio.gather(*runs))

    async def ray_run_many(
        self, token: str | None, items: list[BatchRunItem]
    ) -> list[BatchRunOutcome]:
        """:meth:`run_many` from the Ray transport: each item checked against the caller's
        token and audited as one ``session.run``.
        """
        gate = cast("Worker", self)._ray_gate()
        runs = (
            batch_outcome(gate.data_op(self, token, i.sandbox_id, i.op())) for i in _batch(items)
        )
        return list(await asyncio.gather(*runs))

    async def ray_op(self, token: str | None, sandbox_id: str, operation: Op[R]) -> R:
        """:meth:`op` from the Ray transport: the caller's token checked, the call audited."""
        gate = cast("Worker", self)._ray_gate()
        return cast(R, await gate.data_op(self, token, sandbox_id, operation))

    async def ray_op_stream(
        self, token: str | None, sandbox_id: str, operation: Streams[ItemT]
    ) -> AsyncIterator[ItemT]:
        """:meth:`op_stream` from the Ray transport (see :meth:`ray_op`)."""
        gate = cast("Worker", self)._ray_gate()
        async for item in gate.data_op_stream(self, token, sandbox_id, operation):
            yield item


# ---------------------------------------------------------------------------- callers' side


async def worker_op(actor: ActorHandle, sandbox_id: str, operation: Op[R]) -> R:
    """``Worker.op`` on a Worker actor (typed errors re-raised, traced as ``call`` is)."""
    return cast(R, await call(actor, OpsWorker.op, sandbox_id, operation))


def worker_op_stream(
    actor: ActorHandle,
    sandbox_id: str,
    operation: Streams[ItemT],
    *,
    backpressure: int | None = None,
) -> AsyncIterator[ItemT]:
    """``Worker.op_stream`` on a Worker actor, item by item (see ``_ray.stream``)."""
    return cast(
        AsyncIterator[ItemT],
        stream_ahead(backpressure, actor, OpsWorker.op_stream, sandbox_id, operation),
    )
