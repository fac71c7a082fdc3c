"""The Scheduler's state store: sandbox registry, idempotency tokens and tombstones.

Two backends behind one :class:`StateStore` interface, chosen by :func:`open_store`:

- :class:`MemoryStore` (``state.redis_url`` unset): dicts in the Scheduler's process, with an
  injectable clock. Lost with the process; the Scheduler then rebuilds from the Workers.
- :class:`RedisStore`: Redis through ``redis.asyncio`` (a connection pool, short socket
  timeouts, a health-check PING on idle connections). It survives Scheduler restarts, and two
  Scheduler processes may share it: token claims are atomic on the server.

Redis key layout (``<p>`` is ``state.key_prefix``, ``rock`` by default):

=================================  ======  ====================================================
key                                type    value
=================================  ======  ====================================================
``<p>:sandboxes``                  hash    sandbox id -> ``SandboxRecord`` JSON. ``put``/``get``
                                           are one HSET/HGET, ``put_many`` one pipeline, ``load``
                                           an HSCAN (one round trip per ~1,000 records).
``<p>:token:<sha256(token) hex>``  string  id of the sandbox the client token is bound to;
                                           expires (PX) after the claim's ttl. Hashed: a token is
                                           client-chosen text, never a key name.
``<p>:tombstone:<sandbox id>``     string  ``1``; expires (PX) after the tombstone's ttl.
``<p>:docs:<kind>``                hash    key -> JSON of small documents (``snapshots``).
=================================  ======  ====================================================

Records are written with ``model_dump_json`` and read with ``model_validate_json``; a stored
value that does not parse (corrupt, or written by an incompatible version) is logged and
skipped, so recovery never fails on one bad record. The memory store keeps the same JSON, so
neither backend hands out objects that alias what it stores.

Failures: when Redis cannot be reached, times out, is loading or refuses writes, every call
raises :class:`~rock_serve.errors.RuntimeUnavailable` (503, with ``retry_after``), each round
trip within ``state.call_timeout_seconds`` (2 s by default); ``ping`` answers False instead.
Once Redis is back the same store object works again (redis-py reconnects; Lua scripts are
re-sent when Redis lost them).
This module never imports ``ray``, and imports ``redis`` only when a Redis store is opened.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import heapq
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError

from rock_serve.config import StateConfig
from rock_serve.errors import InternalError, InvalidConfig, InvalidRequest, RuntimeUnavailable
from rock_serve.protocol import SandboxRecord

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["MemoryStore", "RedisStore", "StateStore", "open_store"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Retry-After (seconds) sent with RuntimeUnavailable when the store cannot be reached.
_RETRY_AFTER = 1.0
#: Most seconds a call waits for a free pooled connection (all busy) before it fails.
_POOL_WAIT = 5.0
#: Records per HSET inside put_many's pipeline (keeps each command a bounded size).
_CHUNK = 500
#: Extra seconds bulk calls get per record written (put_many) on top of call_timeout_seconds.
_PER_RECORD = 0.001
#: COUNT hint of load()'s HSCAN: records per round trip.
_SCAN_COUNT = 1000
#: Error replies of a Redis that is up but cannot serve right now (an unavailability, not a bug).
_TRANSIENT_REPLIES = (
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "TRYAGAIN",
    "MISCONF",
    "OOM",
    "NOREPLICAS",
    "BUSY",
    "CLUSTERDOWN",
)

# Atomically bind KEYS[1] to ARGV[1] for ARGV[2] ms unless bound: nil when it is bound to
# ARGV[1] (now, or already: a claim re-sent after a lost reply), else the id it is bound to.
_CLAIM_LUA = """
local bound = redis.call('GET', KEYS[1])
if bound == ARGV[1] then return false end
if bound then return bound end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# Delete KEYS[1] only while it is bound to ARGV[1] (compare-and-delete).
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class StateStore(Protocol):
    """Where the Scheduler keeps records, idempotency tokens and tombstones.

    Every method raises :class:`~rock_serve.errors.RuntimeUnavailable` when the backend cannot
    be reached (except :meth:`ping`, which answers False), and
    :class:`~rock_serve.errors.InvalidRequest` for a ttl that is not positive.
    """

    name: str
    """Backend name: ``memory`` or ``redis``."""

    async def load(self) -> list[SandboxRecord]:
        """Every stored record (registry recovery after a Scheduler restart)."""
        ...

    async def put(self, record: SandboxRecord) -> None:
        """Insert or replace the record with ``record.id``."""
        ...

    async def get(self, sandbox_id: str) -> SandboxRecord | None:
        """The record with this id, or None."""
        ...

    async def delete(self, sandbox_id: str) -> None:
        """Forget a record (no error when there is none)."""
        ...

    async def put_many(self, records: list[SandboxRecord]) -> None:
        """Upsert many records in one round trip (the periodic lease/state flush)."""
        ...

    async def claim_token(self, token: str, sandbox_id: str, ttl: float) -> str | None:
        """Bind ``token`` to ``sandbox_id`` for ``ttl`` seconds unless it is bound already.

        Atomic, also between processes sharing a Redis. Claiming again with the id the token
        is bound to answers None too (and keeps the first expiry): so a claim re-sent after a
        lost reply cannot mistake its own binding for someone else's.

        Returns:
            None when the token is (now) bound to ``sandbox_id``; else the other sandbox id
            it is bound to.
        """
        ...

    async def release_token(self, token: str, sandbox_id: str | None = None) -> None:
        """Unbind ``token``; when ``sandbox_id`` is given, only while bound to that id."""
        ...

    async def token_of(self, token: str) -> str | None:
        """The sandbox id ``token`` is bound to, or None."""
        ...

    async def tombstone(self, sandbox_id: str, ttl: float) -> None:
        """Mark a deleted id, so syncs ignore it for ``ttl`` seconds."""
        ...

    async def is_tombstoned(self, sandbox_id: str) -> bool:
        """True while the id's tombstone lasts."""
        ...

    async def doc_put(self, kind: str, key: str, data: str) -> None:
        """Insert or replace one JSON document of ``kind`` (e.g. ``snapshots``)."""
        ...

    async def doc_delete(self, kind: str, key: str) -> None:
        """Forget one document (no error when there is none)."""
        ...

    async def docs(self, kind: str) -> dict[str, str]:
        """Every document of ``kind``: key -> JSON."""
        ...

    async def ping(self) -> bool:
        """True when the backend answers (never raises)."""
        ...

    async def close(self) -> None:
        """Release connections (idempotent); later calls raise RuntimeUnavailable."""
        ...


def open_store(config: StateConfig) -> StateStore:
    """The store ``config`` names: Redis when ``redis_url`` is set, else memory.

    Opening does not connect: the first call does (and :meth:`StateStore.ping` checks).

    Raises:
        InvalidConfig: ``redis_url`` is set but the ``redis`` package is not installed, or
            the URL cannot be used.
    """
    if config.redis_url is None:
        return MemoryStore()
    return RedisStore(config)


def _check_ttl(ttl: float) -> None:
    if not (ttl > 0 and math.isfinite(ttl)):
        raise InvalidRequest(f"ttl must be a positive number of seconds, not {ttl!r}")


def _parse(raw: str | bytes, sandbox_id: str, backend: str) -> SandboxRecord | None:
    """A stored record, or None (logged) when it does not parse or names another id."""
    try:
        record = SandboxRecord.model_validate_json(raw)
    except ValidationError as exc:
        log.warning(
            "state store (%s): skipping record %r that does not parse: %s",
            backend,
            sandbox_id,
            exc.errors(include_url=False, include_input=False)[:3],
        )
        return None
    if record.id != sandbox_id:
        log.warning(
            "state store (%s): skipping record stored under %r that names %r",
            backend,
            sandbox_id,
            record.id,
        )
        return None
    return record


async def _parse_all(
    raw: dict[str, str] | dict[str, bytes | str], backend: str
) -> list[SandboxRecord]:
    """Parse stored records, skipping (logged) the ones that do not parse.

    Parsing costs about 40 us a record: yield to the event loop every few hundred.
    """
    records = []
    for n, (sandbox_id, value) in enumerate(raw.items(), 1):
        record = _parse(value, sandbox_id, backend)
        if record is not None:
            records.append(record)
        if n % _CHUNK == 0:
            await asyncio.sleep(0)
    return records


class MemoryStore:
    """The in-process store; ``clock`` (seconds, monotonic) decides token/tombstone expiry."""

    name: str = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._records: dict[str, str] = {}  # id -> record JSON
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (sandbox id, expires at)
        self._tombstones: dict[str, float] = {}  # sandbox id -> expires at
        self._docs: dict[str, dict[str, str]] = {}  # kind -> key -> JSON
        #: (expires at, kind, key) of every token/tombstone set: expired entries leave in order.
        self._expiry: list[tuple[float, str, str]] = []
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise RuntimeUnavailable("state store (memory) is closed", retry_after=_RETRY_AFTER)

    def _expire(self) -> float:
        """Drop expired tokens and tombstones; returns now."""
        now = self._clock()
        while self._expiry and self._expiry[0][0] <= now:
            at, kind, key = heapq.heappop(self._expiry)
            if kind == "token":
                entry = self._tokens.get(key)
                if entry is not None and entry[1] == at:
                    del self._tokens[key]
            elif self._tombstones.get(key) == at:
                del self._tombstones[key]
        return now

    async def load(self) -> list[SandboxRecord]:
        """Every stored record."""
        self._check()
        return await _parse_all(dict(self._records), self.name)

    async def put(self, record: SandboxRecord) -> None:
        """Insert or replace the record with ``record.id``."""
        self._check()
        self._records[record.id] = record.model_dump_json()

    async def get(self, sandbox_id: str) -> SandboxRecord | None:
        """The record with this id, or None."""
        self._check()
        raw = self._records.get(sandbox_id)
        return None if raw is None else _parse(raw, sandbox_id, self.name)

    async def delete(self, sandbox_id: str) -> None:
        """Forget a record (no error when there is none)."""
        self._check()
        self._records.pop(sandbox_id, None)

    async def put_many(self, records: list[SandboxRecord]) -> None:
        """Upsert many records."""
        self._check()
        self._records.update((r.id, r.model_dump_json()) for r in records)

    async def claim_token(self, token: str, sandbox_id: str, ttl: float) -> str | None:
        """Bind ``token`` to ``sandbox_id`` unless bound to another id (then return that id)."""
        self._check()
        _check_ttl(ttl)
        now = self._expire()
        bound = self._tokens.get(token)
        if bound is not None:
            return None if bound[0] == sandbox_id else bound[0]
        expires_at = now + ttl
        self._tokens[token] = (sandbox_id, expires_at)
        heapq.heappush(self._expiry, (expires_at, "token", token))
        return None

    async def release_token(self, token: str, sandbox_id: str | None = None) -> None:
        """Unbind ``token``; when ``sandbox_id`` is given, only while bound to that id."""
        self._check()
        self._expire()
        bound = self._tokens.get(token)
        if bound is not None and (sandbox_id is None or bound[0] == sandbox_id):
            del self._tokens[token]

    async def token_of(self, token: str) -> str | None:
        """The sandbox id ``token`` is bound to, or None."""
        self._check()
        self._expire()
        bound = self._tokens.get(token)
        return None if bound is None else bound[0]

    async def tombstone(self, sandbox_id: str, ttl: float) -> None:
        """Mark a deleted id for ``ttl`` seconds (a later call replaces the expiry)."""
        self._check()
        _check_ttl(ttl)
        expires_at = self._expire() + ttl
        self._tombstones[sandbox_id] = expires_at
        heapq.heappush(self._expiry, (expires_at, "tombstone", sandbox_id))

    async def is_tombstoned(self, sandbox_id: str) -> bool:
        """True while the id's tombstone lasts."""
        self._check()
        self._expire()
        return sandbox_id in self._tombstones

    async def doc_put(self, kind: str, key: str, data: str) -> None:
        """Insert or replace one document."""
        self._check()
        self._docs.setdefault(kind, {})[key] = data

    async def doc_delete(self, kind: str, key: str) -> None:
        """Forget one document."""
        self._check()
        self._docs.get(kind, {}).pop(key, None)

    async def docs(self, kind: str) -> dict[str, str]:
        """Every document of ``kind``."""
        self._check()
        return dict(self._docs.get(kind, {}))

    async def ping(self) -> bool:
        """True until closed."""
        return not self._closed

    async def close(self) -> None:
        """Drop everything; later calls raise RuntimeUnavailable."""
        self._closed = True
        self._records.clear()
        self._tokens.clear()
        self._tombstones.clear()
        self._expiry.clear()


def _text(value: bytes | str) -> str:
    """A Redis reply as text (replies are bytes: the client does not decode)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _redact(url: str) -> str:
    """The URL without its password (for logs and messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


class RedisStore:
    """The store in Redis (see the module docstring for the key layout)."""

    name: str = "redis"

    def __init__(self, config: StateConfig) -> None:
        if config.redis_url is None:
            raise InvalidConfig("state.redis_url is not set")
        try:
            from redis.asyncio import BlockingConnectionPool, Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError:  # pragma: no cover - the state extra is not installed
            raise InvalidConfig(
                "state.redis_url needs the redis package: pip install 'rock-serve[state]'"
            ) from None
        self.url = _redact(config.redis_url)
        prefix = config.key_prefix
        self._records_key = f"{prefix}:sandboxes"
        self._token_prefix = f"{prefix}:token:"
        self._tombstone_prefix = f"{prefix}:tombstone:"
        self._docs_prefix = f"{prefix}:docs:"
        self._timeout = config.call_timeout_seconds
        try:
            pool = BlockingConnectionPool.from_url(
                config.redis_url,
                max_connections=config.max_connections,
                timeout=_POOL_WAIT,
                socket_connect_timeout=config.socket_timeout_seconds,
                socket_timeout=config.socket_timeout_seconds,
                health_check_interval=config.health_check_interval_seconds,
                # One quick retry on a fresh connection: a pooled connection that died with a
                # Redis restart is replaced transparently, a dead Redis fails fast.
                retry=Retry(NoBackoff(), 1),
                client_name="rock-serve",
            )
        except ValueError as exc:
            raise InvalidConfig(f"bad state.redis_url {self.url}: {exc}") from None
        self._redis: Redis = Redis.from_pool(pool)
        self._claim: AsyncScript = self._redis.register_script(_CLAIM_LUA)
        self._release: AsyncScript = self._redis.register_script(_RELEASE_LUA)
        self._closed = False
        self._reachable = True  # log the transitions, not every failed call

    def _token_key(self, token: str) -> str:
        return (
            self._token_prefix + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
        )

    async def _call(
        self, op: str, make: Callable[[], Awaitable[T]], timeout: float | None = None
    ) -> T:
        """Run one Redis exchange with a deadline, translating failures to our errors."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError, ResponseError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if self._closed:
            raise RuntimeUnavailable("state store (redis) is closed", retry_after=_RETRY_AFTER)
        try:
            result = await asyncio.wait_for(make(), timeout or self._timeout)
        except (RedisConnectionError, RedisTimeoutError, asyncio.TimeoutError, OSError) as exc:
            raise self._unavailable(op, exc) from exc
        except ResponseError as exc:
            if str(exc).startswith(_TRANSIENT_REPLIES):
                raise self._unavailable(op, exc) from exc
            raise InternalError(f"state store (redis) {op} failed: {exc}") from exc
        except RedisError as exc:
            raise InternalError(f"state store (redis) {op} failed: {exc}") from exc
        if not self._reachable:
            self._reachable = True
            log.warning("state store (redis): %s answers again", self.url)
        return result

    def _unavailable(self, op: str, exc: BaseException) -> RuntimeUnavailable:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, asyncio.TimeoutError):
            reason = f"no reply within {self._timeout:g}s"
        if self._reachable:
            self._reachable = False
            log.warning("state store (redis): %s unavailable (%s: %s)", self.url, op, reason)
        return RuntimeUnavailable(
            f"state store (redis) unavailable: {reason}", retry_after=_RETRY_AFTER
        )

    async def load(self) -> list[SandboxRecord]:
        """Every stored record; records that do not parse are logged and skipped.

        HSCAN in batches of about 1,000 (one round trip per batch, 1-2 for a thousand
        records), not one HGETALL: every reply stays small enough for the socket timeout and
        Redis is never blocked for the whole registry.
        """
        found: dict[str, bytes | str] = {}
        cursor = 0
        while True:
            scan = functools.partial(
                self._redis.hscan, self._records_key, cursor, count=_SCAN_COUNT
            )
            cursor, batch = await self._call("load", scan)
            assert isinstance(batch, dict)  # field -> value (no_values is off)
            found.update((_text(k), v) for k, v in batch.items())  # a key may come twice
            if cursor == 0:
                break
        return await _parse_all(found, self.name)

    async def put(self, record: SandboxRecord) -> None:
        """Insert or replace the record with ``record.id`` (one HSET)."""
        data = record.model_dump_json()
        await self._call(
            "put",
            lambda: self._redis.hset(self._records_key, record.id, data),
        )

    async def get(self, sandbox_id: str) -> SandboxRecord | None:
        """The record with this id, or None (also when it does not parse: logged)."""
        raw = await self._call(
            "get",
            lambda: self._redis.hget(self._records_key, sandbox_id),
        )
        return None if raw is None else _parse(raw, sandbox_id, self.name)

    async def delete(self, sandbox_id: str) -> None:
        """Forget a record (no error when there is none)."""
        await self._call(
            "delete",
            lambda: self._redis.hdel(self._records_key, sandbox_id),
        )

    async def put_many(self, records: list[SandboxRecord]) -> None:
        """Upsert many records: one pipeline (one round trip) of HSETs of up to 500 each."""
        if not records:
            return
        pipe = self._redis.pipeline(transaction=False)
        for start in range(0, len(records), _CHUNK):
            chunk = records[start : start + _CHUNK]
            pipe.hset(self._records_key, mapping={r.id: r.model_dump_json() for r in chunk})
            await asyncio.sleep(0)  # serializing thousands of records: let others run
        await self._call("put_many", pipe.execute, self._timeout + _PER_RECORD * len(records))

    async def doc_put(self, kind: str, key: str, data: str) -> None:
        """HSET of ``<p>:docs:<kind>``."""
        await self._call("doc_put", lambda: self._redis.hset(self._docs_prefix + kind, key, data))

    async def doc_delete(self, kind: str, key: str) -> None:
        """HDEL of ``<p>:docs:<kind>``."""
        await self._call("doc_delete", lambda: self._redis.hdel(self._docs_prefix + kind, key))

    async def docs(self, kind: str) -> dict[str, str]:
        """HGETALL of ``<p>:docs:<kind>`` (kinds are small: snapshots, not sandboxes)."""
        raw: dict[Any, Any] = await self._call(
            "docs", lambda: self._redis.hgetall(self._docs_prefix + kind)
        )
        return {_text(k): _text(v) for k, v in raw.items()}

    async def claim_token(self, token: str, sandbox_id: str, ttl: float) -> str | None:
        """Bind ``token`` to ``sandbox_id`` unless bound to another id (one Lua script).

        Returns:
            None when the token is (now) bound to ``sandbox_id``; else the other id.
        """
        _check_ttl(ttl)
        key = self._token_key(token)
        ms = max(1, math.ceil(ttl * 1000))
        bound: bytes | None = await self._call(
            "claim_token", lambda: self._claim(keys=[key], args=[sandbox_id, ms])
        )
        return None if bound is None else _text(bound)

    async def release_token(self, token: str, sandbox_id: str | None = None) -> None:
        """Unbind ``token``; with ``sandbox_id``, only while bound to it (Lua compare-and-del)."""
        key = self._token_key(token)
        if sandbox_id is None:
            await self._call("release_token", lambda: self._redis.delete(key))
        else:
            await self._call("release_token", lambda: self._release(keys=[key], args=[sandbox_id]))

    async def token_of(self, token: str) -> str | None:
        """The sandbox id ``token`` is bound to, or None."""
        key = self._token_key(token)
        bound = await self._call("token_of", lambda: self._redis.get(key))
        return None if bound is None else _text(bound)

    async def tombstone(self, sandbox_id: str, ttl: float) -> None:
        """Mark a deleted id for ``ttl`` seconds (SET PX; a later call replaces the expiry)."""
        _check_ttl(ttl)
        key = self._tombstone_prefix + sandbox_id
        ms = max(1, math.ceil(ttl * 1000))
        await self._call("tombstone", lambda: self._redis.set(key, b"1", px=ms))

    async def is_tombstoned(self, sandbox_id: str) -> bool:
        """True while the id's tombstone lasts."""
        key = self._tombstone_prefix + sandbox_id
        found: int = await self._call("is_tombstoned", lambda: self._redis.exists(key))
        return found > 0

    async def ping(self) -> bool:
        """True when Redis answers PING within ``call_timeout_seconds``; never raises."""
        try:
            return bool(await self._call("ping", self._ping))
        except Exception:
            return False

    async def _ping(self) -> Any:
        return await self._redis.ping()

    async def close(self) -> None:
        """Close the client and its connection pool (idempotent)."""
        if self._closed:
            return
        self._closed = True
        await self._redis.aclose()
