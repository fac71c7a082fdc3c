"""Sandbox spec, state and info."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal

from pydantic import Field

from rock_serve.protocol._base import WireModel
from rock_serve.protocol.images import ImageRefText, RegistryAuth


class SandboxState(str, Enum):
    """Lifecycle state of a sandbox."""

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    REMOVED = "removed"
    FAILED = "failed"


class FailureReason(str, Enum):
    """Why a sandbox is in state ``failed``."""

    OOM_KILLED = "oom_killed"
    AGENT_EXITED = "agent_exited"
    AGENT_UNRESPONSIVE = "agent_unresponsive"
    START_FAILED = "start_failed"
    LOST = "lost"


#: Upper bounds of :class:`Resources` that no node is expected to exceed; each Worker also
#: refuses what its own node cannot give (``invalid_request``).
MAX_CPUS = 512.0
MAX_MEMORY_MB = 1 << 20  # 1 TiB
MAX_PIDS = 1 << 16
MAX_DISK_MB = 1 << 24  # 16 TiB


class Resources(WireModel):
    """Limits enforced on the whole sandbox (all of its processes)."""

    cpus: float | None = Field(
        default=None, gt=0, le=MAX_CPUS, description="CPU quota in cores (at most the node's)."
    )
    memory_mb: int | None = Field(
        default=None,
        ge=16,
        le=MAX_MEMORY_MB,
        description="Memory limit in MiB, no swap (at most the node's memory).",
    )
    pids: int | None = Field(
        default=None,
        ge=8,
        le=MAX_PIDS,
        description="Maximum number of processes and threads (at most the server's "
        "max_pids_per_sandbox).",
    )
    disk_mb: int | None = Field(
        default=None,
        ge=1,
        le=MAX_DISK_MB,
        description="Writable-layer size limit in MiB, where the runtime supports it (at most "
        "the size of the node's sandbox filesystem).",
    )


class SandboxSpec(WireModel):
    """What to create."""

    image: ImageRefText | None = Field(
        default=None,
        description="Image reference (`python:3.11`, `registry:5000/org/task:v2`, "
        "`name@sha256:...`, `oci:/layout:tag`, `docker-daemon:ref`) or an absolute rootfs "
        "directory; None = the runtime's default image. A malformed one: 422 "
        "`invalid_image_reference`.",
    )
    registry_auth: RegistryAuth | None = Field(
        default=None,
        exclude=True,
        description="Credentials for pulling `image` (used once; never stored or returned).",
    )
    resources: Resources = Field(default_factory=Resources, description="Resource limits.")
    network: Literal["none", "host", "bridge"] = Field(
        default="none",
        description="'none' gives loopback only; 'bridge' a network namespace of its own with "
        "NAT egress, if the runtime allows it; 'host' (the node's network) only where an admin "
        "allowed it (never on bwrap). No mode reaches the host's own services.",
    )
    egress: list[Annotated[str, Field(min_length=1, max_length=255)]] | None = Field(
        default=None,
        max_length=64,
        description="Egress allow-list for network 'bridge': IPv4 cidr|host[:port] entries "
        "('10.0.0.0/8', '192.0.2.7:443', 'pypi.org:443'; host names resolved at create, TCP "
        "and UDP), everything else rejected. None = the runtime's default allow-list.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables for every process."
    )
    workdir: str = Field(default="/root", max_length=4096, description="Initial working dir.")
    labels: dict[str, str] = Field(default_factory=dict, description="Free-form labels.")
    owner: str = Field(default="", max_length=256, description="Who owns the sandbox.")
    seccomp: Literal["default", "unconfined"] = Field(
        default="default",
        description="'default' applies the runtime's seccomp profile (Docker's default "
        "equivalent) to every process; 'unconfined' turns it off and only an admin token "
        "may ask for it (403 otherwise).",
    )
    user: str | None = Field(
        default=None,
        max_length=65,
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?$",
        description="Who the sandbox's processes run as (`name`, `uid`, `name:group`, "
        "`uid:gid`; names from the image's /etc/passwd and /etc/group), inside the sandbox's "
        "own user namespace; None = the image's `User` (root if it has none).",
    )


class SandboxInfo(WireModel):
    """What a runtime knows about one sandbox."""

    id: str = Field(description="Sandbox id.")
    state: SandboxState = Field(description="Current lifecycle state.")
    reason: FailureReason | None = Field(default=None, description="Why it failed, if it did.")
    runtime: str = Field(description="Name of the runtime that owns it (bwrap, local, ...).")
    image: str | None = Field(default=None, description="Image or rootfs it was made from.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels, incl. owner/id.")
    created_at: float = Field(description="Creation time, seconds since the epoch.")
    pid: int | None = Field(default=None, description="Host pid of its first process, if any.")


class SandboxStats(WireModel):
    """Usage and limits as the sandbox sees them (its cgroup, not the host)."""

    cpu_limit: float | None = Field(default=None, description="CPU quota in cores, if limited.")
    cpu_count: int = Field(description="CPUs visible to the sandbox.")
    cpu_usage_seconds: float | None = Field(default=None, description="CPU time used so far.")
    memory_limit_bytes: int | None = Field(default=None, description="Memory limit, if any.")
    memory_usage_bytes: int | None = Field(default=None, description="Memory in use.")
    pids_limit: int | None = Field(default=None, description="Process limit, if any.")
    pids_current: int = Field(description="Processes currently in the sandbox.")
    cgroup: str | None = Field(default=None, description="Which cgroup interface was read.")
