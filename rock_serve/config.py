"""Typed configuration: every config model lives here.

Runtime configs are a tagged union (``type``) parsed through :data:`RuntimeConfig`; each has a
``build()`` that imports its backend lazily and fails early, with :class:`InvalidConfig`, when
the config names something unusable (a missing rootfs, no bwrap binary).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from rock_serve.errors import InvalidConfig
from rock_serve.protocol import Resources

if TYPE_CHECKING:
    from rock_serve.runtime.base import Runtime

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_HIDE_PATHS",
    "BwrapRuntimeConfig",
    "FakeRuntimeConfig",
    "LocalRuntimeConfig",
    "RuntimeConfig",
    "ServerArgs",
    "parse_runtime_config",
    "parse_server_args",
]

#: Paths of the lower rootfs that a sandbox never sees (globs allowed). Directories appear
#: empty, files and symlinks absent. The runtime's own state dir is always added.
DEFAULT_HIDE_PATHS: tuple[str, ...] = (
    "/root",
    "/home",
    "/run",
    "/mnt",
    "/media",
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/ssh/ssh_host_*",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/var/lib/rock-serve",
    "/var/lib/docker",
)

#: Capabilities kept by a sandbox's root: Docker's default set, without NET_RAW.
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_MKNOD",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
)


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class FakeRuntimeConfig(_Config):
    """In-memory runtime for unit tests of everything above the runtime."""

    type: Literal["fake"] = Field(default="fake", description="Selects the fake runtime.")

    def build(self) -> Runtime:
        """Create the runtime."""
        from rock_serve.runtime.fake import FakeRuntime

        return FakeRuntime()


class LocalRuntimeConfig(_Config):
    """A process in a temp dir per sandbox, without isolation (development only)."""

    type: Literal["local"] = Field(default="local", description="Selects the local runtime.")
    state_dir: str | None = Field(
        default=None,
        description="Directory holding one subdirectory per sandbox; None = a per-user "
        "directory under the system temp dir.",
    )
    python: str | None = Field(
        default=None,
        description="Interpreter that runs the rocklet; None = the current interpreter.",
    )

    def build(self) -> Runtime:
        """Create the runtime."""
        from rock_serve.runtime.local import LocalRuntime

        return LocalRuntime(self)


class BwrapRuntimeConfig(_Config):
    """Bubblewrap sandboxes: namespaces, an overlayfs root per sandbox, cgroup limits."""

    type: Literal["bwrap"] = Field(default="bwrap", description="Selects the bwrap runtime.")
    rootfs: str = Field(
        default="/",
        description="Read-only lower layer of every sandbox's root (the host's / by default, "
        "minus hide_paths; a debootstrapped tree works too). A spec's image overrides it.",
    )
    state_dir: str = Field(
        default="/var/lib/rock-serve/bwrap",
        description="Directory holding each sandbox's overlay upper/work dirs and meta.json.",
    )
    cgroup_parent: str = Field(
        default="rock-serve",
        description="Cgroup (relative to each hierarchy's root) under which sandboxes go.",
    )
    bwrap_path: str = Field(default="bwrap", description="The bwrap binary (name or path).")
    python: str = Field(
        default="python3",
        description="Interpreter inside the sandbox that runs the rocklet (looked up in PATH).",
    )
    allow_network: bool = Field(
        default=False,
        description="Allow specs with network 'host'/'bridge' (both share the host network).",
    )
    hide_paths: list[str] = Field(
        default_factory=lambda: list(DEFAULT_HIDE_PATHS),
        description="Absolute paths (globs allowed) of the rootfs hidden from sandboxes.",
    )
    capabilities: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CAPABILITIES),
        description="Capabilities kept by root inside the sandbox (all others are dropped).",
    )
    default_resources: Resources = Field(
        default_factory=lambda: Resources(memory_mb=4096, pids=4096),
        description="Limits for fields a spec leaves unset.",
    )
    path: str = Field(
        default="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        description="PATH inside the sandbox unless the spec's env sets one.",
    )

    def build(self) -> Runtime:
        """Create the runtime; checks the binary, rootfs, cgroups and privileges first."""
        from rock_serve.runtime.bwrap import BwrapRuntime

        return BwrapRuntime(self)


RuntimeConfig = Annotated[
    FakeRuntimeConfig | LocalRuntimeConfig | BwrapRuntimeConfig,
    Field(discriminator="type"),
]

_RUNTIME_ADAPTER: TypeAdapter[FakeRuntimeConfig | LocalRuntimeConfig | BwrapRuntimeConfig] = (
    TypeAdapter(RuntimeConfig)
)


def parse_runtime_config(
    data: object,
) -> FakeRuntimeConfig | LocalRuntimeConfig | BwrapRuntimeConfig:
    """Parse a runtime config from plain data (a dict from YAML/JSON).

    Raises:
        InvalidConfig: unknown ``type``, unknown fields or bad values.
    """
    try:
        return _RUNTIME_ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidConfig(f"bad runtime config: {problems}") from None


class ServerArgs(_Config):
    """The platform's settings: the ``args:`` block of ``serve_config.yaml`` (see ``configs/``)."""

    runtime: RuntimeConfig = Field(
        default_factory=BwrapRuntimeConfig,
        description="Sandbox backend every Worker uses (bwrap by default).",
    )
    namespace: str = Field(
        default="rock-serve",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Ray namespace holding the Scheduler and the Workers (detached actors).",
    )
    max_sandboxes_per_node: int = Field(
        default=256, ge=1, le=100_000, description="Most sandboxes one Worker (node) may own."
    )
    default_ttl_seconds: float = Field(
        default=3600.0, gt=0, description="TTL of a sandbox whose create request sets none."
    )
    max_ttl_seconds: float = Field(
        default=86_400.0, gt=0, description="Largest TTL a create request may ask for."
    )
    reap_interval_seconds: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="How often Workers remove expired sandboxes and the Scheduler re-syncs "
        "its registry and its Workers with the cluster's nodes.",
    )
    worker_max_concurrency: int = Field(
        default=1000, ge=1, le=100_000, description="Concurrent calls one Worker actor serves."
    )
    create_retry_after_seconds: float = Field(
        default=1.0,
        gt=0,
        description="Retry-After sent with 'rate_limited' when every Worker is full.",
    )
    max_file_bytes: int = Field(
        default=64 << 20,
        ge=1,
        description="Largest file body the REST API reads or writes in one request.",
    )

    @model_validator(mode="after")
    def _ttl_bounds(self) -> ServerArgs:
        if self.default_ttl_seconds > self.max_ttl_seconds:
            raise ValueError("default_ttl_seconds is over max_ttl_seconds")
        return self


def parse_server_args(data: object) -> ServerArgs:
    """Parse :class:`ServerArgs` from plain data (``serve_config.yaml``'s ``args:``).

    Raises:
        InvalidConfig: unknown fields or bad values.
    """
    try:
        return ServerArgs.model_validate(data or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidConfig(f"bad server args: {problems}") from None
