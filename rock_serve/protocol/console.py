"""Wire models of the web console's own feeds (``/ui/api/*``); the pages also use REST v1."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rock_serve.protocol._base import WireModel
from rock_serve.protocol.api import SandboxRecord, WorkerStatus

__all__ = [
    "ConsoleEvent",
    "ConsoleMetrics",
    "ConsoleRow",
    "ConsoleUser",
    "ConsoleWorkers",
    "EnvInstance",
    "EnvInstances",
    "LoginRequest",
    "MetricsSample",
    "WebhookEvent",
]


class LoginRequest(WireModel):
    """Body of ``POST /ui/api/login``: the bearer token to keep in the session cookie."""

    token: str = Field(min_length=1, max_length=512, description="A rock-serve token.")


class ConsoleUser(WireModel):
    """Who is logged in to the console and what the pages may offer them."""

    name: str = Field(description="The token's name.")
    namespace: str = Field(description="The token's namespace.")
    role: Literal["tenant", "viewer", "operator", "admin"] = Field(description="Its role.")
    may_act: bool = Field(description="False for a viewer: the pages show no action buttons.")
    all_namespaces: bool = Field(description="True when it sees every namespace.")
    auth_required: bool = Field(description="False when the platform runs without tokens.")


class ConsoleRow(WireModel):
    """One sandbox as the live table shows it (a slim :class:`SandboxRecord`)."""

    id: str = Field(description="Sandbox id.")
    state: str = Field(description="Lifecycle state.")
    reason: str | None = Field(default=None, description="Why it failed, if it did.")
    namespace: str = Field(description="Namespace.")
    owner: str = Field(description="Owner.")
    image: str | None = Field(default=None, description="Image.")
    worker: str = Field(description="Owning Worker (node).")
    created_at: float = Field(description="Creation time, seconds since the epoch.")
    expires_at: float | None = Field(default=None, description="TTL deadline.")
    lease_expires_at: float | None = Field(default=None, description="Lease deadline.")
    cpus: float | None = Field(default=None, description="CPU limit in cores.")
    memory_mb: int | None = Field(default=None, description="Memory limit in MiB.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")

    @classmethod
    def of(cls, record: SandboxRecord) -> ConsoleRow:
        """The row of a record."""
        return cls(
            id=record.id,
            state=record.state.value,
            reason=record.reason.value if record.reason else None,
            namespace=record.namespace,
            owner=record.owner,
            image=record.image,
            worker=record.worker,
            created_at=record.created_at,
            expires_at=record.expires_at,
            lease_expires_at=record.lease_expires_at,
            cpus=record.resources.cpus,
            memory_mb=record.resources.memory_mb,
            labels=record.labels,
        )


class ConsoleEvent(WireModel):
    """One server-sent event of ``GET /ui/api/events``: the table's changes since the last.

    The first event is a snapshot (every row); later ones carry only rows that changed and
    ids that went away. ``seq`` grows by one per event, so a client sees any drop.
    """

    seq: int = Field(description="1 for the snapshot, then +1 per event.")
    snapshot: bool = Field(description="True when ``upsert`` holds every row.")
    at: float = Field(description="Server time of the event, seconds since the epoch.")
    upsert: list[ConsoleRow] = Field(default_factory=list, description="New or changed rows.")
    remove: list[str] = Field(default_factory=list, description="Ids no longer listed.")


class MetricsSample(WireModel):
    """One sample of the platform's own metrics, as one Admin replica saw them."""

    t: float = Field(description="End of the interval, seconds since the epoch.")
    interval: float = Field(description="Seconds the interval lasted.")
    sandboxes: dict[str, int] = Field(description="Sandboxes by state (the caller's view).")
    requests: int = Field(description="HTTP requests finished in the interval.")
    errors: dict[str, int] = Field(description="Error replies by HTTP status.")
    rate_limited: int = Field(description="429 replies in the interval.")
    create_p50: float | None = Field(default=None, description="Create latency p50, seconds.")
    create_p99: float | None = Field(default=None, description="Create latency p99, seconds.")
    op_p50: float | None = Field(default=None, description="Data-plane call p50, seconds.")
    op_p99: float | None = Field(default=None, description="Data-plane call p99, seconds.")
    reaped: dict[str, int] = Field(
        default_factory=dict, description="Sandboxes reaped in the interval, by reason."
    )
    processes_running: int | None = Field(
        default=None,
        description="Background processes running in the sandboxes, summed over the Workers' "
        "process tables (None for a tenant: a platform-wide figure).",
    )


class ConsoleMetrics(WireModel):
    """Reply of ``GET /ui/api/metrics``: the last hour of samples, oldest first."""

    interval_seconds: float = Field(description="Seconds between samples.")
    samples: list[MetricsSample] = Field(description="Samples, oldest first.")


class ConsoleWorkers(WireModel):
    """Reply of ``GET /ui/api/workers``: nodes, warm pools and admission."""

    status: str = Field(description="The platform's health status.")
    workers: list[WorkerStatus] = Field(
        description="Workers (empty for tenants: cluster details are not theirs)."
    )
    queued: int = Field(description="Creates waiting in the admission queue.")
    in_flight: int = Field(description="Creates running now.")
    rate_limited_per_second: float = Field(description="429 replies per second, last sample.")


class EnvInstance(WireModel):
    """One open GEM env instance."""

    id: str = Field(description="Instance id (GEM's sandbox_id).")
    env_id: str = Field(description="Registered env id.")
    namespace: str = Field(description="Namespace it belongs to.")
    idle_seconds: float = Field(description="Seconds since its last call.")
    busy: bool = Field(description="True while a call runs on it.")
    sandbox_id: str | None = Field(
        default=None, description="Its sandbox (after its first reset), for its LLM calls."
    )
    episodes: int = Field(default=0, ge=0, description="Episodes kept for the console.")
    closed: bool = Field(default=False, description="Closed (kept for its episodes).")


class EnvInstances(WireModel):
    """Reply of ``GET /ui/api/envs``."""

    items: list[EnvInstance] = Field(
        description="Instances the caller may see: open ones, then recently closed ones."
    )


class WebhookEvent(WireModel):
    """Body of a webhook call (``notify.webhook_url``): a sandbox failed or a Worker was lost.

    Signed: ``X-Rock-Signature: sha256=<hex HMAC-SHA256 of "<X-Rock-Timestamp>.<body>">``
    with the key in ``notify.secret_env``; ``X-Rock-Delivery`` is unique per event (a retry
    resends the same one, so receivers can drop duplicates).
    """

    type: Literal["sandbox.failed", "worker.lost"] = Field(description="What happened.")
    delivery: str = Field(description="Unique id of this event.")
    at: float = Field(description="When it was seen, seconds since the epoch.")
    platform: str = Field(description="The platform's Ray namespace.")
    sandbox: ConsoleRow | None = Field(default=None, description="The failed sandbox.")
    worker: WorkerStatus | None = Field(default=None, description="The lost Worker.")
