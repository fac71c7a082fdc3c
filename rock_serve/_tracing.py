"""The current trace id and span, shared by every layer down to the rocklet handle (issue 17.5).

This module is the one home of the trace context of a process (the deployments' ``_trace``
re-exports it; the rocklet handle, which must not import ``deployments``, reads it here):

- :data:`TRACE_ID`: the W3C trace id (32 hex digits) of the request being served, ``-`` when
  there is none. The Admin's and the data plane's middlewares set it per request, Ray calls carry
  it to the Scheduler and the Worker, and :class:`~rock_serve.rocklet.handle.RockletHandle` puts
  it in each request frame (``"trace"``), so the rocklet writes it in its log lines and errors.
- :data:`SPAN_ID`: the OpenTelemetry span (16 hex digits) the next span is a child of, when
  spans are exported.
- :func:`untraced_task`: a long-lived task started during a traced call (asyncio copies the
  caller's contextvars into every task) must not carry that call's id for its whole life.
- :data:`SPANS`: optional OpenTelemetry spans (:meth:`Spans.configure` with an OTLP endpoint or,
  in tests, an exporter); while unconfigured :meth:`Spans.span` costs one attribute check.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import secrets
from collections.abc import Coroutine, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

__all__ = [
    "SPANS",
    "SPAN_ID",
    "TRACE_ID",
    "Spans",
    "new_trace_id",
    "parent",
    "set_parent",
    "traced",
    "untraced_task",
]

T = TypeVar("T")

log = logging.getLogger(__name__)

#: The current call's W3C trace id (32 hex digits), ``-`` when there is none.
TRACE_ID: ContextVar[str] = ContextVar("rock_trace_id", default="-")
#: The current OpenTelemetry span id (16 hex digits), ``-`` when there is none.
SPAN_ID: ContextVar[str] = ContextVar("rock_span_id", default="-")

TRACE_OK = re.compile(r"^[0-9a-f]{32}$")
_SPAN_OK = re.compile(r"^[0-9a-f]{16}$")


def traced() -> str | None:
    """The current trace id, or None when no (valid) trace id is set."""
    trace_id = TRACE_ID.get()
    return trace_id if TRACE_OK.match(trace_id) and trace_id != "0" * 32 else None


def new_trace_id() -> str:
    """A fresh random W3C trace id."""
    return secrets.token_hex(16)


def parent() -> str | None:
    """The current trace as ``<trace id>`` or ``<trace id>-<span id>`` (what Ray calls carry),
    None outside a trace.
    """
    trace_id = traced()
    if trace_id is None:
        return None
    span_id = SPAN_ID.get()
    return f"{trace_id}-{span_id}" if _SPAN_OK.match(span_id) else trace_id


def set_parent(value: str) -> bool:
    """Set :data:`TRACE_ID` (and :data:`SPAN_ID`) from what :func:`parent` returned.

    Returns False (and sets both to ``-``) for anything else: a bad value is ignored, not
    trusted.
    """
    trace_id, _, span_id = value.partition("-")
    if not TRACE_OK.match(trace_id) or trace_id == "0" * 32:
        TRACE_ID.set("-")
        SPAN_ID.set("-")
        return False
    TRACE_ID.set(trace_id)
    SPAN_ID.set(span_id if _SPAN_OK.match(span_id) else "-")
    return True


def untraced_task(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Start a long-lived background task outside any caller's trace (a loop started during
    a traced call must not carry that call's trace id for its whole life).

    Raises:
        RuntimeError: no running event loop (as ``loop.create_task`` would).
    """
    context = contextvars.copy_context()
    context.run(TRACE_ID.set, "-")
    context.run(SPAN_ID.set, "-")
    return context.run(asyncio.get_running_loop().create_task, coro)  # the task copies it


class Spans:
    """OpenTelemetry spans of this process, children of the current trace and span."""

    def __init__(self) -> None:
        self._tracer: Any = None
        self._provider: Any = None
        self._configured: tuple[str | None, str] | None = None

    @property
    def enabled(self) -> bool:
        """True while spans are exported."""
        return self._tracer is not None

    def configure(self, endpoint: str | None, service: str, *, exporter: Any = None) -> None:
        """Export spans to the OTLP/HTTP ``endpoint`` (None: no spans), or to ``exporter``.

        ``exporter`` (an OpenTelemetry ``SpanExporter``, e.g. the in-memory one of tests) is
        used synchronously, span by span. Without the ``tracing`` extra installed this logs a
        warning and exports nothing.
        """
        key = (endpoint if exporter is None else f"exporter:{id(exporter)}", service)
        if self._configured == key:
            return
        self.shutdown()
        self._configured = key
        if not endpoint and exporter is None:
            return
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        except ImportError:
            log.warning("tracing.otlp_endpoint is set but opentelemetry-sdk is not installed")
            return
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                    OTLPSpanExporter,
                )
            except ImportError:
                log.warning("tracing.otlp_endpoint is set but the OTLP exporter is not installed")
                return
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self._provider = provider
        self._tracer = provider.get_tracer("rock_serve")

    def flush(self) -> None:
        """Export the spans still buffered (blocks; tests and shutdown)."""
        if self._provider is not None:
            self._provider.force_flush()

    def shutdown(self) -> None:
        """Flush and stop exporting."""
        if self._provider is not None:
            self._provider.shutdown()
        self._tracer = self._provider = None
        self._configured = None

    @contextlib.contextmanager
    def span(
        self, name: str, attributes: dict[str, Any] | None = None, *, current: bool = True
    ) -> Iterator[Any]:
        """A span named ``name``, child of the current trace and span (None when disabled or
        outside a trace). With ``current`` it is the parent of the spans made inside the block
        (:data:`SPAN_ID` is set for the block: do not use ``current`` across an ``await`` of
        an async generator's ``yield``).
        """
        trace_id = traced()
        if self._tracer is None or trace_id is None:
            yield None
            return
        from opentelemetry import trace

        span_id = SPAN_ID.get()
        context = trace.set_span_in_context(
            trace.NonRecordingSpan(
                trace.SpanContext(
                    trace_id=int(trace_id, 16),
                    span_id=int(span_id if _SPAN_OK.match(span_id) else secrets.token_hex(8), 16),
                    is_remote=True,
                    trace_flags=trace.TraceFlags(1),
                )
            )
        )
        if not current:  # no OTel context either: safe across an async generator's yields
            span = self._tracer.start_span(name, context=context, attributes=attributes or {})
            try:
                yield span
            except BaseException as exc:
                if not isinstance(exc, GeneratorExit | asyncio.CancelledError):
                    span.record_exception(exc)
                    span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                raise
            finally:
                span.end()
            return
        with self._tracer.start_as_current_span(
            name, context=context, attributes=attributes or {}
        ) as span:
            token = SPAN_ID.set(format(span.get_span_context().span_id, "016x"))
            try:
                yield span
            finally:
                SPAN_ID.reset(token)


#: This process's spans (configured by the Worker, the Scheduler and tests).
SPANS = Spans()
