"""Bodies of the snapshot routes (issue 16 item 2).

A snapshot is an immutable record of a sandbox's files at one atomic point: its writable layer
packed as a content-addressed archive (``digest`` = SHA-256 of the archive's bytes) kept in the
node's store and in S3 when configured. It records what is needed to bring the files back on
any node (the image, its resources) and what describes it (env KEYS only, never values; labels).
``POST /v1/sandboxes {"snapshot": id}`` creates a sandbox over it.
"""

from __future__ import annotations

from pydantic import Field

from rock_serve.protocol._base import WireModel
from rock_serve.protocol.sandbox import Resources

__all__ = ["SnapshotList", "SnapshotRecord", "SnapshotRequest"]


class SnapshotRequest(WireModel):
    """Snapshot a running sandbox."""

    labels: dict[str, str] | None = Field(
        default=None, description="Labels of the snapshot (default: the sandbox's)."
    )


class SnapshotRecord(WireModel):
    """One snapshot (immutable once made)."""

    id: str = Field(description="Snapshot id (``snap-<hex>``).")
    namespace: str = Field(description="Namespace it belongs to; others cannot see it.")
    sandbox_id: str = Field(description="The sandbox it was taken of.")
    digest: str = Field(description="SHA-256 of the archive's bytes (its name in the stores).")
    archive: str = Field(description="File name of the archive (``<digest>.tar[.zst]``).")
    size: int = Field(ge=0, description="Archive size in bytes.")
    image: str | None = Field(default=None, description="Image the sandbox was made from.")
    image_digest: str | None = Field(
        default=None, description="Digest of that image when the node knew it."
    )
    resources: Resources = Field(default_factory=Resources, description="Its resources.")
    network: str = Field(default="none", description="Its network mode.")
    env_keys: list[str] = Field(default_factory=list, description="Names of its env variables.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    owner: str = Field(default="", description="Owner of the sandbox it was taken of.")
    node: str = Field(description="Worker that made it (holds the archive locally).")
    in_s3: bool = Field(default=False, description="Also stored in S3.")
    created_at: float = Field(description="When, seconds since the epoch.")
    archived: bool = Field(
        default=False,
        description="Made by archive-on-expiry: ``POST /v1/sandboxes/{sandbox_id}/resume`` "
        "brings the sandbox back with its id (and deletes this record).",
    )


class SnapshotList(WireModel):
    """Snapshots, newest first."""

    items: list[SnapshotRecord] = Field(description="The snapshots.")
