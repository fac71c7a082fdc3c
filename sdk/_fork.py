"""Requests of the fork, pause and resume routes (issue 16), sans-IO like ``_base``."""

from __future__ import annotations

from rock_serve.protocol.fork import ForkRequest
from rock_serve.sdk._base import Call, _dump, _sandbox

__all__ = ["fork_sandbox", "pause_sandbox", "resume_sandbox"]


def fork_sandbox(sandbox_id: str, request: ForkRequest) -> Call:
    """``POST /v1/sandboxes/{id}/fork`` (no read timeout: a big layer takes a while to copy)."""
    return Call("POST", _sandbox(sandbox_id, "fork"), json=_dump(request), read_timeout=None)


def pause_sandbox(sandbox_id: str) -> Call:
    """``POST /v1/sandboxes/{id}/pause``."""
    return Call("POST", _sandbox(sandbox_id, "pause"))


def resume_sandbox(sandbox_id: str) -> Call:
    """``POST /v1/sandboxes/{id}/resume``."""
    return Call("POST", _sandbox(sandbox_id, "resume"))
