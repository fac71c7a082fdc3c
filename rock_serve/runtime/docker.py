"""Docker runtime: one container per sandbox, the rocklet in a long-lived exec over its stdio.

A sandbox ``<id>`` is the container ``<scope>.<id>`` (``scope`` from the config):

- Its main process is Docker's init (tini, which reaps orphans) running ``keepalive``
  (``/.rock/keepalive``: a ``/bin/sh`` script blocked reading its stdin, which the daemon
  holds open). The rocklet runs beside it: ``python3 -I -S -c <boot> --root /`` in one
  exec whose stdin/stdout carry the rocklet's frames over a hijacked ``exec start`` connection
  (see :mod:`rock_serve.runtime._docker_stream`). Commands never cost an exec each.
- The rocklet is installed in ``agent_dir`` on the host and bind-mounted read-only at
  ``/.rock``, the only host mount. It runs with the image's ``python3`` (>= 3.8; found once
  per image by looking at the created container's files); when the image has none, this
  node's interpreter is also mounted read-only (``node_python``; see :func:`node_python`
  for what that needs).
- Hardening: Docker's defaults, checked: its seccomp profile (the daemon must support
  seccomp unless ``seccomp: false``; a spec's ``seccomp: unconfined`` turns it off), its
  masked and read-only ``/proc`` paths, no-new-privileges, capabilities as below.
- Limits: ``nano_cpus`` (1 cpu by default), ``mem_limit`` with ``memswap_limit`` equal (no
  swap), ``pids_limit``,
  a writable-layer size where the storage driver supports it (overlay2 only on xfs with
  pquota; otherwise ignored with one warning). Network ``none`` unless the spec asks for more
  and the config allows it. All capabilities dropped but ``capabilities``, no-new-privileges,
  not privileged. Labels: the ``rock.*`` labels and the spec's, plus ``rock-serve.*`` ones.

States: ``created`` is pending; a running container whose rocklet exec runs is running; a
running container without one is failed (``agent_exited``, or ``oom_killed`` when the kernel
OOM-killed in its cgroup and the rocklet died of SIGKILL); an exited container is stopped, or
failed/``oom_killed`` when its init was OOM-killed.

Adoption: the container outlives its owner. When a Worker dies, its connection closes, the
rocklet sees EOF, closes its sessions and exits; the container keeps running (failed,
``agent_exited``) and :meth:`DockerRuntime.attach` starts a fresh rocklet in it. Files and
background processes survive; the old sessions do not.

Every Docker SDK call goes through :func:`~rock_serve.runtime._sync.run_sync`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import posixpath
import re
import socket
import subprocess
import time
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.types import LogConfig, Mount

from rock_serve.config import DOCKER_TEST_IMAGE, DockerRuntimeConfig
from rock_serve.errors import (
    Conflict,
    ImageNotFound,
    InvalidConfig,
    InvalidRequest,
    RegistryUnauthorized,
    RockError,
    RockletUnavailable,
    RuntimeUnavailable,
    SandboxNotFound,
    SandboxNotRunning,
    Timeout,
)
from rock_serve.protocol import (
    FailureReason,
    RegistryAuth,
    Resources,
    SandboxInfo,
    SandboxSpec,
    SandboxState,
)
from rock_serve.rocklet.handle import RockletHandle, agent_argv, install_agent
from rock_serve.runtime._docker_images import has_python, pull, python_candidates, valid_reference
from rock_serve.runtime._docker_node import (
    PYTHON_MOUNT,
    cgroup_oom_kills,
    exiting,
    install_keepalive,
    node_python,
)
from rock_serve.runtime._docker_stream import DockerAddress, ExecRocklet, open_exec
from rock_serve.runtime._netns import BridgeNetwork, check_network, docker_guard
from rock_serve.runtime._state import check_id, labels_for, matches, process_start
from rock_serve.runtime._sync import run_sync
from rock_serve.runtime.base import LABEL_ID, LABEL_OWNER, LABEL_RUNTIME, Runtime

__all__ = [
    "AGENT_MOUNT",
    "LABEL_COMMITTED",
    "LABEL_LABELS",
    "LABEL_SCOPE",
    "PYTHON_MOUNT",
    "TEST_IMAGE",
    "DockerRuntime",
]

log = logging.getLogger(__name__)

#: The characters and shape of an image reference (name[:tag][@digest] or an image id); a
#: host path ("/", "/var/lib") never is one.
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,511}$")

#: The offline test image built by ``scripts/build-test-image``.
TEST_IMAGE = DOCKER_TEST_IMAGE
#: Where the rocklet (agent.py and its __pycache__) appears in a container.
AGENT_MOUNT = "/.rock"
#: Marks the containers of one runtime scope.
LABEL_SCOPE = "rock-serve.scope"
#: The sandbox's labels as JSON: what inspect/list report (an image's labels are not theirs).
LABEL_LABELS = "rock-serve.labels"
#: The image as the spec named it.
LABEL_IMAGE = "rock-serve.image"
#: Creation time, seconds since the epoch.
LABEL_CREATED = "rock-serve.created"
#: The node's interpreter that runs the rocklet, when the image has no python3.
LABEL_PYTHON = "rock-serve.python"
#: On an image made by :meth:`DockerRuntime.commit`: the sandbox it was committed from.
LABEL_COMMITTED = "rock-serve.committed-from"
#: Label: the spec's egress allow-list (JSON; absent = the runtime's default), see _netns.
LABEL_EGRESS = "rock-serve.egress"
#: Seconds to wait for a fresh rocklet's first reply.
START_TIMEOUT = 30.0
#: Connections to the daemon kept open (calls run in the default thread pool, at most 32).
_POOL_SIZE = 32


def _is_rocklet(process_config: dict[str, Any]) -> bool:
    """True when an exec's process is a rocklet started by this runtime."""
    args = process_config.get("arguments") or []
    return any(isinstance(a, str) and "import agent" in a and AGENT_MOUNT in a for a in args)


def _explanation(exc: docker.errors.APIError) -> str:
    return str(getattr(exc, "explanation", None) or exc)


class DockerRuntime(Runtime):
    """Docker containers; see the module docstring for what a sandbox is made of."""

    name = "docker"

    def __init__(self, config: DockerRuntimeConfig | None = None) -> None:
        self.config = config = config or DockerRuntimeConfig()
        self.address = DockerAddress.parse(config.docker_host)
        if any(not c.startswith("CAP_") for c in config.capabilities):
            raise InvalidConfig("docker runtime: capabilities must be named like CAP_CHOWN")
        try:
            self.agent_dir = install_agent(os.path.abspath(config.agent_dir))
            install_keepalive(self.agent_dir)
        except OSError as exc:
            raise InvalidConfig(
                f"docker runtime: cannot install the rocklet into {config.agent_dir}: {exc}"
            ) from None
        self._client: Any = None
        self._client_lock = asyncio.Lock()
        self._handles: dict[str, ExecRocklet] = {}
        self._exec_ids: dict[str, str] = {}
        self._starting: set[str] = set()
        #: Image id -> whether it has a usable python (probed once per image).
        self._has_python: dict[str, bool] = {}
        self._pulls: dict[str, asyncio.Future[None]] = {}
        self._networks: set[str] = set()
        self._guard: BridgeNetwork | None = None  # the host's rules for bridge_network
        self._disk_quota = True
        self._node_python: tuple[str, list[Mount]] | None = None

    # ------------------------------------------------------------------ daemon calls

    def container_name(self, sandbox_id: str) -> str:
        """The container's name: ``<scope>.<sandbox id>``."""
        return f"{self.config.scope}.{check_id(sandbox_id)}"

    async def _call(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one blocking SDK call off the loop; transport failures become 503s."""
        try:
            return await run_sync(func, *args, **kwargs)
        except (docker.errors.APIError, RockError):
            raise
        except (requests.exceptions.RequestException, docker.errors.DockerException, OSError) as e:
            raise RuntimeUnavailable(
                f"docker daemon at {self.address.url} is unreachable: {e}"
            ) from None

    async def _api(self) -> Any:
        """The SDK's low-level client, made on first use (the API version is negotiated).

        The daemon's address is tried with a plain connect first: the SDK would leave a
        socket behind for every failed attempt.
        """
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    await self._call(self._probe_daemon)
                    client = await self._call(
                        docker.APIClient,
                        base_url=self.address.url,
                        version="auto",
                        timeout=self.config.timeout_seconds,
                        max_pool_size=_POOL_SIZE,
                    )
                    if self.config.seccomp:
                        info = await self._call(client.info)
                        if not any("seccomp" in o for o in info.get("SecurityOptions") or []):
                            client.close()
                            raise InvalidConfig(
                                "docker runtime: the daemon has no seccomp support, so "
                                "containers would run without a syscall filter (set "
                                "seccomp: false to accept that)"
                            )
                    self._client = client
        return self._client

    def _probe_daemon(self) -> None:
        addr = self.address
        family = socket.AF_UNIX if addr.path is not None else socket.AF_INET
        target: Any = addr.path if addr.path is not None else (addr.host, addr.port)
        if addr.path is None:
            family = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(min(self.config.timeout_seconds, 10.0))
            sock.connect(target)

    async def _inspect(self, sandbox_id: str) -> dict[str, Any]:
        """The container of ``sandbox_id`` (``docker inspect``), checked to be this scope's."""
        api = await self._api()
        try:
            c: dict[str, Any] = await self._call(
                api.inspect_container, self.container_name(sandbox_id)
            )
        except docker.errors.NotFound:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}") from None
        except docker.errors.APIError as exc:
            raise RuntimeUnavailable(f"docker inspect failed: {_explanation(exc)}") from None
        labels = c["Config"].get("Labels") or {}
        if labels.get(LABEL_SCOPE) != self.config.scope or labels.get(LABEL_ID) != sandbox_id:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return c

    # ------------------------------------------------------------------ images

    async def _image(self, ref: str, auth: RegistryAuth | None = None) -> dict[str, Any]:
        """Inspect ``ref``, pulling it first as the pull policy says.

        Raises:
            ImageNotFound: not on this node and not pullable (or policy ``never``).
            Timeout: the pull took longer than ``pull_timeout_seconds``.
        """
        if not _REF.match(ref) or ".." in ref or "//" in ref:
            raise ImageNotFound(f"image {ref!r} is not an image reference")
        api = await self._api()
        policy = self.config.pull
        if policy != "always":
            try:
                return dict(await self._call(api.inspect_image, ref))
            except docker.errors.NotFound:
                if policy == "never":
                    raise ImageNotFound(
                        f"image {ref!r} is not on this node and the pull policy is 'never'"
                    ) from None
            except docker.errors.APIError as exc:
                raise ImageNotFound(f"image {ref!r}: {_explanation(exc)}") from None
        await self._pull(ref, auth)
        try:
            return dict(await self._call(api.inspect_image, ref))
        except docker.errors.APIError as exc:
            raise ImageNotFound(f"image {ref!r}: {_explanation(exc)}") from None

    async def _pull(self, ref: str, auth: RegistryAuth | None = None) -> None:
        """Pull ``ref`` once even when many creates ask for it at the same time."""
        pending = self._pulls.get(ref)
        if pending is None:
            pending = asyncio.ensure_future(self._pull_once(ref, auth))
            self._pulls[ref] = pending
            pending.add_done_callback(self._pull_done)
        await asyncio.shield(pending)

    def _pull_done(self, fut: asyncio.Future[None]) -> None:
        for ref, pending in list(self._pulls.items()):
            if pending is fut:
                del self._pulls[ref]
        if not fut.cancelled():
            fut.exception()  # retrieved: the waiters (if any are left) re-raise it

    async def _pull_once(self, ref: str, auth: RegistryAuth | None = None) -> None:
        api = await self._api()
        timeout = self.config.pull_timeout_seconds
        log.info("docker runtime: pulling %s", ref)
        creds = None
        if auth is not None and auth.username is not None and auth.password is not None:
            creds = {"username": auth.username, "password": auth.password.get_secret_value()}
        elif auth is not None and auth.token is not None:
            creds = {"registrytoken": auth.token.get_secret_value()}
        try:
            await asyncio.wait_for(self._call(pull, api, ref, creds), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"pulling image {ref!r} took more than {timeout:g}s") from None
        except docker.errors.APIError as exc:
            text = _explanation(exc).lower()
            if "unauthorized" in text or "authentication required" in text or "denied" in text:
                raise RegistryUnauthorized(
                    f"cannot pull image {ref!r}: {_explanation(exc)}"
                ) from None
            raise ImageNotFound(f"cannot pull image {ref!r}: {_explanation(exc)}") from None

    async def _probe_python(
        self, container_id: str, image: dict[str, Any], env: dict[str, str]
    ) -> bool:
        """Whether the created container has ``config.python`` (>= 3.8), by reading its files."""
        api = await self._api()
        candidates = python_candidates(self.config.python, image, env)
        try:
            return bool(await self._call(has_python, api, container_id, candidates))
        except docker.errors.APIError as exc:
            raise RuntimeUnavailable(f"cannot look for python3 in the image: {exc}") from None

    # ------------------------------------------------------------------ create

    def _resources(self, spec: SandboxSpec) -> Resources:
        dflt = self.config.default_resources
        mine = spec.resources
        return Resources(
            cpus=mine.cpus if mine.cpus is not None else dflt.cpus,
            memory_mb=mine.memory_mb if mine.memory_mb is not None else dflt.memory_mb,
            pids=mine.pids if mine.pids is not None else dflt.pids,
            disk_mb=mine.disk_mb if mine.disk_mb is not None else dflt.disk_mb,
        )

    async def _network_mode(self, network: str) -> str:
        if network == "none":
            return "none"
        if not self.config.allow_network:
            raise InvalidConfig(
                f"network {network!r} is not allowed by this runtime (allow_network=false)"
            )
        if network == "host":
            if not self.config.allow_host_network:
                raise InvalidConfig(
                    "network 'host' (the node's namespace, with its loopback services) needs "
                    "allow_host_network"
                )
            return "host"
        name = self.config.bridge_network
        if name not in self._networks:
            api = await self._api()
            try:
                info = await self._call(api.inspect_network, name)
            except docker.errors.NotFound:
                raise InvalidConfig(
                    f"network 'bridge' needs the docker network {name!r}, which this daemon "
                    "does not have (was dockerd started with --bridge=none?)"
                ) from None
            policy = self.config.network_policy
            self._guard = await run_sync(docker_guard, info, policy, self.config.scope)
            self._networks.add(name)
        return name

    async def _node(self) -> tuple[str, list[Mount]]:
        """The node's interpreter and its mounts (asked once)."""
        if self._node_python is None:
            exe = self.config.node_python_executable
            try:
                self._node_python = await run_sync(node_python, exe)
            except (OSError, subprocess.SubprocessError, ValueError) as exc:
                raise InvalidConfig(
                    f"docker runtime: node python {exe!r} unusable: {exc}"
                ) from None
        return self._node_python

    def _host_config(
        self,
        spec: SandboxSpec,
        network_mode: str,
        node_python: tuple[str, list[Mount]] | None,
    ) -> dict[str, Any]:
        """Keyword arguments of the SDK's ``create_host_config`` for a sandbox."""
        cfg = self.config
        res = self._resources(spec)
        mounts = [Mount(AGENT_MOUNT, self.agent_dir, type="bind", read_only=True)]
        if node_python is not None:
            mounts += node_python[1]
        kwargs: dict[str, Any] = {
            "init": True,
            "network_mode": network_mode,
            "cap_drop": ["ALL"],
            "cap_add": list(cfg.capabilities),
            # Docker's default seccomp profile (and AppArmor profile, where the host has
            # AppArmor) apply unless the spec opted out (admins only, checked by the Admin).
            "security_opt": ["no-new-privileges:true"]
            + (["seccomp=unconfined"] if spec.seccomp == "unconfined" or not cfg.seccomp else []),
            "privileged": False,
            "mounts": mounts,
            "log_config": LogConfig(type="none"),
        }
        if res.cpus is not None:
            kwargs["nano_cpus"] = int(res.cpus * 1e9)
        if res.memory_mb is not None:
            kwargs["mem_limit"] = res.memory_mb << 20
            kwargs["memswap_limit"] = res.memory_mb << 20
        if res.pids is not None:
            kwargs["pids_limit"] = res.pids
        if res.disk_mb is not None and self._disk_quota:
            kwargs["storage_opt"] = {"size": f"{res.disk_mb}M"}
        if cfg.oci_runtime:
            kwargs["runtime"] = cfg.oci_runtime
        if cfg.cgroup_parent:
            kwargs["cgroup_parent"] = cfg.cgroup_parent
        return kwargs

    async def _create_container(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        ref: str,
        network_mode: str,
        *,
        node_python: bool,
    ) -> str:
        api = await self._api()
        visible = labels_for(sandbox_id, spec, self.name)
        labels = {
            **visible,
            LABEL_SCOPE: self.config.scope,
            LABEL_LABELS: json.dumps(visible, sort_keys=True),
            LABEL_IMAGE: ref,
            LABEL_CREATED: repr(time.time()),
        }
        if spec.egress is not None:
            labels[LABEL_EGRESS] = json.dumps(spec.egress)
        node = await self._node() if node_python else None
        if node is not None:
            labels[LABEL_PYTHON] = node[0]

        def create(host: dict[str, Any], **kwargs: Any) -> Any:
            return api.create_container(ref, host_config=api.create_host_config(**host), **kwargs)

        while True:
            host_config = self._host_config(spec, network_mode, node)
            try:
                created = await self._call(
                    create,
                    host_config,
                    command=[],
                    entrypoint=list(self.config.keepalive),
                    name=self.container_name(sandbox_id),
                    hostname=sandbox_id[:63],
                    working_dir=spec.workdir,
                    environment=dict(spec.env),
                    **({"user": spec.user} if spec.user else {}),  # else the image's User
                    labels=labels,
                    stop_signal="SIGTERM",
                    stdin_open=True,
                )
                return str(created["Id"])
            except docker.errors.APIError as exc:
                text = _explanation(exc)
                if exc.status_code == 409:
                    raise Conflict(f"sandbox {sandbox_id!r} exists already") from None
                if exc.status_code == 404:
                    raise ImageNotFound(f"image {ref!r}: {text}") from None
                if "storage_opt" in host_config and "storage" in text.lower():
                    log.warning(
                        "docker runtime: the storage driver cannot limit a container's disk "
                        "(%s); disk_mb is ignored from now on",
                        text,
                    )
                    self._disk_quota = False
                    continue
                if exc.status_code is not None and exc.status_code < 500:
                    raise InvalidConfig(f"docker refused the container: {text}") from None
                raise RuntimeUnavailable(f"docker create failed: {text}") from None

    async def _remove_container(self, container: str) -> None:
        api = await self._api()
        try:
            await self._call(api.remove_container, container, force=True, v=True)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if exc.status_code == 409 and "in progress" in _explanation(exc):
                with contextlib.suppress(docker.errors.NotFound):
                    await self._call(api.wait, container, condition="removed")
                return
            raise RuntimeUnavailable(f"docker remove failed: {_explanation(exc)}") from None

    # ------------------------------------------------------------------ Runtime API

    async def create(self, sandbox_id: str, spec: SandboxSpec) -> SandboxInfo:
        """Create the container (image pulled as the policy says); nothing runs yet."""
        check_id(sandbox_id)
        if not posixpath.isabs(spec.workdir):
            raise InvalidRequest(f"workdir {spec.workdir!r} must be absolute")
        network_mode = await self._network_mode(spec.network)
        await run_sync(check_network, spec.network, spec.egress, self._guard, host_ok=True)
        if spec.egress is not None and self.config.oci_runtime:
            raise InvalidConfig(
                f"egress allow-lists live in the container's netns, which oci_runtime "
                f"{self.config.oci_runtime!r} bypasses (only egress_deny and the host's own "
                "addresses are enforced there, on the host)"
            )
        ref = spec.image or self.config.image
        image = await self._image(ref, spec.registry_auth)
        image_id = str(image["Id"])
        has_python = self._has_python.get(image_id)
        if has_python is False and not self.config.node_python:
            raise InvalidConfig(
                f"image {ref!r} has no {self.config.python} >= 3.8 and node_python is off"
            )
        cid = await self._create_container(
            sandbox_id, spec, ref, network_mode, node_python=has_python is False
        )
        if has_python is None:
            try:
                has_python = await self._probe_python(cid, image, spec.env)
            except BaseException:
                await self._remove_container(cid)
                raise
            self._has_python[image_id] = has_python
            if not has_python:
                log.info("docker runtime: image %s has no python3; using the node's", ref)
                await self._remove_container(cid)
                if not self.config.node_python:
                    raise InvalidConfig(
                        f"image {ref!r} has no {self.config.python} >= 3.8 and node_python is off"
                    )
                await self._create_container(sandbox_id, spec, ref, network_mode, node_python=True)
        return await self.inspect(sandbox_id)

    async def start(self, sandbox_id: str) -> RockletHandle:
        """Start the container and the rocklet in it; return a handle after its first reply."""
        c = await self._inspect(sandbox_id)
        state = c["State"]
        if state.get("Running") or state.get("Paused") or state.get("Restarting"):
            raise Conflict(f"sandbox {sandbox_id!r} is running already")
        api = await self._api()
        self._starting.add(sandbox_id)
        try:
            try:
                await self._call(api.start, c["Id"])
            except docker.errors.NotFound:
                raise SandboxNotFound(f"no sandbox {sandbox_id!r}") from None
            except docker.errors.APIError as exc:
                raise RuntimeUnavailable(
                    f"cannot start sandbox {sandbox_id!r}: {_explanation(exc)}"
                ) from None
            try:
                await self._apply_egress(c)
                return await self._launch(sandbox_id, c)
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.stop(sandbox_id))
                raise
        finally:
            self._starting.discard(sandbox_id)

    async def attach(self, sandbox_id: str) -> RockletHandle:
        """A handle to a running container of an earlier owner: a fresh rocklet in it.

        The container's files and processes are kept; the sessions of the earlier rocklet are
        gone (it exited when its owner's connection closed). If this instance holds a live
        handle already, that one is returned.

        Raises:
            SandboxNotFound: no such sandbox.
            SandboxNotRunning: the container is not running (pending, stopped, paused).
        """
        c = await self._inspect(sandbox_id)
        if c["State"].get("Status") != "running":
            raise SandboxNotRunning(
                f"sandbox {sandbox_id!r} is {c['State'].get('Status')}, not running"
            )
        handle = self._handles.get(sandbox_id)
        if handle is not None and handle.alive:
            return handle
        return await self._launch(sandbox_id, c)

    async def _apply_egress(self, c: dict[str, Any]) -> None:
        """Load the allow-list into a just-started container on bridge_network (its netns)."""
        if c["HostConfig"].get("NetworkMode") in ("none", "host", "default", None):
            return
        await self._network_mode("bridge")  # the guard of an earlier instance's network
        assert self._guard is not None
        api = await self._api()
        pid = (await self._call(api.inspect_container, c["Id"]))["State"].get("Pid")
        if not pid:
            raise RuntimeUnavailable(f"container {c['Name']} has no process to put rules in")
        raw = (c["Config"].get("Labels") or {}).get(LABEL_EGRESS)
        allow = await run_sync(self._guard.check, json.loads(raw) if raw else None)
        await run_sync(self._guard.apply, f"/proc/{pid}/ns/net", allow)

    async def _launch(self, sandbox_id: str, c: dict[str, Any]) -> ExecRocklet:
        """Run the rocklet in an attached exec and wait for its first reply."""
        api = await self._api()
        labels = c["Config"].get("Labels") or {}
        python = labels.get(LABEL_PYTHON) or self.config.python
        argv = agent_argv(python, AGENT_MOUNT, "--root", "/", *self._rocklet_options(c))
        try:
            created = await self._call(
                api.exec_create,
                c["Id"],
                argv,
                stdin=True,
                stdout=True,
                stderr=True,
                tty=False,
                workdir=c["Config"].get("WorkingDir") or None,  # an exec's default is /
            )
        except docker.errors.NotFound:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}") from None
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise SandboxNotRunning(f"sandbox {sandbox_id!r}: {_explanation(exc)}") from None
            raise RuntimeUnavailable(f"docker exec failed: {_explanation(exc)}") from None
        exec_id = str(created["Id"])
        raw, writer = await open_exec(
            self.address, api.api_version, exec_id, timeout=self.config.timeout_seconds
        )
        handle = await self._new_handle(raw, writer, sandbox_id, exec_id)
        old = self._handles.get(sandbox_id)
        self._handles[sandbox_id] = handle
        self._exec_ids[sandbox_id] = exec_id
        if old is not None:
            await old.close()
        try:
            await asyncio.wait_for(handle.ping(), START_TIMEOUT)
        except (RockletUnavailable, asyncio.TimeoutError) as exc:
            await handle.close()
            self._handles.pop(sandbox_id, None)
            raise RuntimeUnavailable(
                f"rocklet of {sandbox_id!r} did not start ({exc or 'timeout'}): "
                f"{handle.stderr_tail() or '(no output)'}"
            ) from None
        return handle

    def _rocklet_options(self, c: dict[str, Any]) -> list[str]:
        """Extra rocklet options for container ``c`` (a subclass may add some)."""
        return []

    async def _new_handle(
        self,
        raw: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        sandbox_id: str,
        exec_id: str,
    ) -> ExecRocklet:
        """The handle over a fresh rocklet exec's connection (a subclass may add to it)."""
        return ExecRocklet(raw, writer, name=sandbox_id, exec_id=exec_id)

    async def stop(self, sandbox_id: str) -> None:
        """Stop the container (SIGTERM to its init, SIGKILL after ``stop_timeout_seconds``).

        Every process in it dies with its init; the files stay until :meth:`remove`.
        """
        c = await self._inspect(sandbox_id)
        if c["State"].get("Status") in ("running", "paused", "restarting"):
            api = await self._api()
            try:
                await self._call(
                    api.stop, c["Id"], timeout=max(0, round(self.config.stop_timeout_seconds))
                )
            except docker.errors.NotFound:
                raise SandboxNotFound(f"no sandbox {sandbox_id!r}") from None
            except docker.errors.APIError as exc:
                raise RuntimeUnavailable(f"docker stop failed: {_explanation(exc)}") from None
        handle = self._handles.pop(sandbox_id, None)
        if handle is not None:
            await handle.close()

    async def remove(self, sandbox_id: str) -> None:
        """Kill everything and remove the container with its anonymous volumes. Idempotent."""
        check_id(sandbox_id)
        try:
            c = await self._inspect(sandbox_id)
        except SandboxNotFound:
            c = None
        if c is not None:
            await self._remove_container(c["Id"])
        handle = self._handles.pop(sandbox_id, None)
        self._exec_ids.pop(sandbox_id, None)
        if handle is not None:
            await handle.close()

    async def inspect(self, sandbox_id: str) -> SandboxInfo:
        """The sandbox's state from its container and its rocklet exec."""
        return await self._info(await self._inspect(sandbox_id))

    async def list(self, labels: dict[str, str] | None = None) -> list[SandboxInfo]:
        """Containers of this scope (also of earlier instances) whose labels match ``labels``."""
        api = await self._api()
        wanted = [f"{LABEL_SCOPE}={self.config.scope}", f"{LABEL_RUNTIME}={self.name}"]
        wanted += [f"{k}={v}" for k, v in (labels or {}).items()]
        rows = await self._call(api.containers, all=True, filters={"label": wanted})

        async def one(row: dict[str, Any]) -> SandboxInfo | None:
            sid = (row.get("Labels") or {}).get(LABEL_ID, "")
            try:
                info = await self.inspect(sid)
            except (SandboxNotFound, InvalidRequest):
                return None
            return info if matches(info.labels, labels) else None

        found = [i for i in await asyncio.gather(*(one(r) for r in rows)) if i is not None]
        found.sort(key=lambda i: (i.created_at, i.id))
        return found

    async def oom_kills(self, sandbox_id: str) -> int:
        """How many processes of the sandbox the kernel OOM-killed so far.

        Read from the container's memory cgroup while it runs (the daemon is on this node);
        otherwise 1 if Docker recorded an OOM kill, else 0.
        """
        return self._oom_kills(await self._inspect(sandbox_id))

    async def commit(self, sandbox_id: str, repo: str, tag: str = "latest") -> str:
        """Save the sandbox's filesystem as image ``repo:tag`` and return that reference.

        The image keeps the container's environment and working directory, and its source
        image's entrypoint, command and labels; the sandbox's labels are there with empty
        values (the daemon cannot drop them) and ``rock-serve.committed-from`` names it.
        The container is paused while its layer is copied. The rocklet's mount is not part of
        it. The result works as the ``image`` of new sandboxes.

        Raises:
            SandboxNotFound: no such sandbox.
            InvalidRequest: ``repo`` or ``tag`` is not a valid image reference.
        """
        if not valid_reference(repo, tag):
            raise InvalidRequest(f"{repo}:{tag} is not a valid image reference")
        c = await self._inspect(sandbox_id)
        api = await self._api()
        source: dict[str, Any] = {}
        with contextlib.suppress(docker.errors.APIError):
            source = (await self._call(api.inspect_image, c["Image"])).get("Config") or {}
        conf = dict(c["Config"])
        conf.update(
            Entrypoint=source.get("Entrypoint") or [],
            Cmd=source.get("Cmd") or [],
            # The daemon adds the container's labels whose keys are missing: blank them.
            Labels={
                **dict.fromkeys(c["Config"].get("Labels") or {}, ""),
                **(source.get("Labels") or {}),
                LABEL_COMMITTED: sandbox_id,
            },
            Hostname="",
            AttachStdin=False,
            OpenStdin=False,
            StdinOnce=False,
        )
        try:
            await self._call(api.commit, c["Id"], repository=repo, tag=tag, conf=conf, pause=True)
        except docker.errors.NotFound:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}") from None
        except docker.errors.APIError as exc:
            if exc.status_code is not None and exc.status_code < 500:
                msg = f"cannot commit to {repo}:{tag}: {_explanation(exc)}"
                raise InvalidRequest(msg) from None
            raise RuntimeUnavailable(f"docker commit failed: {_explanation(exc)}") from None
        return f"{repo}:{tag}"

    async def close(self) -> None:
        """Close the rocklet connections and the API client.

        The rocklets exit; the containers keep running and can be reattached.
        """
        handles = list(self._handles.values())
        self._handles.clear()
        await asyncio.gather(*(h.close() for h in handles), return_exceptions=True)
        if self._client is not None:
            client, self._client = self._client, None
            await run_sync(client.close)

    # ------------------------------------------------------------------ state

    def _oom_kills(self, c: dict[str, Any]) -> int:
        pid = int(c["State"].get("Pid") or 0)
        count = cgroup_oom_kills(pid) if pid else None
        if count is None:
            return 1 if c["State"].get("OOMKilled") else 0
        return count

    async def _rocklet_running(self, sandbox_id: str, c: dict[str, Any]) -> bool:
        handle = self._handles.get(sandbox_id)
        if handle is not None and handle.alive:
            return True
        api = await self._api()
        for exec_id in c.get("ExecIDs") or []:
            try:
                e = await self._call(api.exec_inspect, exec_id)
            except docker.errors.APIError:
                continue
            if not e.get("Running") or not _is_rocklet(e.get("ProcessConfig") or {}):
                continue
            pid = int(e.get("Pid") or 0)
            # The daemon may end the stream a moment before it records the exit.
            if pid and os.path.isdir("/proc/1") and process_start(pid) is None:
                continue
            return True
        return False

    async def _failure_reason(self, sandbox_id: str, c: dict[str, Any]) -> FailureReason:
        code: int | None = None
        exec_id = self._exec_ids.get(sandbox_id)
        if exec_id is not None:
            api = await self._api()
            with contextlib.suppress(docker.errors.APIError):
                code = (await self._call(api.exec_inspect, exec_id)).get("ExitCode")
        if code in (None, 137) and self._oom_kills(c) > 0:
            return FailureReason.OOM_KILLED
        return FailureReason.AGENT_EXITED

    async def _settled(self, c: dict[str, Any]) -> dict[str, Any]:
        """``c`` again once the daemon has recorded the exit of a container whose init exits.

        When a container's init dies (an OOM kill, say), the kernel kills the rest, the
        rocklet's stream ends, and only then does the daemon record that the container exited
        and why; this waits for that (``docker wait``, bounded).
        """
        pid = int(c["State"].get("Pid") or 0)
        if not pid or not os.path.isdir("/proc/1") or not exiting(pid):
            return c
        api = await self._api()
        with contextlib.suppress(docker.errors.APIError, RuntimeUnavailable):
            await self._call(api.wait, c["Id"], timeout=5, condition="not-running")
        with contextlib.suppress(docker.errors.NotFound):
            c = await self._call(api.inspect_container, c["Id"])
        return c

    async def _info(self, c: dict[str, Any]) -> SandboxInfo:
        labels = c["Config"].get("Labels") or {}
        sandbox_id = labels[LABEL_ID]
        reason: FailureReason | None = None
        pid: int | None = None
        if c["State"].get("Status") == "running" and not await self._rocklet_running(sandbox_id, c):
            c = await self._settled(c)
        st = c["State"]
        status = st.get("Status")
        if status == "created":
            state = SandboxState.PENDING
        elif status in ("running", "paused", "restarting"):
            if await self._rocklet_running(sandbox_id, c):
                state, pid = SandboxState.RUNNING, int(st.get("Pid") or 0) or None
            elif sandbox_id in self._starting:
                state = SandboxState.STARTING
            else:
                state = SandboxState.FAILED
                reason = await self._failure_reason(sandbox_id, c)
        elif status == "removing":
            state = SandboxState.STOPPING
        elif st.get("OOMKilled") and st.get("ExitCode") == 137:
            state, reason = SandboxState.FAILED, FailureReason.OOM_KILLED
        elif status == "dead":
            state, reason = SandboxState.FAILED, FailureReason.LOST
        else:
            state = SandboxState.STOPPED
        try:
            visible = json.loads(labels.get(LABEL_LABELS) or "{}")
        except ValueError:
            visible = {k: v for k, v in labels.items() if k in (LABEL_ID, LABEL_OWNER)}
        try:
            created = float(labels.get(LABEL_CREATED) or 0)
        except ValueError:
            created = 0.0
        return SandboxInfo(
            id=sandbox_id,
            state=state,
            reason=reason,
            runtime=self.name,
            image=labels.get(LABEL_IMAGE) or c["Config"].get("Image"),
            labels=visible,
            created_at=created,
            pid=pid,
        )
