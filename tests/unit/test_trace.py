"""The trace id crosses actor calls: ``_ray.call`` -> ``TracedActor.rock_traced`` -> logs;
and the reaps-by-reason counts behind the console's chart.

The Ray actor handle is the seam: :class:`Handle` runs each ``.remote`` call as a task in an
empty context, as another process would (nothing of the caller's contextvars arrives).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

import pytest

from rock_serve.deployments._console import ReapDeltas, Samples
from rock_serve.deployments._metrics import metrics
from rock_serve.deployments._ray import call
from rock_serve.deployments._trace import (
    TRACE_ID,
    TracedActor,
    install_logging,
    traced,
    untraced_task,
)
from rock_serve.errors import SandboxNotFound
from rock_serve.protocol import WorkerStatus

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
log = logging.getLogger("rock_serve.deployments.test_trace")


class Handle:
    """A stand-in for a Ray actor handle: ``handle.method.remote(...)`` in a fresh context."""

    def __init__(self, actor: object) -> None:
        self._actor = actor
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        getattr(self._actor, name)  # AttributeError for a method the actor lacks, as Ray's
        handle = self

        class Method:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> asyncio.Task[Any]:
                handle.calls.append(name)

                async def run() -> Any:
                    result = getattr(handle._actor, name)(*args, **kwargs)
                    return await result if asyncio.iscoroutine(result) else result

                return contextvars.Context().run(asyncio.ensure_future, run())

        return Method


class FakeWorker(TracedActor):
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def create(self, sandbox_id: str) -> str:
        self.seen.append(TRACE_ID.get())
        log.info("worker: created %s", sandbox_id)
        return sandbox_id

    def status(self) -> str:  # a sync actor method
        return TRACE_ID.get()

    async def remove(self, sandbox_id: str) -> None:
        raise SandboxNotFound(f"no sandbox {sandbox_id!r}")


class FakeScheduler(TracedActor):
    def __init__(self, worker: Handle) -> None:
        self.worker = worker
        self.seen: list[str] = []

    async def create(self, sandbox_id: str) -> str:
        self.seen.append(TRACE_ID.get())
        log.info("scheduler: placing %s", sandbox_id)
        created: str = await call(self.worker, "create", sandbox_id)
        return created


async def test_a_trace_id_reaches_the_scheduler_and_the_worker_and_their_logs(caplog):
    caplog.set_level(logging.INFO, logger="rock_serve")
    install_logging()
    worker = FakeWorker()
    worker_handle = Handle(worker)
    scheduler = FakeScheduler(worker_handle)
    scheduler_handle = Handle(scheduler)
    token = TRACE_ID.set(TRACE)
    try:
        assert await call(scheduler_handle, "create", "sb-1") == "sb-1"
        assert await call(worker_handle, "status") == TRACE  # sync methods too
    finally:
        TRACE_ID.reset(token)
    assert scheduler.seen == [TRACE] and worker.seen == [TRACE]
    assert scheduler_handle.calls == ["rock_traced"]
    assert worker_handle.calls == ["rock_traced", "rock_traced"]
    lines = [(r.getMessage(), getattr(r, "trace_id", None)) for r in caplog.records]
    assert ("scheduler: placing sb-1", TRACE) in lines
    assert ("worker: created sb-1", TRACE) in lines


async def test_without_a_trace_id_the_call_is_direct_and_logs_say_dash(caplog):
    caplog.set_level(logging.INFO, logger="rock_serve")
    install_logging()
    worker = FakeWorker()
    handle = Handle(worker)
    assert traced() is None
    assert await call(handle, "create", "sb-2") == "sb-2"
    assert handle.calls == ["create"] and worker.seen == ["-"]
    record = next(r for r in caplog.records if r.getMessage() == "worker: created sb-2")
    assert record.trace_id == "-"


async def test_typed_errors_and_bad_input_through_the_traced_path():
    worker = FakeWorker()
    handle = Handle(worker)
    token = TRACE_ID.set(TRACE)
    try:
        with pytest.raises(SandboxNotFound):
            await call(handle, "remove", "sb-3")
    finally:
        TRACE_ID.reset(token)
    # A malformed trace id is not carried; private methods are not reachable through it.
    assert await worker.rock_traced("not-a-trace", "status") == "-"
    with pytest.raises(AttributeError):
        await worker.rock_traced(TRACE, "_private")
    with pytest.raises(AttributeError):
        await worker.rock_traced(TRACE, "rock_traced", "status")


async def test_a_loop_started_in_a_traced_call_does_not_keep_its_trace_id():
    async def read() -> str:
        return TRACE_ID.get()

    async def inside() -> tuple[str, str]:
        plain = asyncio.ensure_future(read())
        loop = untraced_task(read())
        return await plain, await loop

    worker = FakeWorker()
    worker.inside = inside  # type: ignore[attr-defined]
    assert await worker.rock_traced(TRACE, "inside") == (TRACE, "-")


def test_the_log_handler_is_installed_once_and_prints_the_trace_id():
    handler = install_logging()
    assert install_logging() is handler
    assert logging.getLogger("rock_serve").handlers.count(handler) == 1
    token = TRACE_ID.set(TRACE)
    try:
        record = log.makeRecord(log.name, logging.INFO, __file__, 1, "hello %s", ("you",), None)
        assert handler.filter(record)
    finally:
        TRACE_ID.reset(token)
    assert handler.format(record).endswith(
        f"rock_serve.deployments.test_trace trace={TRACE} hello you"
    )


# ------------------------------------------------------------------ reaps chart (issue 17.1)


def _status(name: str, reaped: dict[str, int]) -> WorkerStatus:
    return WorkerStatus(
        name=name,
        node_id="n" * 12,
        alive=True,
        sandboxes=0,
        capacity=4,
        runtime="fake",
        reaped=reaped,
    )


def test_reap_deltas_per_interval_survive_new_and_restarted_workers():
    deltas = ReapDeltas()
    assert deltas.step([_status("a", {"ttl_expired": 2})]) == {"ttl_expired": 2}
    assert deltas.step([_status("a", {"ttl_expired": 2})]) == {}
    step = deltas.step(
        [_status("a", {"ttl_expired": 3, "lease_expired": 1}), _status("b", {"leftover": 1})]
    )
    assert step == {"ttl_expired": 1, "lease_expired": 1, "leftover": 1}
    # "a" restarted: its counts start again from zero.
    assert deltas.step([_status("a", {"ttl_expired": 1}), _status("b", {"leftover": 1})]) == {
        "ttl_expired": 1
    }


def test_the_worker_metrics_count_reaps_by_reason_and_samples_keep_them():
    recorder = metrics("worker", "w1", "fake")
    recorder.reaped("ttl_expired")
    recorder.reaped("ttl_expired", 2)
    recorder.reaped("adopted", 0)  # counts nothing
    assert recorder.reaped_counts == {"ttl_expired": 3}
    samples = Samples(interval=1)
    assert samples.take({"paused": 1}, {"ttl_expired": 3}).reaped == {"ttl_expired": 3}
    assert samples.take({}).reaped == {}


class PlainActor:
    async def hello(self) -> str:
        return TRACE_ID.get()


async def test_an_actor_without_rock_traced_is_called_directly_under_a_trace():
    handle = Handle(PlainActor())
    token = TRACE_ID.set(TRACE)
    try:
        assert await call(handle, "hello") == "-"  # another process: no trace id arrives
    finally:
        TRACE_ID.reset(token)
    assert handle.calls == ["hello"]
