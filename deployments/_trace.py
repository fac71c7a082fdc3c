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
structured handlers. Streams (``_ray.stream``) are not traced.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import re
import sys
from collections.abc import Coroutine
from contextvars import ContextVar
from typing import Any, TypeVar

__all__ = [
    "TRACED_METHOD",
    "TRACE_ID",
    "TraceFilter",
    "TracedActor",
    "install_logging",
    "traced",
    "untraced_task",
]

T = TypeVar("T")

#: The current call's W3C trace id (32 hex digits), ``-`` when there is none.
TRACE_ID: ContextVar[str] = ContextVar("rock_trace_id", default="-")
#: The actor method ``_ray.call`` uses to carry a trace id.
TRACED_METHOD = "rock_traced"
#: How the handler of :func:`install_logging` writes a line.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s trace=%(trace_id)s %(message)s"

_TRACE_OK = re.compile(r"^[0-9a-f]{32}$")
_HANDLER_NAME = "rock-trace"


def traced() -> str | None:
    """The current trace id, or None when no (valid) trace id is set."""
    trace_id = TRACE_ID.get()
    return trace_id if _TRACE_OK.match(trace_id) else None


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

    async def rock_traced(self, trace_id: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``self.method(*args, **kwargs)`` with :data:`TRACE_ID` set to ``trace_id``.

        An invalid trace id is ignored (the method runs untraced); a method name that is not a
        public method of the actor raises ``AttributeError``, as a direct call would.
        """
        install_logging()
        if method.startswith("_") or method == TRACED_METHOD:
            raise AttributeError(f"{type(self).__name__} has no callable {method!r}")
        target = getattr(self, method)
        token = TRACE_ID.set(trace_id if _TRACE_OK.match(trace_id) else "-")
        try:
            result = target(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result
        finally:
            TRACE_ID.reset(token)


def untraced_task(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Start a long-lived background task outside any caller's trace (a loop started during
    a traced call must not carry that call's trace id for its whole life).
    """
    context = contextvars.copy_context()
    context.run(TRACE_ID.set, "-")
    return context.run(asyncio.ensure_future, coro)  # the task copies `context`
