"""The watcher: cluster gauges for alerts, a signed webhook on failed sandboxes and lost Workers.

One detached actor per platform (``rock-watcher``, on the head node like the Scheduler), so
each event is sent once however many Admin replicas run. Every ``notify.watch_interval_seconds`` it
asks the Scheduler for the sandboxes, the Workers' health and the admission queue, then:

- sets ``rock_workers{state}``, ``rock_admission{kind}`` and ``rock_overdue_sandboxes{kind}``
  (sandboxes still listed more than two reap intervals past their TTL or lease: reaper lag);
- for each sandbox that newly entered ``failed`` and each Worker that went from alive to not,
  POSTs a :class:`~rock_serve.protocol.WebhookEvent` to ``notify.webhook_url``.

Webhook calls are signed (HMAC-SHA256 over ``"<timestamp>.<body>"`` with the key from the
environment variable ``notify.secret_env``, never from the config file), retried with
exponential backoff on connection errors, 429 and 5xx, and sent from a bounded queue so a
slow receiver never holds up the watch. What was already failed or dead when the watcher
started is not reported (a restarted watcher does not repeat old news).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import httpx
import ray

from rock_serve.config import NotifyConfig, ServerArgs
from rock_serve.deployments._metrics import Metrics, metrics
from rock_serve.deployments._ray import ActorHandle, call, get_or_create_scheduler
from rock_serve.deployments._trace import untraced_task
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.errors import RockError
from rock_serve.protocol import ConsoleRow, Health, SandboxList, SandboxState, WebhookEvent
from rock_serve.runtime._sync import run_sync

__all__ = ["WATCHER_NAME", "SchedulerView", "Watcher", "Webhook", "sign", "start_watcher"]

log = logging.getLogger(__name__)

WATCHER_NAME = "rock-watcher"
_HEAD_RESOURCE = "node:__internal_head__"
#: Events waiting to be sent; beyond this the oldest are dropped (and logged).
_QUEUE = 1000
_MAX_BACKOFF = 30.0


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Rock-Signature`` value of a body: ``sha256=<hex>``."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


class Webhook:
    """POSTs events to one URL, signed, with retries."""

    def __init__(
        self,
        config: NotifyConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
        environ: dict[str, str] | None = None,
    ) -> None:
        """Read the key from ``config.secret_env`` (unsigned, with a warning, when unset)."""
        self.config = config
        env = os.environ if environ is None else environ
        secret = env.get(config.secret_env, "")
        self._secret = secret.encode() if secret else None
        if config.webhook_url and self._secret is None:
            log.warning("notify: %s is not set: webhook bodies go unsigned", config.secret_env)
        self._sleep = sleep
        self._client = httpx.AsyncClient(timeout=config.timeout_seconds, transport=transport)

    async def send(self, event: WebhookEvent) -> bool:
        """Deliver one event (retrying); True when the receiver answered 2xx."""
        url = self.config.webhook_url
        if not url:
            return False
        body = event.model_dump_json().encode()
        delay = self.config.backoff_seconds
        for attempt in range(self.config.retries + 1):
            timestamp = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "rock-serve-webhook",
                "X-Rock-Event": event.type,
                "X-Rock-Delivery": event.delivery,
                "X-Rock-Timestamp": timestamp,
            }
            if self._secret is not None:
                headers["X-Rock-Signature"] = sign(self._secret, timestamp, body)
            try:
                resp = await self._client.post(url, content=body, headers=headers)
                if 200 <= resp.status_code < 300:
                    return True
                retry = resp.status_code == 429 or resp.status_code >= 500
                problem = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                retry, problem = True, type(exc).__name__
            if not retry or attempt == self.config.retries:
                log.error(
                    "notify: %s %s not delivered after %d attempt(s): %s",
                    event.type,
                    event.delivery,
                    attempt + 1,
                    problem,
                )
                return False
            await self._sleep(delay)
            delay = min(delay * 2, _MAX_BACKOFF)
        return False  # pragma: no cover - the loop always returns

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


class SchedulerView(Protocol):
    """What the watcher asks the Scheduler (the seam its tests fake)."""

    async def list(self) -> SandboxList:
        """Every sandbox."""
        ...

    async def health(self) -> Health:
        """Workers' status."""
        ...

    async def admission(self) -> dict[str, int]:
        """Creates queued and in flight."""
        ...


class _ActorView:
    """:class:`SchedulerView` over the Scheduler actor."""

    def __init__(self, actor: ActorHandle) -> None:
        self._actor = actor

    async def list(self) -> SandboxList:
        result: SandboxList = await call(self._actor, Scheduler.list, None, None, {}, None)
        return result

    async def health(self) -> Health:
        result: Health = await call(self._actor, Scheduler.health)
        return result

    async def admission(self) -> dict[str, int]:
        result: dict[str, int] = await call(self._actor, Scheduler.admission)
        return result


class Watcher:
    """Watches the platform through the Scheduler; see the module docstring."""

    def __init__(
        self,
        args: ServerArgs,
        scheduler: SchedulerView | None = None,
        *,
        webhook: Webhook | None = None,
        recorder: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Watch the platform of ``args`` (the Scheduler actor unless ``scheduler`` is given)."""
        self.args = args
        self._scheduler = scheduler
        self._webhook = webhook or Webhook(args.notify)
        self._metrics = recorder or metrics("watcher")
        self._clock = clock
        self._failed: set[str] | None = None
        self._dead: set[str] | None = None
        self._queue: asyncio.Queue[WebhookEvent] = asyncio.Queue(_QUEUE)
        self._tasks: list[asyncio.Task[None]] = []
        self.sent = 0

    async def _view(self) -> SchedulerView:
        if self._scheduler is None:
            actor = await run_sync(get_or_create_scheduler, self.args)
            self._scheduler = _ActorView(actor)
        return self._scheduler

    def configure(self, args: ServerArgs) -> None:
        """Take a redeploy's settings (webhook URL, key, retries, interval)."""
        if args.notify != self.args.notify:
            old = self._webhook
            self._webhook = Webhook(args.notify)
            self._tasks.append(asyncio.ensure_future(old.aclose()))
        self.args = args

    def start(self) -> None:
        """Run the watch and the sender (once; later calls do nothing)."""
        if not self._tasks or all(t.done() for t in self._tasks):
            self._tasks = [
                untraced_task(self._watch()),  # long-lived: not under a call's trace
                untraced_task(self._send()),
            ]

    async def _watch(self) -> None:
        while True:
            try:
                await self.tick()
            except RockError as exc:
                log.warning("watcher: the Scheduler did not answer: %s", exc)
            except Exception:
                log.exception("watcher: tick failed")
            await asyncio.sleep(self.args.notify.watch_interval_seconds)

    async def _send(self) -> None:
        while True:
            event = await self._queue.get()
            if await self._webhook.send(event):
                self.sent += 1

    def _emit(self, event: WebhookEvent) -> None:
        if not self.args.notify.webhook_url:
            return
        if self._queue.full():
            dropped = self._queue.get_nowait()
            log.error("watcher: webhook queue full, dropped %s %s", dropped.type, dropped.delivery)
        self._queue.put_nowait(event)

    async def tick(self) -> list[WebhookEvent]:
        """Look once: set the gauges and queue events for what changed; returns the events."""
        view = await self._view()
        listed, health, admission = await asyncio.gather(
            view.list(), view.health(), view.admission()
        )
        now = self._clock()
        grace = 2 * self.args.reap_interval_seconds
        overdue = {"ttl": 0, "lease": 0}
        failed: dict[str, ConsoleRow] = {}
        for record in listed.items:
            if record.state == SandboxState.FAILED:
                failed[record.id] = ConsoleRow.of(record)
            elif record.state in (SandboxState.RUNNING, SandboxState.STARTING):
                if record.expires_at is not None and record.expires_at + grace < now:
                    overdue["ttl"] += 1
                elif record.lease_expires_at is not None and record.lease_expires_at + grace < now:
                    overdue["lease"] += 1
        dead = {w.name: w for w in health.workers if not w.alive}
        alive = len(health.workers) - len(dead)
        self._metrics.cluster(
            alive, len(dead), admission.get("queued", 0), admission.get("in_flight", 0), overdue
        )
        events: list[WebhookEvent] = []
        platform = self.args.namespace
        if self._failed is not None:
            for sandbox_id in failed.keys() - self._failed:
                events.append(
                    WebhookEvent(
                        type="sandbox.failed",
                        delivery=uuid.uuid4().hex,
                        at=now,
                        platform=platform,
                        sandbox=failed[sandbox_id],
                    )
                )
        if self._dead is not None:
            for name in dead.keys() - self._dead:
                events.append(
                    WebhookEvent(
                        type="worker.lost",
                        delivery=uuid.uuid4().hex,
                        at=now,
                        platform=platform,
                        worker=dead[name],
                    )
                )
        self._failed = set(failed)
        self._dead = set(dead)
        for event in events:
            log.warning("watcher: %s (delivery %s)", event.type, event.delivery)
            self._emit(event)
        return events

    async def flush(self) -> None:
        """Send everything queued now (tests; the sender task does it otherwise)."""
        while not self._queue.empty():
            if await self._webhook.send(self._queue.get_nowait()):
                self.sent += 1

    async def aclose(self) -> None:
        """Stop watching and close the webhook client."""
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._webhook.aclose()


def _get_or_create_watcher(args: ServerArgs) -> ActorHandle:
    cls = ray.remote(Watcher)
    return cls.options(
        name=WATCHER_NAME,
        namespace=args.namespace,
        get_if_exists=True,
        lifetime="detached",
        num_cpus=0,
        max_concurrency=100,
        max_restarts=-1,
        max_task_retries=0,
        resources={_HEAD_RESOURCE: 0.001},
    ).remote(args)


def start_watcher(args: ServerArgs) -> None:
    """Get or create the platform's watcher, give it ``args`` and start it (from the Admin)."""
    actor = _get_or_create_watcher(args)
    actor.configure.remote(args)
    actor.start.remote()
