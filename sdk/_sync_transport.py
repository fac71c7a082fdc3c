# Generated from _async_transport.py by scripts/unasync.py: edit the async file, then regenerate.
"""Transports of the synchronous client: how one REST v1 call reaches the platform.

As with httpx's transports, :class:`~rock_serve.sdk.Client` builds every request with the
sans-IO core (a :class:`~rock_serve.sdk._base.Call`), then hands it to one transport and only
maps errors and retries. A transport implements :class:`Transport`: ``send`` one call and
return the reply (streamed when asked), ``close``.

- :class:`AdminTransport`: everything through the platform's URL (Serve proxy -> Admin).
- :class:`DirectTransport`: a sandbox's data-plane calls (exec, sessions, files, archives,
  stats, renew) straight to the node that holds it, with a short-lived token scoped to that
  sandbox (asked once from the Admin: ``POST /v1/sandboxes/{id}/dataplane``); everything else,
  and every call when the node cannot be reached, through the Admin (mode ``"auto"``; mode
  ``"direct"`` raises instead of falling back).
- The Ray transport (``Client.from_ray``) lives with the server code and plugs in through
  the ``rock_serve.sdk.transports`` entry point.

The sync module is generated from this one by ``scripts/unasync.py``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Literal
from urllib.parse import unquote, urlsplit

import httpx

from rock_serve.errors import InternalError, RockError, from_body
from rock_serve.protocol import SessionRunResult
from rock_serve.protocol.dataplane import (
    BatchRunItem,
    BatchRunReply,
    BatchRunRequest,
    DataPlaneGrant,
)
from rock_serve.sdk import _base

__all__ = [
    "AdminTransport",
    "DirectTransport",
    "SpreadTransport",
    "Transport",
    "DataPlaneMode",
]

#: ``auto``: direct when the node answers, else the Admin; ``direct``: only direct (errors
#: raise); ``admin``: never direct.
DataPlaneMode = Literal["auto", "direct", "admin"]
#: Seconds an unreachable node (or a sandbox without a grant) is left to the Admin path.
RETRY_DIRECT_AFTER = 30.0
#: A grant is renewed when less than this share of its lifetime is left.
_RENEW_SHARE = 0.2
#: Grants kept (one per sandbox in use).
_GRANTS = 10_000
_LOOPBACK = ("127.", "localhost", "[::1]", "::1")


#: Requests in flight one connection pool takes before :class:`SpreadTransport` opens
#: another, and the most pools it opens.
SPREAD_PER_POOL = 8
SPREAD_MAX_POOLS = 64
#: Each pool's connection limits: no cap on connections (the server bounds what it accepts),
#: and keep-alive for as many as a trainer keeps busy.
LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=256)


class SpreadTransport(httpx.BaseTransport):
    """httpx's HTTP transport over several connection pools, each with a few requests in flight.

    httpcore's pool (1.0.9) walks all of its connections, once per idle connection, each time a
    request is added or finishes: its cost per request grows with the square of the requests in
    flight. With 64 sandboxes stepped at once through one pool, the SDK spent 6.9 ms of CPU per
    request in that walk and the direct data plane fell from 545 ops/s at 16 clients to 134 at
    64 (``bench/throughput.py --profile``). Here a request goes to the pool with the fewest in
    flight, and a new pool opens only when every open one has ``per_pool``: the walk stays short
    and a client that sends one request at a time keeps one pool and its keep-alive connections.
    """

    def __init__(
        self,
        *,
        limits: httpx.Limits,
        per_pool: int = SPREAD_PER_POOL,
        max_pools: int = SPREAD_MAX_POOLS,
    ) -> None:
        """Pools open on demand; they share one TLS context (made here, once).

        Args:
            limits: Each pool's connection limits.
            per_pool: Requests in flight in a pool before another pool opens.
            max_pools: Pools at most; past them the least busy pool takes the request.
        """
        self._limits = limits
        self._per_pool = per_pool
        self._max_pools = max_pools
        self._tls = httpx.create_ssl_context()
        self._pools: list[httpx.HTTPTransport] = []
        self._busy: list[int] = []
        self._lock = threading.Lock()  # the sync twin is used from many threads

    @property
    def pools(self) -> int:
        """The pools opened so far."""
        return len(self._pools)

    @property
    def in_flight(self) -> tuple[int, ...]:
        """Requests in flight in each pool (a streamed one counts until its body is closed)."""
        with self._lock:
            return tuple(self._busy)

    def _take(self) -> int:
        with self._lock:
            i = min(range(len(self._busy)), key=self._busy.__getitem__, default=-1)
            if i < 0 or (self._busy[i] >= self._per_pool and len(self._pools) < self._max_pools):
                self._pools.append(httpx.HTTPTransport(verify=self._tls, limits=self._limits))
                self._busy.append(0)
                i = len(self._pools) - 1
            self._busy[i] += 1
            return i

    def _release(self, i: int) -> None:
        with self._lock:
            self._busy[i] -= 1

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the least busy pool; it counts until the body is closed."""
        i = self._take()
        try:
            response = self._pools[i].handle_request(request)
        except BaseException:
            self._release(i)
            raise
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Released(response.stream, lambda: self._release(i)),
            extensions=response.extensions,
        )

    def close(self) -> None:
        """Close every pool."""
        for pool in self._pools:
            pool.close()


class _Released(httpx.SyncByteStream):
    """A response body that calls ``done`` once, when it is closed."""

    def __init__(self, inner: httpx.SyncByteStream, done: Callable[[], None]) -> None:
        self._inner = inner
        self._done: Callable[[], None] | None = done

    def __iter__(self) -> Iterator[bytes]:
        return self._inner.__iter__()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            done, self._done = self._done, None
            if done is not None:
                done()


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host.startswith(_LOOPBACK) or host == "::1"


def _no_route(response: httpx.Response) -> bool:
    """Whether a node's 404 means "no such route here" (not "no such sandbox or file")."""
    try:
        error = json.loads(response.content).get("error") or {}
        return bool((error.get("details") or {}).get("dataplane") == "no_route")
    except (ValueError, AttributeError):
        return False


class Transport:
    """What a client sends through: one call in, one reply out.

    ``send`` returns the HTTP reply whatever its status (the client maps error replies to typed
    errors and retries); it raises ``httpx.TransportError`` when nothing came back.
    """

    def send(self, call: _base.Call, *, stream: bool = False) -> httpx.Response:
        """Send ``call``; with ``stream`` the body is left unread (close the reply)."""
        raise NotImplementedError

    def run_many(
        self, items: list[BatchRunItem], timeout: float | None
    ) -> list[SessionRunResult | RockError] | None:
        """Run ``items`` as a batch (one request or actor call per node) where this transport
        can; None where it cannot: the client then runs them one by one. ``timeout`` is the
        longest command timeout.
        """
        return None

    def close(self) -> None:
        """Release connections."""


class AdminTransport(Transport):
    """Every call through the platform's URL (the Serve proxy and the Admin)."""

    def __init__(
        self,
        settings: _base.ClientSettings,
        *,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """Open an ``httpx.Client`` on ``settings.base_url``.

        Args:
            settings: URL, token and timeout.
            headers: Extra headers sent with every request.
            transport: An httpx transport underneath (tests, proxies, ASGI apps).
        """
        self.settings = settings
        self.http = httpx.Client(
            base_url=settings.base_url,
            headers={**_base.default_headers(settings), **(headers or {})},
            timeout=settings.timeout,
            transport=transport or SpreadTransport(limits=LIMITS),
        )

    def send(self, call: _base.Call, *, stream: bool = False) -> httpx.Response:
        """Send ``call`` to the Admin."""
        request = self.http.build_request(**_base.request_kwargs(call, self.settings))
        return self.http.send(request, stream=stream)

    def close(self) -> None:
        """Close the connections."""
        self.http.close()


class DirectTransport(Transport):
    """Data-plane calls straight to the sandbox's node; the rest through the Admin."""

    def __init__(
        self,
        admin: AdminTransport,
        *,
        mode: DataPlaneMode = "auto",
        transport: httpx.BaseTransport | None = None,
        retry_direct_after: float = RETRY_DIRECT_AFTER,
    ) -> None:
        """Wrap the Admin transport (used for grants, control-plane calls and fallback).

        Args:
            admin: The Admin transport.
            mode: ``auto`` (fall back to the Admin), ``direct`` (never) or ``admin``.
            transport: An httpx transport underneath the direct connections (tests).
            retry_direct_after: Seconds an unreachable node is left alone before a new try.
        """
        self.admin = admin
        self.mode = mode
        self.retry_direct_after = retry_direct_after
        self.http = httpx.Client(
            headers={"User-Agent": admin.http.headers.get("User-Agent", "rock-serve-sdk")},
            timeout=admin.settings.timeout,
            transport=transport or SpreadTransport(limits=LIMITS),
        )
        self._grants: OrderedDict[str, tuple[DataPlaneGrant, float]] = OrderedDict()  # + renew_at
        self._skip: dict[str, float] = {}  # sandbox id or endpoint -> monotonic time to retry
        self._remote_admin = not _is_loopback(admin.settings.base_url)
        #: Calls sent directly and calls that fell back to the Admin (for tests and benches).
        self.direct_calls = 0
        self.fallbacks = 0

    @property
    def settings(self) -> _base.ClientSettings:
        """The Admin transport's settings."""
        return self.admin.settings

    def _skipped(self, key: str) -> bool:
        until = self._skip.get(key)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._skip[key]
            return False
        return True

    def _usable(self, grant: DataPlaneGrant) -> bool:
        if self.mode == "direct":
            return True
        if self._remote_admin and _is_loopback(grant.endpoint):
            return False  # a node on the platform's loopback is not reachable from here
        return not self._skipped(grant.endpoint)

    def grant(self, sandbox_id: str, *, fresh: bool = False) -> DataPlaneGrant | None:
        """The grant for ``sandbox_id`` (cached until near its expiry); None: use the Admin.

        Raises:
            RockError: mode ``direct`` and the Admin refused the grant.
        """
        if not fresh:
            known = self._grants.get(sandbox_id)
            if known is not None and time.time() < known[1]:
                return known[0] if self._usable(known[0]) else None
        if self.mode != "direct" and self._skipped(sandbox_id):
            return None
        response = self.admin.send(_base.dataplane_grant(sandbox_id))
        if not response.is_success:
            if self.mode == "direct":
                raise _base.error_from_response(response)
            self._skip[sandbox_id] = time.monotonic() + self.retry_direct_after
            return None
        grant = _base.parse(response, DataPlaneGrant)
        now = time.time()
        renew_at = now + (1 - _RENEW_SHARE) * max(0.0, grant.expires_at - now)
        self._grants[sandbox_id] = (grant, renew_at)
        self._grants.move_to_end(sandbox_id)
        while len(self._grants) > _GRANTS:
            self._grants.popitem(last=False)
        return grant if self._usable(grant) else None

    def forget(self, sandbox_id: str) -> None:
        """Drop what is known of a sandbox (it was deleted)."""
        self._grants.pop(sandbox_id, None)
        self._skip.pop(sandbox_id, None)

    def _request(self, call: _base.Call, grant: DataPlaneGrant) -> httpx.Request:
        kwargs = _base.request_kwargs(call, self.settings)
        kwargs["url"] = grant.endpoint + call.path
        kwargs["headers"]["Authorization"] = f"Bearer {grant.token}"
        return self.http.build_request(**kwargs)

    def send(self, call: _base.Call, *, stream: bool = False) -> httpx.Response:
        """Send a data-plane call to its node (or the Admin); others to the Admin."""
        sandbox_id = call.sandbox
        if sandbox_id is None or self.mode == "admin":
            if call.method == "DELETE" and call.path.count("/") == 3:  # /v1/sandboxes/{id}
                self.forget(unquote(call.path.rsplit("/", 1)[-1]))
            return self.admin.send(call, stream=stream)
        for attempt in range(2):
            grant = self.grant(sandbox_id, fresh=attempt > 0)
            if grant is None:
                break
            try:
                response = self.http.send(self._request(call, grant), stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if self.mode == "direct":
                    raise
                # Nothing reached the node: the Admin path is safe for any call. The node is left
                # alone a while, then a fresh grant says where it is (a restarted Worker moves).
                until = time.monotonic() + self.retry_direct_after
                self._skip[grant.endpoint] = self._skip[sandbox_id] = until
                self._grants.pop(sandbox_id, None)
                break
            if response.status_code in (404, 405):
                response.read()
                if _no_route(response):  # an operation this node does not serve: the Admin's
                    response.close()
                    break
            if response.status_code != 401 or attempt > 0:
                self.direct_calls += 1
                return response
            # Refused: the token ran out early or the node's secret changed. One fresh grant.
            response.close()
        self.fallbacks += 1
        return self.admin.send(call, stream=stream)

    def run_many(
        self, items: list[BatchRunItem], timeout: float | None
    ) -> list[SessionRunResult | RockError] | None:
        """Run ``items`` (their ``token`` fields are filled in here) with one request per node;
        None when some sandbox has no usable grant or a node cannot be reached (the caller then
        goes through the Admin). ``timeout`` is the longest command timeout.
        """
        if self.mode == "admin":
            return None
        by_node: dict[str, list[int]] = {}
        filled: list[BatchRunItem] = []
        for index, item in enumerate(items):
            grant = self.grant(item.sandbox_id)
            if grant is None:
                return None
            filled.append(item.model_copy(update={"token": grant.token}))
            by_node.setdefault(grant.endpoint, []).append(index)
        outcomes: list[SessionRunResult | RockError | None] = [None] * len(items)
        for endpoint, indexes in by_node.items():
            body = BatchRunRequest(items=[filled[i] for i in indexes])
            try:
                response = self.http.post(
                    f"{endpoint}/v1/dataplane/batch",
                    content=body.model_dump_json(),
                    headers={"Content-Type": "application/json"},
                    timeout=httpx.Timeout(
                        self.settings.timeout, read=_base.command_read_timeout(timeout)
                    ),
                )
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if self.mode == "direct":
                    raise
                self._skip[endpoint] = time.monotonic() + self.retry_direct_after
                return None
            if not response.is_success:
                raise _base.error_from_response(response)
            reply = _base.parse(response, BatchRunReply)
            for index, outcome in zip(indexes, reply.outcomes, strict=True):
                if outcome.result is not None:
                    outcomes[index] = outcome.result
                else:
                    outcomes[index] = from_body({"error": outcome.error})
        self.direct_calls += len(by_node)
        return [o if o is not None else InternalError("no outcome") for o in outcomes]

    def close(self) -> None:
        """Close the direct and the Admin connections."""
        self.http.close()
        self.admin.close()
