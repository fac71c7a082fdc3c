"""One trace id from the Admin through the Scheduler and the Worker (issue 17.5).

The Admin's middleware sets :data:`TRACE_ID` per request (``_console.py``). When it is set,
``_ray.call`` sends an actor call as ``rock_traced(trace_id, method, *args, **kwargs)``
instead of ``method(*args, **kwargs)``; :class:`TracedActor` (a base of the Scheduler and the
Worker) sets :data:`TRACE_ID` in the actor for that call (asyncio copies it to the tasks the
call starts, so the Scheduler's own calls to a Worker carry it on) and runs the method.

Log lines: :func:`install_logging` gives the ``rock_serve`` loggers of the process a stderr
handler (in a Ray actor that is its ``worker-*.err`` file) whose lines carry
``trace=<id>`` (``-`` outside a traced call), and makes INFO visible there (Ray leaves the
root logger unconfigured in actors, so only WARNING would reach its last-resort handler).
Every record of the process also gets a ``trace_id`` attribute (:class:`TraceFilter`), for
structured handlers. Streams (``_ray.stream``) go through ``rock_traced_stream`` the same way,
and :func:`logged_stream` writes a stream's start and end under its trace id.

The context itself (:data:`TRACE_ID`, :data:`SPAN_ID`, :func:`untraced_task`, spans) lives in
``rock_serve._tracing``, so that the rocklet handle can put the trace id in its op frames.
A Ray call carries ``<trace id>[-<span id>]`` so the actor's span is a child of the caller's.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from rock_serve._tracing import (
    SPAN_ID,
    SPANS,
    TRACE_ID,
    new_trace_id,
    parent,
    set_parent,
    traced,
    untraced_task,
)
from rock_serve.errors import RockError

__all__ = [
    "SPANS",
    "SPAN_ID",
    "TRACED_METHOD",
    "TRACED_STREAM",
    "TRACE_ID",
    "TraceFilter",
    "TraceMiddleware",
    "TracedActor",
    "install_logging",
    "logged_stream",
    "new_trace_id",
    "parent",
    "request_ids",
    "traced",
    "untraced_task",
    "with_ids",
]

#: The actor method ``_ray.call`` uses to carry a trace id.
TRACED_METHOD = "rock_traced"
#: The actor method ``_ray.stream`` uses to carry a trace id.
TRACED_STREAM = "rock_traced_stream"
#: How the handler of :func:`install_logging` writes a line.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s trace=%(trace_id)s %(message)s"

_HANDLER_NAME = "rock-trace"
log = logging.getLogger("rock_serve.deployments.trace")


class TraceFilter(logging.Filter):
    """Puts the current trace id on each record as ``trace_id`` (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            record.trace_id = TRACE_ID.get()
        return True


def install_logging(logger_name: str = "rock_serve") -> logging.Handler:
    """Give ``logger_name`` a stderr handler whose lines carry the trace id (once per process).

    Returns the handler (the one installed earlier on later calls).
    """
    logger = logging.getLogger(logger_name)
    for handler in logger.handlers:
        if handler.get_name() == _HANDLER_NAME:
            return handler
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(TraceFilter())
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return handler


class TracedActor:
    """Base of the Ray actor classes: runs one of its methods under a caller's trace id."""

    def _traced_target(self, method: str) -> Any:
        install_logging()
        if method.startswith("_") or method in (TRACED_METHOD, TRACED_STREAM):
            raise AttributeError(f"{type(self).__name__} has no callable {method!r}")
        return getattr(self, method)

    async def rock_traced(self, trace_id: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``self.method(*args, **kwargs)`` with :data:`TRACE_ID` set to ``trace_id``.

        ``trace_id`` is ``<trace id>`` or ``<trace id>-<parent span id>`` (what
        :func:`~rock_serve._tracing.parent` gives); with spans exported the method runs in a
        span that is a child of that one. An invalid trace id is ignored (the method runs
        untraced); a method name that is not a public method of the actor raises
        ``AttributeError``, as a direct call would.
        """
        target = self._traced_target(method)
        tokens = (TRACE_ID.set("-"), SPAN_ID.set("-"))
        try:
            set_parent(trace_id)
            with SPANS.span(f"{type(self).__name__}.{method}", {"rock.method": method}):
                result = target(*args, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
                return result
        except RockError as exc:  # the failed call's line, under its trace id
            logging.getLogger(type(self).__module__).info(
                "call %s failed: %s: %s", method, exc.code.value, exc.message
            )
            raise
        finally:
            SPAN_ID.reset(tokens[1])
            TRACE_ID.reset(tokens[0])

    async def rock_traced_stream(
        self, trace_id: str, method: str, *args: Any, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """Iterate ``self.method(*args, **kwargs)`` (an async generator) under ``trace_id``.

        The trace id is set around each step of the generator (Ray may resume it from any
        task), so its code and the tasks it starts run under it; the caller's context between
        steps is left alone.
        """
        gen = self._traced_target(method)(*args, **kwargs)
        try:
            while True:
                tokens = (TRACE_ID.set("-"), SPAN_ID.set("-"))
                try:
                    set_parent(trace_id)
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    SPAN_ID.reset(tokens[1])
                    TRACE_ID.reset(tokens[0])
                yield item
        finally:
            tokens = (TRACE_ID.set("-"), SPAN_ID.set("-"))
            try:
                set_parent(trace_id)
                await gen.aclose()
            finally:
                SPAN_ID.reset(tokens[1])
                TRACE_ID.reset(tokens[0])


async def logged_stream(
    what: str, sandbox_id: str, items: AsyncIterator[Any], logger: logging.Logger = log
) -> AsyncIterator[Any]:
    """Yield ``items``, logging the stream's start and its end (items, seconds, outcome) under
    the current trace id, and making it one span (a child of the current one) when exported.
    """
    started = time.perf_counter()
    count, outcome = 0, "ok"
    logger.info("stream %s of %s started", what, sandbox_id, extra={"sandbox_id": sandbox_id})
    try:
        with SPANS.span(f"stream {what}", {"rock.sandbox_id": sandbox_id}, current=False):
            async for item in items:
                count += 1
                yield item
    except GeneratorExit:
        outcome = "closed"
        raise
    except BaseException as exc:
        outcome = getattr(getattr(exc, "code", None), "value", None) or type(exc).__name__
        raise
    finally:
        logger.info(
            "stream %s of %s ended: %d items in %.3f s (%s)",
            what,
            sandbox_id,
            count,
            time.perf_counter() - started,
            outcome,
            extra={"sandbox_id": sandbox_id},
        )


_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def request_ids(headers: Mapping[str, str]) -> tuple[str, str, str | None]:
    """(request id, trace id, parent span id) of a request: kept from its ``X-Request-ID`` and
    ``traceparent`` headers when valid, else new.
    """
    request_id = headers.get("x-request-id", "")
    if not _REQUEST_ID_OK.match(request_id):
        request_id = uuid.uuid4().hex
    match = _TRACEPARENT.match(headers.get("traceparent", "").strip().lower())
    if match and match.group(1) != "0" * 32:
        return request_id, match.group(1), match.group(2)
    return request_id, new_trace_id(), None


def with_ids(
    message: MutableMapping[str, Any], trace_id: str, request_id: str | None
) -> MutableMapping[str, Any]:
    """``message`` with ``X-Trace-ID`` (and ``X-Request-ID`` when given) added to its headers,
    when it starts a response or accepts a WebSocket.
    """
    if message["type"] in ("http.response.start", "websocket.accept"):
        extra = [(b"x-trace-id", trace_id.encode())]
        if request_id is not None:
            extra.append((b"x-request-id", request_id.encode()))
        message["headers"] = [*message.get("headers", []), *extra]
    return message


class TraceMiddleware:
    """ASGI middleware of the servers other than the Admin (the Worker's direct data plane):
    one trace id per request (the client's ``traceparent``'s, else new), set as
    :data:`TRACE_ID` for the request, echoed in ``X-Trace-ID`` with the ``X-Request-ID`` (the
    client's when valid, else new) on replies, streamed ones and WebSocket accepts included;
    with spans exported, the request is a span, child of the client's. Failed calls (status
    400 and up) get a structured log line, as the Admin's.
    """

    log = logging.getLogger("rock_serve.deployments.dataplane")

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        install_logging()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        request_id, trace_id, span_id = request_ids(headers)
        scope.setdefault("state", {})["request_id"] = request_id
        scope["state"]["trace_id"] = trace_id
        tokens = (TRACE_ID.set(trace_id), SPAN_ID.set(span_id or "-"))

        started = time.perf_counter()
        status = 500

        async def send_with_ids(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(with_ids(message, trace_id, request_id))

        method, path = scope.get("method", "WS"), scope.get("path", "")
        try:
            with SPANS.span(f"{method} {path}", {"rock.request_id": request_id}):
                await self.app(scope, receive, send_with_ids)
        finally:
            if status >= 400 and scope["type"] == "http":  # as the Admin logs failed calls
                self.log.info(
                    json.dumps(
                        {
                            "event": "request",
                            "request_id": request_id,
                            "trace_id": trace_id,
                            "method": method,
                            "path": path,
                            "status": status,
                            "ms": round((time.perf_counter() - started) * 1000, 3),
                        }
                    )
                )
            SPAN_ID.reset(tokens[1])
            TRACE_ID.reset(tokens[0])
