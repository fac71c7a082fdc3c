"""The Ray transport's data plane: one REST v1 ``Call`` of the SDK <-> one sandbox operation.

``AsyncClient`` builds every request with its sans-IO core (a :class:`~rock_serve.sdk._base.Call`)
and parses the reply. Over Ray, :func:`operation_of` turns a data-plane call into its typed
operation by the route in :data:`~rock_serve.protocol.ops.OPS` (path segments, query, JSON body,
raw body), the Worker runs it (``Worker.op`` / ``ray_op``), and
:func:`reply` / :func:`stream_reply` give the SDK the reply the Admin would have sent (JSON, raw
bytes or 204, held as the value itself so the SDK parses nothing; or NDJSON ending in the
result or an error line). So the Ray client needs no method
of its own per operation: a new operation's SDK method works over Ray as it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import httpx
from pydantic import ValidationError

from rock_serve.errors import InvalidRequest, RockError, to_body
from rock_serve.protocol.ops import OPS, Op, OpSpec
from rock_serve.sdk._base import Call, Held

__all__ = ["operation_of", "reply", "stream_reply"]


def _pattern(path: str) -> re.Pattern[str]:
    """``/v1/sandboxes/{sandbox_id}/sessions/{session}`` -> a regex with named segments."""
    return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path)))


_ROUTES: list[tuple[str, re.Pattern[str], OpSpec]] = [
    (spec.route[0], _pattern(spec.route[1]), spec) for spec in OPS.values()
]


def operation_of(call: Call) -> tuple[str, Op[Any], bool] | None:
    """(sandbox id, operation, streamed) of a data-plane call; None for any other call.

    Raises:
        InvalidRequest: the call's parameters do not make a valid operation.
    """
    if call.sandbox is None:
        return None
    for method, pattern, spec in _ROUTES:
        if method != call.method or (match := pattern.fullmatch(call.path)) is None:
            continue
        fields: dict[str, Any] = dict(call.json) if isinstance(call.json, dict) else {}
        segments = {k: unquote(v) for k, v in match.groupdict().items()}
        sandbox_id = segments.pop("sandbox_id")
        fields.update(segments)
        params = dict(call.params)
        streamed = params.pop("stream", None) == "true"
        if "mode" in params:
            try:
                fields["mode"] = int(params.pop("mode"), 8)
            except ValueError:
                raise InvalidRequest("mode is not octal permission bits") from None
        fields.update(params)
        model_fields = spec.model.model_fields
        if call.content is not None and "data" in model_fields:
            fields["data"] = call.content
        # No idempotency key: the Ray transport retries only admission refusals (429/503,
        # before anything ran), and a key costs the Worker a task per command (measured).
        try:
            return sandbox_id, spec.model.model_validate(fields), streamed
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: {e['msg']}"
                for e in exc.errors()
            )
            raise InvalidRequest(f"invalid {spec.model.__name__}: {problems}") from None
    return None


def _request(call: Call) -> httpx.Request:
    return httpx.Request(call.method, f"ray://rock{call.path}", params=call.params)


def reply(call: Call, result: Any) -> httpx.Response:
    """The reply for ``result`` (a model, bytes or None), held as it is: the SDK's ``parse``
    takes the model without a JSON round trip; ``content`` gives the Admin's body.
    """
    return Held(result)


def stream_reply(call: Call, items: AsyncIterator[Any]) -> httpx.Response:
    """The Admin's NDJSON reply of a streamed operation (an error becomes an error line)."""

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for item in items:
                yield item.model_dump_json().encode() + b"\n"
        except RockError as exc:
            yield json.dumps(to_body(exc)).encode() + b"\n"
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()

    return httpx.Response(
        200,
        content=lines(),
        headers={"content-type": "application/x-ndjson"},
        request=_request(call),
    )
