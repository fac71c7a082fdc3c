"""Requests of the fork, pause and resume routes (issue 16), sans-IO like ``_base``."""

from __future__ import annotations

from rock_serve.protocol.fork import ForkRequest
from rock_serve.protocol.snapshot import SnapshotRequest
from rock_serve.sdk._base import API_PREFIX, Call, _dump, _sandbox, _seg

__all__ = [
    "delete_snapshot",
    "fork_sandbox",
    "get_snapshot",
    "list_snapshots",
    "pause_sandbox",
    "resume_sandbox",
    "snapshot_sandbox",
]


def fork_sandbox(sandbox_id: str, request: ForkRequest) -> Call:
    """``POST /v1/sandboxes/{id}/fork`` (no read timeout: a big layer takes a while to copy)."""
    return Call("POST", _sandbox(sandbox_id, "fork"), json=_dump(request), read_timeout=None)


def pause_sandbox(sandbox_id: str) -> Call:
    """``POST /v1/sandboxes/{id}/pause``."""
    return Call("POST", _sandbox(sandbox_id, "pause"))


def resume_sandbox(sandbox_id: str) -> Call:
    """``POST /v1/sandboxes/{id}/resume``."""
    return Call("POST", _sandbox(sandbox_id, "resume"))


def snapshot_sandbox(sandbox_id: str, request: SnapshotRequest) -> Call:
    """``POST /v1/sandboxes/{id}/snapshot`` (no read timeout: packing a big layer takes a while)."""
    return Call("POST", _sandbox(sandbox_id, "snapshot"), json=_dump(request), read_timeout=None)


def list_snapshots() -> Call:
    """``GET /v1/snapshots``."""
    return Call("GET", f"{API_PREFIX}/snapshots")


def get_snapshot(snapshot_id: str) -> Call:
    """``GET /v1/snapshots/{id}``."""
    return Call("GET", f"{API_PREFIX}/snapshots/{_seg(snapshot_id)}")


def delete_snapshot(snapshot_id: str) -> Call:
    """``DELETE /v1/snapshots/{id}``."""
    return Call("DELETE", f"{API_PREFIX}/snapshots/{_seg(snapshot_id)}")
