"""Typed configuration: every config model lives here.

Runtime configs are a tagged union (``type``) parsed through :data:`RuntimeConfig`; each has a
``build()`` that imports its backend lazily and fails early, with :class:`InvalidConfig`, when
the config names something unusable (a missing rootfs, no bwrap binary).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from rock_serve.errors import InvalidConfig
from rock_serve.protocol import Resources

if TYPE_CHECKING:
    from rock_serve.runtime.base import Runtime

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_ETC_ALLOW",
    "DEFAULT_HIDE_PATHS",
    "DEFAULT_MASKED_PATHS",
    "DEFAULT_READONLY_PATHS",
    "DEFAULT_ROOT_ALLOW",
    "NAME_PATTERN",
    "AuditConfig",
    "AuthConfig",
    "ConsoleConfig",
    "GemConfig",
    "NotifyConfig",
    "TracingConfig",
    "CompatConfig",
    "PortsConfig",
    "DOCKER_TEST_IMAGE",
    "DEFAULT_IMAGE",
    "ImageStoreConfig",
    "LLMConfig",
    "WarmPoolConfig",
    "BwrapRuntimeConfig",
    "DockerRuntimeConfig",
    "EgressPolicyConfig",
    "BridgeNetworkConfig",
    "FakeRuntimeConfig",
    "GvisorRuntimeConfig",
    "LocalRuntimeConfig",
    "RouteGroup",
    "RuntimeConfig",
    "ServerArgs",
    "StateConfig",
    "TokenEntry",
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

#: Host top-level entries the default bwrap root shows (merged-/usr symlinks included).
DEFAULT_ROOT_ALLOW: tuple[str, ...] = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")

#: Entries of the host's /etc copied into the default bwrap root (world-readable ones only).
DEFAULT_ETC_ALLOW: tuple[str, ...] = (
    "alternatives",
    "bash.bashrc",
    "bash_completion.d",
    "bindresvport.blacklist",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "environment",
    "fonts",
    "gai.conf",
    "group",
    "host.conf",
    "hosts",
    "inputrc",
    "issue",
    "issue.net",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "locale.gen",
    "localtime",
    "login.defs",
    "magic",
    "magic.mime",
    "mime.types",
    "networks",
    "nsswitch.conf",
    "os-release",
    "passwd",
    "profile",
    "profile.d",
    "protocols",
    "python3",
    "python3.11",
    "resolv.conf",
    "rpc",
    "services",
    "shells",
    "skel",
    "ssl",
    "terminfo",
    "timezone",
    "xattr.conf",
)

#: Docker's masked paths (runc's default spec); those missing on the host are skipped.
DEFAULT_MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)

#: Docker's read-only paths.
DEFAULT_READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
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


class EgressPolicyConfig(_Config):
    """What networked sandboxes may reach (the host's own addresses never)."""

    egress_allow: list[str] = Field(
        default_factory=lambda: ["0.0.0.0/0"],
        description="The widest egress a sandbox may get, as cidr|host[:port] entries; a spec "
        "without egress gets all of it, a spec's own entries must lie within it.",
    )
    egress_deny: list[str] = Field(
        default_factory=lambda: ["169.254.0.0/16"],
        description="Destinations no sandbox reaches, whatever it is allowed (default: "
        "link-local, where cloud metadata services live). The host's own addresses and the "
        "bridge's subnet are always denied.",
    )
    host_ports: list[int] = Field(
        default_factory=list,
        description="TCP ports of the host's bridge address that sandboxes may connect to "
        "(e.g. a proxy); every other port and address of the host stays unreachable.",
    )
    isolate: bool = Field(
        default=True,
        description="Sandboxes cannot reach each other; false lets sandboxes on the same "
        "bridge talk to each other.",
    )


class BridgeNetworkConfig(EgressPolicyConfig):
    """The bridge a Worker sets up for networked sandboxes, and what they may reach."""

    name: str = Field(
        default="rock0",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,11}$",
        description="Bridge interface on the host; also prefixes the sandboxes' netns names.",
    )
    subnet: str = Field(
        default="10.213.0.0/16",
        description="IPv4 subnet of the bridge: its first address is the host's (the "
        "gateway, unreachable from sandboxes), the others are leased to sandboxes.",
    )


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


#: The default sandbox image: the offline Debian base (bookworm minbase + python3) that
#: ``scripts/build-test-images`` writes as an OCI layout (``scripts/setup`` and CI run it).
DEFAULT_IMAGE = "oci:/var/cache/rock-serve/images:bookworm"


class ImageStoreConfig(_Config):
    """A node's image store: pulled images, their layers unpacked once and shared."""

    root: str = Field(
        default="/var/lib/rock-serve/images",
        description="Directory of the store (layers/sha256/<diffid>/, images/, tmp/). Keep "
        "the path short: overlay mount options list every layer's path.",
    )
    default_image: str = Field(
        default=DEFAULT_IMAGE,
        description="Image of a sandbox whose spec names none (never the host's root).",
    )
    max_bytes: int = Field(
        default=50 * 1024**3,
        ge=0,
        description="Disk budget of unpacked layers; unused images are evicted (least recently "
        "used first) to stay under it; 0 = no limit.",
    )
    pull_attempts: int = Field(
        default=3, ge=1, le=10, description="Tries of a pull whose source does not answer."
    )
    retry_backoff_seconds: float = Field(
        default=0.5, ge=0, description="First wait between tries (doubled each time)."
    )
    pull_timeout_seconds: float = Field(
        default=1800, gt=0, description="Longest one skopeo transfer may take."
    )
    registry_answer_timeout_seconds: float = Field(
        default=10,
        gt=0,
        description="Longest a push's destination registry may take to answer its first "
        "request (GET /v2/, checked before anything is sent): else 502 registry_unavailable.",
    )
    skopeo_path: str = Field(default="skopeo", description="The skopeo binary (name or path).")
    local_sources: list[str] = Field(
        default_factory=lambda: ["/var/cache/rock-serve/"],
        description="Host directories under which oci:, oci-archive: and docker-archive: "
        "image paths may be (any caller may name one: keep this to image caches).",
    )
    allow_docker_daemon: bool = Field(
        default=True, description="Allow docker-daemon: images (the node's Docker images)."
    )
    insecure_registries: list[str] = Field(
        default_factory=list,
        description="Registries (host:port) reached over plain HTTP besides loopback ones.",
    )
    unpack_threads: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Layers of one pull unpacked at once (each also inflates in a thread of "
        "its own).",
    )
    keep_layer_blobs: bool = Field(
        default=False,
        description="Keep each newly pulled layer's compressed blob next to its unpacked "
        "dir (about a third more disk, counted in the layer's size against max_bytes), so a "
        "push of the image, or of a commit on top of it, sends the original layers: the "
        "registry gets the same layer digests (shared with the source image, not uploaded "
        "again). Off: a push re-tars the unpacked layers, so its layer digests are new.",
    )


class BwrapRuntimeConfig(_Config):
    """Bubblewrap sandboxes: namespaces, an overlayfs root per sandbox, cgroup limits."""

    type: Literal["bwrap"] = Field(default="bwrap", description="Selects the bwrap runtime.")
    rootfs: str = Field(
        default="/",
        description="Read-only lower layer of every sandbox's root. '/' (the default) means "
        "a synthesized root: the host's root_allow entries (/usr, /bin, /lib...) and a "
        "filtered /etc, nothing else of the host. Any other directory (a debootstrapped "
        "tree) is used whole, minus hide_paths. A spec's image under rootfs_allow overrides it.",
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
        description="Allow specs with network 'bridge': a network namespace of its own on "
        "the bridge below (never the host's namespace; 'host' is always refused).",
    )
    bridge: BridgeNetworkConfig = Field(
        default_factory=lambda: BridgeNetworkConfig(),
        description="Bridge, NAT and egress policy of networked sandboxes (allow_network).",
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
        default_factory=lambda: Resources(cpus=1.0, memory_mb=4096, pids=4096, disk_mb=4096),
        description="Limits for fields a spec leaves unset. disk_mb sizes the sandbox's "
        "writable layer (a sparse ext4 file system on a loop device: a write beyond it fails "
        "with ENOSPC inside; unset = the state dir's file system, unlimited).",
    )
    rootfs_allow: list[str] = Field(
        default_factory=list,
        description="Directories under which a spec's image may name a rootfs directory "
        "(admin-managed trees). Empty = specs cannot name host paths at all.",
    )
    root_allow: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ROOT_ALLOW),
        description="With rootfs '/': the host's top-level entries a sandbox sees; every "
        "other one is absent (/etc is a filtered copy, /root, /home, /var, /run empty).",
    )
    etc_allow: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ETC_ALLOW),
        description="With rootfs '/': entries of the host's /etc copied into sandboxes "
        "(world-readable files only).",
    )
    seccomp: bool = Field(
        default=True,
        description="Apply the default seccomp profile (Docker's default equivalent) to "
        "every sandbox process; a spec may opt out with seccomp 'unconfined' (admins only).",
    )
    userns: bool = Field(
        default=True,
        description="Run each sandbox in its own user namespace: ids 0..65535 inside map to "
        "a host range of its own (uid_base + slot * 65536), lower layers through idmapped "
        "mounts so files keep their owners. Needs Linux >= 5.19 and util-linux setpriv.",
    )
    uid_base: int = Field(
        default=100_000, ge=1, description="First host uid/gid of the sandboxes' ranges."
    )
    skeleton_dir: str = Field(
        default="/dev/shm/rock-serve-root",
        description="With rootfs '/': where the default root's skeleton layer is built; must "
        "be on a file system other than the host's / (a tmpfs).",
    )
    roots_dir: str = Field(
        default="/run/rock-serve/roots",
        description="With userns: where each sandbox's root is bind-mounted (and the rocklet "
        "installed) for bwrap, which runs as the sandbox's uid; its parents must be "
        "traversable by any uid. Mode 0711: not listable.",
    )
    uid_slots: int = Field(
        default=4096,
        ge=1,
        le=60_000,
        description="How many ranges of 65536 ids there are: the most sandboxes at once.",
    )
    masked_paths: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MASKED_PATHS),
        description="Paths under /proc and /sys hidden in sandboxes (Docker's masked paths): "
        "files read as empty, directories as empty read-only dirs.",
    )
    readonly_paths: list[str] = Field(
        default_factory=lambda: list(DEFAULT_READONLY_PATHS),
        description="Paths under /proc mounted read-only in sandboxes (Docker's read-only "
        "paths: no sysctl, core_pattern or sysrq writes).",
    )
    path: str = Field(
        default="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        description="PATH inside the sandbox unless the spec's env sets one.",
    )
    images: ImageStoreConfig | None = Field(
        default_factory=ImageStoreConfig,
        description="The node's image store; a spec without image gets its default_image. "
        "None = no store: images must be host directories and the default is rootfs.",
    )
    disk_pool: int = Field(
        default=4,
        ge=0,
        le=64,
        description="Pre-formatted sparse ext4 disk files kept ready per disk size (made in "
        "the background after a create uses one): a create with disk_mb only loop-mounts "
        "one. A removed sandbox's disk is deleted, never reused. 0 = mkfs at each create.",
    )
    max_concurrent_starts: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Sandbox starts (bwrap + the rocklet's first reply) running at once; more "
        "wait their turn before their start timeout begins, so a burst of creates on a loaded "
        "node queues instead of timing out. 0 = four per CPU of the node (at least 8).",
    )

    def build(self) -> Runtime:
        """Create the runtime; checks the binary, rootfs, cgroups and privileges first."""
        from rock_serve.runtime.bwrap import BwrapRuntime

        return BwrapRuntime(self)


#: The offline test image that ``scripts/build-test-image`` builds (Debian bookworm minbase with
#: python3, made with debootstrap and ``docker import``); the tests and configs/docker.yaml use it.
DOCKER_TEST_IMAGE = "rock-serve/test:bookworm"


class DockerRuntimeConfig(_Config):
    """One container per sandbox on a local Docker engine, the rocklet in a long-lived exec."""

    type: Literal["docker"] = Field(default="docker", description="Selects the docker runtime.")
    docker_host: str | None = Field(
        default=None,
        pattern=r"^(unix|tcp|http)://",
        description="Daemon address: unix:///path/docker.sock or tcp://host:port (no TLS). "
        "None = $DOCKER_HOST, else unix:///var/run/docker.sock. The daemon must run on this "
        "node: the rocklet is bind-mounted from agent_dir.",
    )
    image: str = Field(
        default="python:3.12-slim",
        min_length=1,
        max_length=512,
        description="Image of sandboxes whose spec names none. Any image with /bin/sh works; "
        "without python3 >= 3.8 the node's interpreter is mounted (node_python).",
    )
    pull: Literal["never", "if-missing", "always"] = Field(
        default="if-missing",
        description="When to pull an image: never (a missing image fails at once with "
        "image_not_found), if-missing, or always (before every create).",
    )
    pull_timeout_seconds: float = Field(
        default=600.0, gt=0, description="Longest one pull may take before the create fails."
    )
    scope: str = Field(
        default="rock-serve",
        pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
        description="Marks this runtime's containers (label rock-serve.scope, name prefix "
        "'<scope>.'): runtimes with other scopes on the same daemon never see them.",
    )
    agent_dir: str = Field(
        default="/var/lib/rock-serve/docker/agent",
        description="Host directory the rocklet is installed into; bind-mounted read-only at "
        "/.rock in every container (the only host mount).",
    )
    python: str = Field(
        default="python3",
        min_length=1,
        description="Interpreter in the image that runs the rocklet: a name looked up in the "
        "image's PATH, or an absolute path.",
    )
    node_python: bool = Field(
        default=True,
        description="When an image has no python3 >= 3.8, mount this node's interpreter "
        "read-only and run the rocklet with it. A self-contained install (pyenv, uv, "
        "python-build-standalone) is mounted whole at its own path and needs only the "
        "image's glibc; a distribution's python (prefix /usr) is mounted at /.rock-python "
        "and needs its shared libraries (glibc, libz, libexpat) in the image. "
        "False = such images fail with invalid_config.",
    )
    node_python_executable: str | None = Field(
        default=None,
        description="The node interpreter that node_python mounts (a path on the node); "
        "None = the Worker's own (the base interpreter of its venv).",
    )
    allow_network: bool = Field(
        default=False,
        description="Allow specs with network 'bridge' (the docker network named "
        "bridge_network, guarded: see network_policy). Default: only 'none' (loopback).",
    )
    allow_host_network: bool = Field(
        default=False,
        description="Also allow network 'host': the node's own namespace, where sandbox code "
        "reaches every loopback service of the node (Ray, Redis, the API). Trusted code only.",
    )
    bridge_network: str = Field(
        default="bridge",
        min_length=1,
        description="Docker network (driver bridge, on this node) that a spec's network "
        "'bridge' joins; it must exist.",
    )
    network_policy: EgressPolicyConfig = Field(
        default_factory=lambda: EgressPolicyConfig(),
        description="What containers on bridge_network may reach: the node drops whatever "
        "they send to its own addresses; egress allow-lists are applied in each container's "
        "namespace.",
    )
    capabilities: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CAPABILITIES),
        description="Capabilities kept by root in the container; all others are dropped "
        "(and no-new-privileges is set).",
    )
    default_resources: Resources = Field(
        default_factory=lambda: Resources(cpus=1.0, memory_mb=4096, pids=4096),
        description="Limits for fields a spec leaves unset.",
    )
    seccomp: bool = Field(
        default=True,
        description="Require the daemon's seccomp support and keep Docker's default profile "
        "on every container; a spec may opt out with seccomp 'unconfined' (admins only).",
    )
    keepalive: list[str] = Field(
        default_factory=lambda: ["/.rock/keepalive"],
        min_length=1,
        description="Main process of every container, under Docker's init (which reaps "
        "orphans); the rocklet runs beside it in an exec, so that a new Worker can reattach. "
        "The default, installed with the rocklet, is a /bin/sh script blocked reading its "
        "stdin (held open by the daemon): no child process, nothing but its name in ps.",
    )
    oci_runtime: str | None = Field(
        default=None, description="OCI runtime of the containers (e.g. runsc); None = default."
    )
    cgroup_parent: str | None = Field(
        default=None, description="Parent cgroup of the containers; None = the daemon's."
    )
    stop_timeout_seconds: float = Field(
        default=2.0,
        ge=0,
        le=300,
        description="stop() sends SIGTERM to the container's init, then SIGKILL after this.",
    )
    timeout_seconds: float = Field(
        default=60.0, gt=0, description="Timeout of one call to the daemon."
    )

    def build(self) -> Runtime:
        """Create the runtime; installs the rocklet into agent_dir (no daemon call yet)."""
        from rock_serve._extras import require

        require("docker", "docker", "the docker runtime")
        from rock_serve.runtime.docker import DockerRuntime

        return DockerRuntime(self)


class GvisorRuntimeConfig(DockerRuntimeConfig):
    """The docker runtime with gVisor's ``runsc`` as the OCI runtime: a kernel boundary.

    Every field of :class:`DockerRuntimeConfig` applies. Sandbox code talks to gVisor's
    user-space kernel (the Sentry), not to the host's; the cost is measured by
    ``bench/runtime.py``. The Docker daemon must have runsc registered under ``oci_runtime``
    (and ``network_oci_runtime``): ``scripts/start-dockerd`` does both.
    """

    type: Literal["gvisor"] = Field(  # type: ignore[assignment]
        default="gvisor", description="Selects the gvisor runtime."
    )
    scope: str = Field(
        default="rock-gvisor",
        pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
        description="Marks this runtime's containers (label rock-serve.scope, name prefix "
        "'<scope>.'): runtimes with other scopes on the same daemon never see them.",
    )
    agent_dir: str = Field(
        default="/var/lib/rock-serve/gvisor/agent",
        description="Host directory the rocklet is installed into; bind-mounted read-only at "
        "/.rock in every container (the only host mount).",
    )
    oci_runtime: str = Field(
        default="runsc",
        min_length=1,
        description="Docker runtime name of runsc for sandboxes with network 'none': "
        "registered with runtimeArgs ['--network=none', '--oci-seccomp'] (gVisor's own "
        "stack, loopback only; Docker's seccomp profile enforced inside the sandbox too). "
        "runsc 2022 cannot use its netstack on kernels where net.core.rmem_default is per "
        "network namespace (it takes every namespace for the root one).",
    )
    network_oci_runtime: str | None = Field(
        default="runsc-hostinet",
        min_length=1,
        description="Docker runtime name of runsc for sandboxes with network 'host' or "
        "'bridge' (when allow_network): registered with runtimeArgs ['--network=host', "
        "'--oci-seccomp'], so gVisor passes socket calls to the container's network "
        "namespace (a smaller boundary for networking than for the rest). None = such specs "
        "are refused.",
    )

    sentry_memory_mb: int = Field(
        default=64,
        ge=0,
        le=4096,
        description="Added to a sandbox's memory_mb in its host memory cgroup: gVisor's "
        "kernel (the Sentry: its heap, page tables, about 0.6 MiB per sandbox process) is "
        "charged there, where runc's processes charge only their own memory. Stats report "
        "memory_mb as the limit.",
    )

    def build(self) -> Runtime:
        """Create the runtime; installs the rocklet into agent_dir (no daemon call yet)."""
        from rock_serve.runtime.gvisor import GvisorRuntime

        return GvisorRuntime(self)


#: Any one runtime config.
AnyRuntimeConfig = (
    FakeRuntimeConfig
    | LocalRuntimeConfig
    | BwrapRuntimeConfig
    | DockerRuntimeConfig
    | GvisorRuntimeConfig
)

RuntimeConfig = Annotated[
    AnyRuntimeConfig,
    Field(discriminator="type"),
]

_RUNTIME_ADAPTER: TypeAdapter[AnyRuntimeConfig] = TypeAdapter(RuntimeConfig)


def parse_runtime_config(data: object) -> AnyRuntimeConfig:
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


class Quota(_Config):
    """Limits on what one namespace may hold at once (None = unlimited)."""

    max_sandboxes: int | None = Field(default=None, ge=0, description="Sandboxes at once.")
    max_cpus: float | None = Field(
        default=None, ge=0, description="Sum of the sandboxes' ``resources.cpus``."
    )
    max_memory_mb: int | None = Field(
        default=None, ge=0, description="Sum of the sandboxes' ``resources.memory_mb``."
    )
    max_disk_mb: int | None = Field(
        default=None, ge=0, description="Sum of the sandboxes' ``resources.disk_mb``."
    )


#: Names of tokens and namespaces: short, printable, safe in logs, labels and metric tags.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class TokenEntry(_Config):
    """One bearer token as the server knows it: its SHA-256, never the token itself."""

    name: str = Field(
        pattern=NAME_PATTERN, description="Who holds the token; recorded in the audit log."
    )
    namespace: str = Field(
        default="default",
        pattern=NAME_PATTERN,
        description="The namespace its sandboxes belong to; it sees only that namespace's.",
    )
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="Lower-case hex SHA-256 of the token's UTF-8 bytes (`rock token hash`).",
    )
    admin: bool = Field(
        default=False,
        description="May act on every namespace's sandboxes and see cluster-wide details.",
    )
    role: Literal["tenant", "viewer", "operator", "admin"] | None = Field(
        default=None,
        description="'tenant': its namespace only. 'viewer': reads every namespace, may not "
        "act (403). 'operator': manages every namespace's sandboxes, no token admin. "
        "'admin': everything. None = 'admin' when admin is true, else 'tenant'.",
    )

    @model_validator(mode="after")
    def _role_agrees(self) -> TokenEntry:
        if self.admin and self.role not in (None, "admin"):
            raise ValueError(f"admin: true contradicts role {self.role!r}")
        return self


#: Route groups of the compatibility APIs that ``auth.anonymous`` can open to token-less callers.
RouteGroup = Literal["gem", "rock", "run_code", "swerex"]


class AuthConfig(_Config):
    """Bearer-token authentication of the REST API (see ``rock_serve/auth.py``)."""

    mode: Literal["required", "disabled"] | None = Field(
        default=None,
        description="'required': every call but /v1/health needs a valid token. 'disabled': "
        "no token is checked and every caller is an admin in namespace 'default' (loopback "
        "only!). None = 'required' when tokens or token_file are set, else 'disabled'.",
    )
    tokens: list[TokenEntry] = Field(
        default_factory=list, description="Tokens accepted (hashed), in addition to token_file."
    )
    token_file: str | None = Field(
        default=None,
        description="YAML/JSON file of more entries (a list, or {tokens: [...]}), as written by "
        "`rock up` and `rock token create --file`; '~' expands on the Admin's host. It must "
        "exist where each Admin replica runs; changes are picked up within seconds.",
    )

    anonymous: dict[str, list[RouteGroup]] = Field(
        default_factory=dict,
        description="Route groups a caller without any token may use, by the namespace it then "
        "acts in (e.g. {'gem-public': ['gem']} on a trusted network). Off by default; the Admin "
        "logs a warning at start when set. Groups: gem (/apis/v1/envs/gem/*), rock "
        "(/apis/envs/sandbox/v1/*), run_code (SandboxFusion), swerex (per-sandbox SWE-ReX).",
    )

    @property
    def required(self) -> bool:
        """True when callers must present a valid token."""
        if self.mode is not None:
            return self.mode == "required"
        return bool(self.tokens) or self.token_file is not None

    @model_validator(mode="after")
    def _one_namespace_per_group(self) -> AuthConfig:
        seen: dict[str, str] = {}
        for namespace, groups in self.anonymous.items():
            if not re.fullmatch(NAME_PATTERN, namespace):
                raise ValueError(f"auth.anonymous: {namespace!r} is not a namespace name")
            for group in groups:
                if group in seen:
                    raise ValueError(
                        f"auth.anonymous: route group {group!r} is anonymous in two namespaces "
                        f"({seen[group]!r} and {namespace!r})"
                    )
                seen[group] = namespace
        return self

    def anonymous_namespace(self, group: str) -> str | None:
        """The namespace an anonymous caller of route group ``group`` acts in, or None."""
        for namespace, groups in self.anonymous.items():
            if group in groups:
                return namespace
        return None

    @model_validator(mode="after")
    def _has_tokens(self) -> AuthConfig:
        if self.mode == "required" and not self.tokens and self.token_file is None:
            raise ValueError("auth.mode is 'required' but neither tokens nor token_file is set")
        return self


class AuditConfig(_Config):
    """Where the audit log goes: who created, deleted and ran what, when, with what outcome."""

    path: str | None = Field(
        default=None,
        description="JSONL file (one event per line, appended, mode 0600) on each Admin "
        "replica's host; '~' expands there. None = no file.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis URL (redis://[:password@]host:port/db); events are XADDed to "
        "redis_stream. None = no Redis sink.",
    )
    redis_stream: str = Field(
        default="rock:audit", min_length=1, max_length=256, description="Redis stream key."
    )
    redis_maxlen: int = Field(
        default=1_000_000,
        ge=1,
        description="Approximate cap on the stream's length (XADD MAXLEN ~).",
    )
    max_command_chars: int = Field(
        default=4096, ge=16, description="Longer command texts are cut to this many characters."
    )
    queue_size: int = Field(
        default=10_000,
        ge=1,
        description="Events buffered per Admin replica while sinks write; beyond it events "
        "are dropped and counted, never blocking a request.",
    )


class StateConfig(_Config):
    """Where the Scheduler keeps its registry, leases and idempotency tokens.

    Without ``redis_url`` they live in the Scheduler's memory (rebuilt from the Workers after a
    restart); with it they live in Redis and survive Scheduler restarts.
    """

    redis_url: str | None = Field(
        default=None,
        repr=False,  # may carry a password
        pattern=r"^(redis|rediss|unix)://",
        description="Redis to keep the state in (redis://, rediss:// or unix:// URL); "
        "None = in memory.",
    )
    key_prefix: str = Field(
        default="rock",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Prefix of every Redis key, so several clusters can share one Redis.",
    )
    token_ttl_seconds: float = Field(
        default=86_400.0,
        gt=0,
        description="How long a create's client_token stays bound to the sandbox it made.",
    )
    tombstone_ttl_seconds: float = Field(
        default=60.0,
        gt=0,
        description="How long a deleted sandbox id stays ignored by registry syncs.",
    )
    socket_timeout_seconds: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="Timeout of one Redis connect or reply.",
    )
    call_timeout_seconds: float = Field(
        default=2.0,
        gt=0,
        le=300,
        description="Most one Redis round trip of the state store may take, reconnects "
        "included, before it fails with runtime_unavailable (503); a bulk write gets 1 ms more "
        "per record, a load this much per batch of about 1,000 records.",
    )
    health_check_interval_seconds: int = Field(
        default=10,
        ge=0,
        description="A pooled Redis connection idle this long is checked with PING before use.",
    )
    max_connections: int = Field(
        default=32, ge=1, le=10_000, description="Size of the Redis connection pool."
    )


class ConsoleConfig(_Config):
    """The web console at ``/ui`` and its in-process metric samples (issue 17)."""

    enabled: bool = Field(default=True, description="Serve the console at /ui.")
    sample_interval_seconds: float = Field(
        default=10.0, gt=0, le=600, description="Seconds between metric samples (one hour kept)."
    )
    events_interval_seconds: float = Field(
        default=1.0, gt=0, le=60, description="Seconds between live-table updates (SSE)."
    )


class NotifyConfig(_Config):
    """Webhook called on failed sandboxes and lost Workers (JSON body, HMAC-SHA256 signed)."""

    webhook_url: str | None = Field(
        default=None, description="URL to POST events to; None = no notifications."
    )
    secret_env: str = Field(
        default="ROCK_WEBHOOK_SECRET",
        description="Environment variable holding the HMAC key (never in the config file); "
        "the signature is sent as 'X-Rock-Signature: sha256=<hex>' over '<timestamp>.<body>'.",
    )
    watch_interval_seconds: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description="How often the watcher asks the Scheduler for failures, Workers and "
        "admission (also the resolution of the alert gauges it sets).",
    )
    retries: int = Field(default=5, ge=0, le=20, description="Retries after a failed POST.")
    timeout_seconds: float = Field(default=5.0, gt=0, description="Timeout of one POST.")
    backoff_seconds: float = Field(
        default=0.5, gt=0, description="First retry delay; doubles per retry (capped at 30 s)."
    )


class TracingConfig(_Config):
    """OpenTelemetry export of request spans (only when the package is installed)."""

    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); None = "
        "no export (trace ids are still made, echoed and logged).",
    )
    service_name: str = Field(default="rock-serve", description="service.name of the spans.")


class CompatConfig(_Config):
    """How the compatibility APIs (ROCK's sandbox API, SandboxFusion) map onto the platform."""

    rock_images: dict[str, str | None] = Field(
        default_factory=dict,
        description="ROCK image name -> the image our runtime uses for it (null = the "
        "runtime's default image), e.g. {'python:3.11': null} on bwrap.",
    )
    rock_unmapped_images: Literal["auto", "pass", "default"] = Field(
        default="auto",
        description="An image ROCK's SDK names that rock_images does not map: 'pass' gives it "
        "to the runtime as is, 'default' uses the runtime's default image, 'auto' passes it on "
        "the docker runtime and uses the default elsewhere (bwrap images are rootfs paths).",
    )
    rock_resources: Literal["apply", "ignore"] = Field(
        default="apply",
        description="ROCK's memory/cpus/disk: 'apply' makes them the sandbox's limits; "
        "'ignore' drops them, so ROCK starts (whose SDK always sends memory='8g', cpus=2) can "
        "take warm-pool sandboxes (warm_pool_size) at the runtime's default limits.",
    )
    run_code_image: str | None = Field(
        default=None,
        description="Image of /run_code's sandboxes (a toolchain image for cpp, go, java, rust, "
        "nodejs); None = the runtime's default.",
    )


class WarmPoolConfig(_Config):
    """Started sandboxes of one image spec that each Worker keeps ready."""

    image: str | None = Field(default=None, description="Image; None = the default image.")
    size: int = Field(default=1, ge=0, le=1024, description="Sandboxes kept per Worker.")
    resources: Resources = Field(
        default_factory=Resources,
        description="Limits of the pool's sandboxes (a create must "
        "ask for the same ones to take one).",
    )


class LLMConfig(_Config):
    """The model service (``model_service`` on create): trajectories and limits."""

    trajectory_dir: str | None = Field(
        default=None,
        description="Directory for trajectory JSONL files (<trajectory_id>.jsonl); None = "
        "<tmp>/rock-serve-trajectories.",
    )
    s3_bucket: str | None = Field(
        default=None, description="Also write each trajectory to this S3 bucket (boto3)."
    )
    s3_prefix: str = Field(default="trajectories/", description="Key prefix in s3_bucket.")
    s3_endpoint: str | None = Field(
        default=None, description="S3 endpoint URL (None = AWS); credentials from boto3's chain."
    )
    max_pending_calls: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="Calls one sandbox may have waiting for the trainer (more: 429).",
    )
    max_steps: int = Field(
        default=10_000, ge=1, le=1_000_000, description="Most steps one trajectory records."
    )
    max_request_bytes: int = Field(
        default=8 << 20, ge=1024, description="Largest chat.completions body the service takes."
    )


class DataPlaneConfig(_Config):
    """The direct data plane: each node's Worker serves its sandboxes' operations itself.

    Its port is the one public per-node port (Ray's stay on loopback): bind it to the address
    trainers reach the node on. Calls carry a short-lived token scoped to one sandbox, signed
    by the Admin with the cluster secret and checked on the node without a round trip.
    """

    enabled: bool = Field(default=True, description="Run the per-node data-plane server.")
    host: str = Field(
        default="127.0.0.1",
        description="Address the server binds (0.0.0.0: every interface of the node).",
    )
    port: int = Field(default=0, ge=0, le=65535, description="Port; 0 = a free one.")
    advertise_host: str | None = Field(
        default=None,
        description="Host put in the endpoint clients are sent to (default: host, or the "
        "node's IP when host is 0.0.0.0).",
    )
    token_ttl_seconds: float = Field(
        default=900.0, gt=0, le=86_400, description="Lifetime of one data-plane token."
    )
    secret_env: str = Field(
        default="ROCK_DATAPLANE_SECRET",
        description="Environment variable holding the cluster secret tokens are signed with "
        "(same value on every node). Unset: the Scheduler makes one per cluster start.",
    )


class PortsConfig(_Config):
    """Ports relayed from outside into sandboxes (``/v1/sandboxes/{id}/ports/{port}/...``)."""

    max_connections: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Relayed connections one sandbox may hold open at once (HTTP requests, "
        "WebSockets and TCP tunnels together); more are refused with resource_exhausted.",
    )
    window_bytes: int = Field(
        default=1 << 20,
        ge=256 << 10,
        le=64 << 20,
        description="Bytes in flight per connection and direction before the sender waits "
        "for the other side: bounds the memory a slow reader can pin.",
    )
    connect_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Seconds a connect to the port inside the sandbox may take (a refused "
        "connect is port_closed at once).",
    )


class SnapshotS3Config(_Config):
    """Where snapshot archives go in S3 (boto3; credentials from the usual AWS sources)."""

    bucket: str = Field(min_length=3, max_length=63, description="Bucket name (must exist).")
    prefix: str = Field(
        default="rock-serve/snapshots",
        max_length=512,
        description="Key prefix; archives live at ``<prefix>/sha256/<digest>``.",
    )
    endpoint_url: str | None = Field(default=None, description="S3 endpoint (None = AWS).")
    region: str | None = Field(default=None, description="Region name (None = boto3's default).")


class SnapshotConfig(_Config):
    """Snapshots (issue 16): the S3 store and retention per namespace."""

    s3: SnapshotS3Config | None = Field(
        default=None,
        description="S3 store of the archives (None: node stores only; a snapshot then "
        "restores only on the node that made it).",
    )
    max_per_namespace: int | None = Field(
        default=None, ge=1, description="Most snapshots a namespace keeps (oldest go first)."
    )
    max_age_seconds: float | None = Field(
        default=None, gt=0, description="Snapshots older than this are deleted."
    )


class GemConfig(_Config):
    """The GEM env API (``/apis/v1/envs/gem/*``): its table of env instances."""

    idle_ttl_seconds: float = Field(
        default=600.0,
        gt=0,
        description="An env instance unused this long is closed (and its sandbox deleted).",
    )
    reap_interval_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="How often (at most) the table looks for idle instances; a quarter of "
        "idle_ttl_seconds when that is shorter.",
    )
    lease_margin_seconds: float = Field(
        default=60.0,
        ge=0,
        description="Extra seconds of an instance's sandbox lease over idle_ttl_seconds (the "
        "lease outlives a reap cycle, so the reaper, not the lease, ends an idle instance).",
    )
    max_instances: int = Field(
        default=10_000, ge=1, description="Most env instances open in the platform."
    )
    max_instances_per_namespace: int = Field(
        default=2_000, ge=1, description="Most env instances one namespace may have open."
    )


class ServerArgs(_Config):
    """The platform's settings: the ``args:`` block of ``serve_config.yaml`` (see ``configs/``)."""

    runtime: RuntimeConfig = Field(
        default_factory=BwrapRuntimeConfig,
        description="Sandbox backend every Worker uses (bwrap by default).",
    )
    state: StateConfig = Field(
        default_factory=StateConfig,
        description="Where the Scheduler keeps its registry: memory, or Redis when "
        "state.redis_url is set.",
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
        default=1 << 30,
        ge=1,
        description="Largest file or archive body one upload may carry, and one buffered read "
        "(SDK ``read_file``) may return. REST bodies are streamed, so this caps disk use, "
        "not memory.",
    )
    max_read_bytes: int = Field(
        default=256 << 20,
        ge=1,
        description="Largest file or archive one read returns (REST download, SDK read_file, "
        "Ray transport): a regular file over it is refused at once with too_large (413); a "
        "stream of unknown size (a device such as /dev/zero, a growing file) is cut off there.",
    )
    max_output_bytes: int = Field(
        default=64 << 20,
        ge=1024,
        description="Most output one command may return per stream (exec stdout and stderr, "
        "a session's merged output): a request asking for more is held to this, and its "
        "result says truncated=true when the output went past it.",
    )
    max_request_bytes: int = Field(
        default=16 << 20,
        ge=1024,
        description="Largest JSON request body the Admin accepts (413 too_large beyond it). "
        "File and archive uploads are streamed and bounded by max_file_bytes instead.",
    )
    max_sessions_per_sandbox: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="Bash sessions one sandbox may hold at once; one more is refused with "
        "resource_exhausted (409).",
    )
    max_processes_per_sandbox: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="Background processes (/processes) one sandbox may run at once; one more "
        "is refused with resource_exhausted (409). Ended ones do not count.",
    )
    max_pids_per_sandbox: int = Field(
        default=32_768,
        ge=8,
        description="Largest resources.pids a create may ask for on any node.",
    )
    rocklet_ping_interval_seconds: float | None = Field(
        default=10.0,
        gt=0,
        description="A rocklet silent for this long is pinged; None = never (only its exit "
        "is noticed).",
    )
    rocklet_ping_timeout_seconds: float = Field(
        default=20.0,
        gt=0,
        description="A rocklet that does not answer a ping within this marks its sandbox "
        "failed (reason agent_unresponsive); a stopped or wedged agent never stays 'running'.",
    )
    default_lease_seconds: float | None = Field(
        default=600.0,
        gt=0,
        description="Lease of a sandbox whose create request sets none: it is reaped when no "
        "call or heartbeat names it for this long. None = no lease (TTL only).",
    )
    max_lease_seconds: float = Field(
        default=86_400.0, gt=0, description="Largest lease a create request may ask for."
    )
    max_creates_in_flight: int = Field(
        default=64, ge=1, description="Creates running at once in the whole cluster."
    )
    max_creates_in_flight_per_node: int = Field(
        default=16, ge=1, description="Creates running at once on one Worker (node)."
    )
    max_queued_creates: int = Field(
        default=2048,
        ge=0,
        description="Creates that may wait for a slot; beyond this they get 429 at once.",
    )
    create_queue_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        description="Longest a create waits in the queue before it gets 429 with its position.",
    )
    quotas: dict[str, Quota] = Field(
        default_factory=dict, description="Per-namespace quotas, by namespace name."
    )
    default_quota: Quota | None = Field(
        default=None, description="Quota of namespaces not listed in ``quotas``."
    )
    warm_pool_size: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Started sandboxes each Worker keeps ready for creates that ask for the "
        "default spec (no image, resources, network, env or workdir of their own): such a "
        "create takes one instead of starting a sandbox. They count against "
        "max_sandboxes_per_node. bwrap and local only (a docker Worker ignores it).",
    )
    warm_pools: list[WarmPoolConfig] = Field(
        default_factory=list,
        description="Per-image warm pools ({image, size, resources}): a create whose spec is "
        "the pool's (same image and resources, no network, env or workdir of its own) takes "
        "a started sandbox from it. Filled after warm_pool_size's default pool, within "
        "max_sandboxes_per_node; bwrap and local only.",
    )
    upload_idle_seconds: float = Field(
        default=60.0, gt=0, description="A chunked upload idle this long is aborted."
    )
    auth: AuthConfig = Field(
        default_factory=AuthConfig, description="Bearer tokens and namespaces of the REST API."
    )
    audit: AuditConfig = Field(
        default_factory=AuditConfig, description="Audit log sinks (JSONL file, Redis stream)."
    )
    console: ConsoleConfig = Field(
        default_factory=ConsoleConfig, description="The web console at /ui."
    )
    notify: NotifyConfig = Field(
        default_factory=NotifyConfig, description="Webhook on failed sandboxes and lost Workers."
    )
    tracing: TracingConfig = Field(
        default_factory=TracingConfig, description="Trace ids and OpenTelemetry export."
    )
    compat: CompatConfig = Field(
        default_factory=CompatConfig,
        description="Image mapping of the compatibility APIs (ROCK, SandboxFusion).",
    )
    llm: LLMConfig = Field(
        default_factory=LLMConfig,
        description="Model service: trajectory storage (local, S3) and per-sandbox limits.",
    )

    dataplane: DataPlaneConfig = Field(
        default_factory=DataPlaneConfig,
        description="The per-node direct data plane (each Worker's HTTP server).",
    )

    ports: PortsConfig = Field(
        default_factory=PortsConfig,
        description="Ports relayed into sandboxes (HTTP/WebSocket proxy, TCP tunnels).",
    )
    snapshots: SnapshotConfig = Field(
        default_factory=SnapshotConfig,
        description="Snapshot archives: S3 store and retention (issue 16).",
    )
    gem: GemConfig = Field(
        default_factory=GemConfig,
        description="The GEM env API: idle TTL and instance limits of its env table.",
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
