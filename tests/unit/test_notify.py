"""The watcher and its webhook: against a real HTTP receiver on loopback (no Ray)."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from rock_serve.config import NotifyConfig, parse_server_args
from rock_serve.deployments._metrics import Metrics
from rock_serve.deployments._notify import Watcher, Webhook, sign
from rock_serve.protocol import (
    Health,
    SandboxList,
    SandboxRecord,
    SandboxState,
    WebhookEvent,
    WorkerStatus,
)

SECRET = "s3cret-key"


@dataclass
class Receiver:
    url: str
    calls: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    fail_first: int = 0
    status: int = 503


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver(url="")

    async def hook(request: web.Request) -> web.Response:
        state.calls.append((dict(request.headers), await request.read()))
        if len(state.calls) <= state.fail_first:
            return web.Response(status=state.status)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}/hook"
    yield state
    await runner.cleanup()


def _config(url: str, **extra: Any) -> NotifyConfig:
    return NotifyConfig(webhook_url=url, secret_env="TEST_HOOK_SECRET", **extra)


def _event() -> WebhookEvent:
    return WebhookEvent(type="worker.lost", delivery="d-1", at=1.0, platform="p")


async def _no_sleep(_: float) -> None:
    return None


async def test_the_body_is_signed_and_verifiable(receiver):
    hook = Webhook(_config(receiver.url), environ={"TEST_HOOK_SECRET": SECRET})
    try:
        assert await hook.send(_event())
    finally:
        await hook.aclose()
    [(headers, body)] = receiver.calls
    expected = hmac.new(
        SECRET.encode(), headers["X-Rock-Timestamp"].encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    assert headers["X-Rock-Signature"] == f"sha256={expected}"
    assert headers["X-Rock-Event"] == "worker.lost"
    assert WebhookEvent.model_validate_json(body) == _event()
    assert sign(b"k", "1", b"x") != sign(b"k", "2", b"x")  # the timestamp is signed too


async def test_failures_are_retried_with_backoff_then_given_up(receiver):
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    receiver.fail_first = 2
    hook = Webhook(_config(receiver.url, retries=3, backoff_seconds=0.5), sleep=sleep, environ={})
    try:
        assert await hook.send(_event())
        assert len(receiver.calls) == 3
        assert delays == [0.5, 1.0]
        assert len({h["X-Rock-Delivery"] for h, _ in receiver.calls}) == 1  # the same event
        assert "X-Rock-Signature" not in receiver.calls[0][0]  # no key: unsigned
        receiver.calls.clear()
        receiver.fail_first, receiver.status = 10, 400  # a 4xx is not retried
        assert not await hook.send(_event())
        assert len(receiver.calls) == 1
    finally:
        await hook.aclose()
    dead = Webhook(_config("http://127.0.0.1:9/hook", retries=2), sleep=_no_sleep, environ={})
    try:
        assert not await dead.send(_event())  # connection refused, three times
    finally:
        await dead.aclose()


class FakeScheduler:
    """The watcher's seam: what the Scheduler would answer."""

    def __init__(self) -> None:
        self.records: list[SandboxRecord] = []
        self.workers = [_worker("w1", True), _worker("w2", True)]

    async def list(self) -> SandboxList:
        return SandboxList(items=list(self.records))

    async def health(self) -> Health:
        return Health(status="ok", version="0", workers=list(self.workers))

    async def admission(self) -> dict[str, int]:
        return {"queued": 3, "in_flight": 1}


def _worker(name: str, alive: bool) -> WorkerStatus:
    return WorkerStatus(
        name=name, node_id=name, alive=alive, sandboxes=0, capacity=4, runtime="local"
    )


def _record(sid: str, state: SandboxState, **extra: Any) -> SandboxRecord:
    return SandboxRecord(
        id=f"sb-abcdefabcdef-{sid}",
        state=state,
        worker="abcdefabcdef",
        node_id="n",
        created_at=1.0,
        namespace="team-a",
        **extra,
    )


class Gauges(Metrics):
    """Metrics that remember the cluster gauges (outside Ray they export nothing)."""

    def __init__(self) -> None:
        super().__init__("watcher")
        self.last: tuple[Any, ...] = ()

    def cluster(self, *values: Any) -> None:
        self.last = values


async def test_the_watcher_reports_new_failures_and_lost_workers_once(receiver):
    scheduler = FakeScheduler()
    scheduler.records = [_record("0000000000000001", SandboxState.FAILED)]  # old news
    args = parse_server_args(
        {
            "namespace": "plat",
            "reap_interval_seconds": 5,
            "notify": _config(receiver.url).model_dump(),
        }
    )
    now = [1000.0]
    gauges = Gauges()
    webhook = Webhook(args.notify, environ={"TEST_HOOK_SECRET": SECRET})
    watcher = Watcher(args, scheduler, webhook=webhook, recorder=gauges, clock=lambda: now[0])
    try:
        assert await watcher.tick() == []  # the baseline is not reported
        scheduler.records.append(
            _record("0000000000000002", SandboxState.FAILED, reason="oom_killed", owner="me")
        )
        scheduler.records.append(
            _record("0000000000000003", SandboxState.RUNNING, expires_at=980.0)
        )
        scheduler.records.append(
            _record("0000000000000004", SandboxState.RUNNING, lease_expires_at=999.0)
        )
        scheduler.workers[1] = _worker("w2", False)
        events = await watcher.tick()
        assert sorted(e.type for e in events) == ["sandbox.failed", "worker.lost"]
        failed = next(e for e in events if e.type == "sandbox.failed")
        assert failed.sandbox is not None and failed.sandbox.reason == "oom_killed"
        assert failed.platform == "plat"
        # 980 + 2 * 5 < 1000: overdue by TTL; the lease ran out 1 s ago: within the grace.
        assert gauges.last == (1, 1, 3, 1, {"ttl": 1, "lease": 0})
        assert await watcher.tick() == []  # nothing new: nothing sent again
        await watcher.flush()
        assert watcher.sent == 2
        bodies = [json.loads(body) for _, body in receiver.calls]
        assert sorted(b["type"] for b in bodies) == ["sandbox.failed", "worker.lost"]
    finally:
        await watcher.aclose()
