"""The sans-IO part of the SDK's model-service methods (``sb.llm``, :class:`AsyncLLMRelay`).

Requests as :class:`~rock_serve.sdk._base.Call` objects, sent through the client's transport
(HTTP, or the Ray transport, which maps each route to its Worker method); the async module and
its generated sync twin only send them.
"""

from __future__ import annotations

from typing import Any

from rock_serve.protocol.llm import LLMAnswer, LLMPollRequest, LLMRelease
from rock_serve.sdk._base import API_PREFIX, Call, _sandbox, _seg

__all__ = [
    "POLL_MARGIN",
    "answer",
    "is_ray",
    "poll",
    "poll_many",
    "release",
    "trajectory",
]

#: Extra read time on a long poll beyond its own wait.
POLL_MARGIN = 30.0


def poll(sandbox_id: str, wait: float, max_calls: int) -> Call:
    """``GET /v1/sandboxes/{id}/llm/calls``."""
    return Call(
        "GET",
        _sandbox(sandbox_id, "llm", "calls"),
        params=(("wait", repr(float(wait))), ("max_calls", str(max_calls))),
        read_timeout=wait + POLL_MARGIN,
    )


def poll_many(sandbox_ids: list[str], wait: float, max_calls: int) -> Call:
    """``POST /v1/llm/poll``."""
    body = LLMPollRequest(sandbox_ids=sandbox_ids, wait=wait, max_calls=max_calls)
    return Call(
        "POST",
        f"{API_PREFIX}/llm/poll",
        json=body.model_dump(mode="json"),
        read_timeout=wait + POLL_MARGIN,
    )


def answer(sandbox_id: str, call_id: str, body: LLMAnswer) -> Call:
    """``POST /v1/sandboxes/{id}/llm/calls/{call_id}``."""
    return Call(
        "POST",
        _sandbox(sandbox_id, "llm", "calls", _seg(call_id)),
        json=body.model_dump(mode="json", exclude_none=True),
    )


def release(sandbox_id: str, call_ids: list[str]) -> Call:
    """``POST /v1/sandboxes/{id}/llm/release``."""
    body = LLMRelease(call_ids=call_ids)
    return Call("POST", _sandbox(sandbox_id, "llm", "release"), json=body.model_dump(mode="json"))


def trajectory(sandbox_id: str) -> Call:
    """``GET /v1/sandboxes/{id}/llm/trajectory``."""
    return Call("GET", _sandbox(sandbox_id, "llm", "trajectory"))


def is_ray(client: Any) -> bool:
    """Whether ``client`` is over the Ray transport (``AsyncClient.from_ray`` / ``from_ray``)."""
    return bool(getattr(getattr(client, "_transport", None), "ray", False))
