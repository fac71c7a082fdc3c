"""REST v1 bodies of the platform (Admin) that are not rocklet operations.

Routes (all under ``/v1``; every error is :class:`~rock_serve.protocol.ErrorBody`):

==========  ==========================================  ==========================================
method      path                                        body -> reply
==========  ==========================================  ==========================================
GET         /health                                     -> :class:`Health`
POST        /sandboxes                                  :class:`CreateSandboxRequest` ->
                                                        :class:`SandboxRecord` (201)
GET         /sandboxes?owner=&state=&label=k=v          -> :class:`SandboxList`
GET         /sandboxes/{id}                             -> :class:`SandboxRecord`
DELETE      /sandboxes/{id}                             -> 204
POST        /sandboxes/{id}/exec[?stream=true]          ExecRequest -> ExecResult (or NDJSON of
                                                        OutputChunk lines, then the ExecResult)
POST        /sandboxes/{id}/sessions                    SessionCreateRequest ->
                                                        SessionCreateResponse
POST        /sandboxes/{id}/sessions/{name}/run         :class:`SessionRunBody` -> SessionRunResult
            [?stream=true]                              (or NDJSON as for exec)
POST        /sandboxes/{id}/sessions/{name}/stdin       :class:`SessionStdinBody` -> 204
POST        /sandboxes/{id}/sessions/{name}/interrupt   -> 204
DELETE      /sandboxes/{id}/sessions/{name}             -> 204
GET         /sandboxes/{id}/files?path=                 -> raw bytes (streamed)
PUT         /sandboxes/{id}/files?path=&mode=           raw bytes (streamed) -> :class:`FileWritten`
GET         /sandboxes/{id}/files/stat?path=            -> FileInfo
GET         /sandboxes/{id}/files/list?path=            -> ListDirResult
POST        /sandboxes/{id}/files/mkdir                 MkdirRequest -> 204
POST        /sandboxes/{id}/files/remove                RemoveRequest -> 204
GET         /sandboxes/{id}/archive?path=               -> tar stream
PUT         /sandboxes/{id}/archive?path=               tar stream (plain or compressed) -> 204
GET         /sandboxes/{id}/stats                       -> SandboxStats
WebSocket   /sandboxes/{id}/pty?cols=&rows=             binary frames in/out; text frames
                                                        :class:`PtyResize` in, :class:`PtyExit` out
any         /sandboxes/{id}/ports/{port}/{path}         HTTP proxy to 127.0.0.1:port in the
                                                        sandbox (502 ``port_closed``); also
                                                        WebSocket proxy on the same URL
WebSocket   /sandboxes/{id}/ports/{port}/tcp            raw TCP tunnel: binary frames both ways,
                                                        see ``protocol/ports.py``
==========  ==========================================  ==========================================

Sandbox ids name their owning Worker: ``sb-<worker>-<random>``, so data-plane calls go to that
Worker without a lookup.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rock_serve.protocol._base import WireModel
from rock_serve.protocol.commands import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    MAX_OUTPUT,
    MAX_TIMEOUT,
)
from rock_serve.protocol.llm import ModelServiceSpec, ReversePort
from rock_serve.protocol.sandbox import FailureReason, Resources, SandboxSpec, SandboxState

SANDBOX_ID = r"^sb-[a-z0-9]{1,16}-[a-z0-9]{8,32}$"


class CreateSandboxRequest(SandboxSpec):
    """What to create, plus lifetime and idempotency."""

    ttl_seconds: float | None = Field(
        default=None,
        gt=0,
        le=7 * 86_400,
        description="Hard deadline after which the sandbox is removed; None = server default.",
    )
    client_token: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Idempotency key: the same token returns the same sandbox.",
    )
    lease_seconds: float | None = Field(
        default=None,
        gt=0,
        le=86_400,
        description="Lease: the sandbox is reaped when no call or heartbeat renews it for this "
        "long; None = server default.",
    )
    ray_job_id: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[0-9a-fA-F]+$",
        description="Ray job that owns it: reaped when that job's driver dies.",
    )
    trajectory_id: str | None = Field(
        default=None, max_length=256, description="Trajectory (episode) it serves, if any."
    )
    snapshot: str | None = Field(
        default=None,
        pattern=r"^snap-[0-9a-f]{8,64}$",
        description="Create over this snapshot's files (issue 16; image and resources default "
        "to the snapshot's). Another namespace's snapshot is a 404.",
    )
    archive_on_expiry: bool = Field(
        default=False,
        description="When its lease runs out, snapshot it (node store and S3) before removing "
        "it; POST /v1/sandboxes/{id}/resume brings it back with the same id (issue 16).",
    )
    model_service: ModelServiceSpec | None = Field(
        default=None,
        description="An OpenAI-compatible endpoint inside the sandbox (OPENAI_BASE_URL) "
        "answered by the trainer (relay), a served model (proxy) or a recording (replay).",
    )
    reverse_ports: list[ReversePort] = Field(
        default_factory=list,
        max_length=16,
        description="Ports inside the sandbox whose connections reach host:port targets on "
        "the node (works with network none).",
    )


#: Fields of :class:`CreateSandboxRequest` that are not part of the runtime's spec.
LIFECYCLE_FIELDS = frozenset(
    {
        "ttl_seconds",
        "client_token",
        "lease_seconds",
        "ray_job_id",
        "trajectory_id",
        "model_service",
        "reverse_ports",
        "snapshot",
        "archive_on_expiry",
    }
)


class StateChange(WireModel):
    """One step of a sandbox's lifecycle."""

    state: SandboxState = Field(description="The state entered.")
    at: float = Field(description="When, seconds since the epoch.")
    reason: str | None = Field(
        default=None,
        description="Why (e.g. 'ttl_expired', 'lease_expired', 'job_dead', 'oom_killed').",
    )


class SandboxRecord(WireModel):
    """A sandbox as the platform knows it."""

    id: str = Field(description="Sandbox id (names its Worker).")
    state: SandboxState = Field(description="Lifecycle state.")
    reason: FailureReason | None = Field(default=None, description="Why it failed, if it did.")
    owner: str = Field(default="", description="Who owns it.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels given at create.")
    image: str | None = Field(default=None, description="Image or rootfs it was made from.")
    resources: Resources = Field(default_factory=Resources, description="Limits it runs with.")
    network: str = Field(default="none", description="Network mode.")
    egress: list[str] | None = Field(
        default=None, description="Egress allow-list asked for (None = the runtime's default)."
    )
    worker: str = Field(description="Name of the owning Worker.")
    node_id: str = Field(description="Ray node id of the owning Worker.")
    created_at: float = Field(description="Creation time, seconds since the epoch.")
    expires_at: float | None = Field(default=None, description="Hard deadline (TTL), if any.")
    namespace: str = Field(
        default="default", description="Namespace (set from the caller's token)."
    )
    ray_job_id: str | None = Field(default=None, description="Owning Ray job, if any.")
    trajectory_id: str | None = Field(default=None, description="Trajectory it serves, if any.")
    endpoint: str | None = Field(
        default=None,
        description="Base URL of its node's direct data plane, if it runs one (a token for it: "
        "POST /v1/sandboxes/{id}/dataplane).",
    )
    lease_seconds: float | None = Field(default=None, description="Lease length, if leased.")
    archive_on_expiry: bool = Field(
        default=False, description="Archived (snapshot, then removed) when its lease runs out."
    )
    lease_expires_at: float | None = Field(
        default=None, description="When the lease runs out unless renewed."
    )
    history: list[StateChange] = Field(
        default_factory=list, description="Lifecycle steps, oldest first."
    )


class SandboxList(WireModel):
    """Sandboxes matching a list query, newest first."""

    items: list[SandboxRecord] = Field(description="The sandboxes.")


class SessionRunBody(WireModel):
    """Body of ``POST /sandboxes/{id}/sessions/{name}/run`` (the session is in the path)."""

    command: str = Field(description="Bash source; may span lines.")
    timeout: float | None = Field(
        default=DEFAULT_TIMEOUT, gt=0, le=MAX_TIMEOUT, description="Seconds before interrupt."
    )
    max_output_bytes: int = Field(
        default=DEFAULT_MAX_OUTPUT, ge=0, le=MAX_OUTPUT, description="Output cap."
    )


class SessionStdinBody(WireModel):
    """Body of ``POST /sandboxes/{id}/sessions/{name}/stdin``."""

    data: str = Field(description="Text to write to the running command's stdin.")
    eof: bool = Field(default=False, description="Close stdin after writing.")


class FileWritten(WireModel):
    """Reply of a file upload."""

    path: str = Field(description="Path written.")
    size: int = Field(description="Bytes written.")


class WorkerStatus(WireModel):
    """One Worker as the Scheduler sees it."""

    name: str = Field(description="Actor name.")
    node_id: str = Field(description="Ray node id.")
    alive: bool = Field(description="False once its node is gone.")
    sandboxes: int = Field(description="Sandboxes it owns.")
    capacity: int = Field(description="Most sandboxes it may own.")
    runtime: str = Field(description="Runtime it uses.")
    warm: int = Field(default=0, description="Started sandboxes waiting in its warm pool.")
    reaped: dict[str, int] = Field(
        default_factory=dict, description="Sandboxes it reaped since it started, by reason."
    )
    processes_running: int = Field(
        default=0, description="Background processes running in its sandboxes (process table)."
    )


class Health(WireModel):
    """Reply of ``GET /v1/health``."""

    status: str = Field(description="'ok' when the Scheduler and at least one Worker answer.")
    version: str = Field(description="rock-serve version.")
    namespace: str = Field(default="", description="Ray namespace of the platform's actors.")
    state_store: str = Field(default="memory", description="Where the registry is kept.")
    state_store_ok: bool = Field(
        default=True, description="False while the state store cannot be reached."
    )
    workers: list[WorkerStatus] = Field(default_factory=list, description="Known Workers.")


class PtyResize(WireModel):
    """WebSocket pty control message (client -> server text frame): resize the terminal."""

    type: Literal["resize"] = Field(default="resize", description="Message kind.")
    cols: int = Field(ge=1, le=65535, description="Columns.")
    rows: int = Field(ge=1, le=65535, description="Rows.")


class PtyExit(WireModel):
    """WebSocket pty message (server -> client text frame) sent when the shell exits."""

    type: Literal["exit"] = Field(default="exit", description="Message kind.")
    exit_code: int = Field(description="Exit status of the shell.")
