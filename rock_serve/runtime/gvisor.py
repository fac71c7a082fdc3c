"""gVisor runtime: the docker runtime with ``runsc`` as the containers' OCI runtime.

A sandbox is the same container as in :mod:`rock_serve.runtime.docker` (same rocklet exec,
labels, adoption), but its processes run on gVisor's Sentry, a user-space kernel that answers
their system calls; the host kernel sees only the Sentry and its gofer, both under runsc's own
seccomp filters. The cost (create, exec, memory) is measured by ``bench/runtime.py``.

The Docker daemon must know runsc under two runtime names (``scripts/start-dockerd``
registers both through ``/etc/docker/daemon.json``):

- ``oci_runtime`` (``runsc``, runtimeArgs ``--network=none``) for sandboxes with network
  ``none``: gVisor's own network stack with only loopback. runsc 2022 (Debian 12) cannot put
  its netstack on a network namespace of a kernel that has ``net.core.rmem_default`` in every
  namespace (6.x): it takes each namespace for the root one and refuses to start.
- ``network_oci_runtime`` (``runsc-hostinet``, ``--network=host``) for ``bridge`` and
  ``host`` (when ``allow_network``): socket calls go to the container's namespace.

Both also get ``--oci-seccomp``: the Sentry applies Docker's default seccomp profile (which
the daemon puts in every container's spec) to the container's init. runsc 2022 gives exec'd
processes no filter, and the rocklet runs in an exec, so the rocklet loads the default profile
(:mod:`rock_serve.runtime._seccomp`, from ``/.rock/seccomp.bpf``) itself before it serves,
after no-new-privs; every sandbox process inherits it, so ``mount``, ``unshare``,
``keyctl``... fail with EPERM inside as under runc, on top of the Sentry's own boundary. A
spec's ``seccomp: unconfined`` (admins only) leaves it out.

Where gVisor differs from runc, and what this runtime does about it:

- **Processes.** A sandbox process is a Sentry task backed by several host threads (about 9
  per process with the ptrace platform, measured), and the Sentry dies when the host refuses
  it a thread. So ``pids`` is enforced inside: ``RLIMIT_NPROC`` = pids on the container's
  process (the rocklet's exec and every child inherit it; gVisor counts per user within the
  sandbox, and its root lacks CAP_SYS_RESOURCE to raise it). The host pids cgroup gets
  ``pids * HOST_TASKS_PER_PID + HOST_TASKS_BASE``, a backstop on host threads.
- **Memory.** The host memory cgroup holds the Sentry, which charges the sandbox's memory and
  its own (about 11 MiB idle, 0.6 MiB more per process, measured; runc: 0.2 MiB), so it gets
  ``memory_mb + sentry_memory_mb``. gVisor 2022 has no OOM killer of its own: going over the
  limit gets the Sentry killed, so the whole sandbox fails with ``oom_killed`` (not only the
  allocating process as under runc). Docker's exec stream then
  stays open; a pidfd on the Sentry (:class:`GvisorRocklet`) drops the handle when the Sentry
  exits, so calls fail at once with ``RockletUnavailable`` instead of hanging.
- **Stats.** The Sentry's own cgroupfs shows no host limits, so :meth:`GvisorRocklet.stats`
  reports the limits and usage of the container's host cgroups (what is enforced) and the
  pids limit above; process counts come from inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar, cast

import docker.errors
from docker.types import Mount, Ulimit

from rock_serve.config import GvisorRuntimeConfig
from rock_serve.errors import InvalidConfig
from rock_serve.protocol import (
    FailureReason,
    SandboxInfo,
    SandboxSpec,
    SandboxState,
    SandboxStats,
)
from rock_serve.protocol.ops import Op
from rock_serve.runtime._docker_node import exiting
from rock_serve.runtime._docker_stream import ExecRocklet
from rock_serve.runtime._seccomp import compile_profile
from rock_serve.runtime._sync import run_sync
from rock_serve.runtime.docker import AGENT_MOUNT, DockerRuntime

__all__ = ["HOST_TASKS_BASE", "HOST_TASKS_PER_PID", "GvisorRocklet", "GvisorRuntime", "host_stats"]

log = logging.getLogger(__name__)

R = TypeVar("R")

#: Host tasks allowed per sandbox process (ptrace platform: about 9 measured) ...
HOST_TASKS_PER_PID = 16
#: ... plus the Sentry's and gofer's own threads (about 40 idle).
HOST_TASKS_BASE = 256
#: The default seccomp profile as BPF, in agent_dir (so at /.rock in every sandbox).
SECCOMP_FILE = "seccomp.bpf"


def _write_file(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _oom_control(pid: int) -> str | None:
    """The ``memory.oom_control`` (v1) or ``memory.events`` (v2) file of ``pid``'s cgroup."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            rows = [line.strip().split(":", 2) for line in f]
    except OSError:
        return None
    for row in rows:
        if len(row) == 3 and row[2] != "/" and "memory" in row[1].split(","):
            return f"/sys/fs/cgroup/memory{row[2]}/memory.oom_control"
    for row in rows:
        if len(row) == 3 and row[1] == "" and row[2] != "/":
            return f"/sys/fs/cgroup{row[2]}/memory.events"
    return None


def _oom_kill_count(path: str | None) -> int | None:
    if path is None:
        return None
    try:
        with open(path) as f:
            for row in f:
                parts = row.split()
                if len(parts) == 2 and parts[0] == "oom_kill":
                    return int(parts[1])
    except (OSError, ValueError):
        return None
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if text in ("", "max"):
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None


def host_stats(pid: int) -> dict[str, Any]:
    """Limits and usage of the host cgroups of process ``pid`` (the Sentry).

    Keys are :class:`~rock_serve.protocol.SandboxStats` fields; unreadable ones are absent.
    """
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    dirs: dict[str, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3 or parts[2] == "/":
            continue
        for ctrl in parts[1].split(",") if parts[1] else [""]:
            dirs[ctrl] = f"/sys/fs/cgroup/{ctrl}{parts[2]}" if ctrl else f"/sys/fs/cgroup{parts[2]}"
    out: dict[str, Any] = {}
    if "" in dirs and os.path.exists(os.path.join(dirs[""], "cgroup.controllers")):
        d = dirs[""]
        out["cgroup"] = "v2"
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(d, "cpu.max")) as f:
                quota, period = f.read().split()
            if quota != "max":
                out["cpu_limit"] = int(quota) / int(period)
        out["memory_limit_bytes"] = _read_int(os.path.join(d, "memory.max"))
        out["memory_usage_bytes"] = _read_int(os.path.join(d, "memory.current"))
    else:
        out["cgroup"] = "v1"
        if "cpu" in dirs:
            cfs_quota = _read_int(os.path.join(dirs["cpu"], "cpu.cfs_quota_us"))
            cfs_period = _read_int(os.path.join(dirs["cpu"], "cpu.cfs_period_us"))
            if cfs_quota is not None and cfs_quota > 0 and cfs_period:
                out["cpu_limit"] = cfs_quota / cfs_period
        if "cpuacct" in dirs:
            usage = _read_int(os.path.join(dirs["cpuacct"], "cpuacct.usage"))
            if usage is not None:
                out["cpu_usage_seconds"] = usage / 1e9
        if "memory" in dirs:
            limit = _read_int(os.path.join(dirs["memory"], "memory.limit_in_bytes"))
            if limit is not None and limit < (1 << 60):
                out["memory_limit_bytes"] = limit
            out["memory_usage_bytes"] = _read_int(
                os.path.join(dirs["memory"], "memory.usage_in_bytes")
            )
    return {k: v for k, v in out.items() if v is not None}


class GvisorRocklet(ExecRocklet):
    """A rocklet in a runsc container: dropped when the Sentry exits; host-side stats."""

    def __init__(
        self,
        raw: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        name: str = "",
        exec_id: str = "",
        sentry_pid: int = 0,
        pids_limit: int | None = None,
        sentry_bytes: int = 0,
        on_sentry_exit: Callable[[int | None], None] | None = None,
    ) -> None:
        super().__init__(raw, writer, name=name, exec_id=exec_id)
        #: Host pid of the sandbox's Sentry (``runsc-sandbox boot``).
        self.sentry_pid = sentry_pid
        self._on_sentry_exit = on_sentry_exit
        #: The memory cgroup's oom_control, found while the Sentry lives (for its OOM count).
        self._oom_control = _oom_control(sentry_pid) if sentry_pid else None
        self.pids_limit = pids_limit
        #: What the host memory limit holds beyond the sandbox's own (the Sentry's share).
        self.sentry_bytes = sentry_bytes
        self._pidfd: int | None = None
        if sentry_pid:
            try:
                self._pidfd = os.pidfd_open(sentry_pid)
            except OSError:  # gone already: the stream ends by itself, or the ping fails
                self._pidfd = None
            else:
                asyncio.get_running_loop().add_reader(self._pidfd, self._sentry_exited)

    def _unwatch(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _report_exit(self) -> None:
        """Tell the runtime (once) that the Sentry is gone, with its cgroup's OOM count."""
        report, self._on_sentry_exit = self._on_sentry_exit, None
        if report is not None:
            # Read now: the cgroup goes with the container, and Docker does not see runsc's
            # OOM kills (State.OOMKilled stays false).
            report(_oom_kill_count(self._oom_control))

    async def _fail(self, reason: str) -> None:
        # The exec stream may end before the pidfd says so (the Sentry's threads are still
        # exiting): a Sentry that is exiting is reported here already.
        if self.sentry_pid and exiting(self.sentry_pid):
            self._report_exit()
        await super()._fail(reason)

    def _sentry_exited(self) -> None:
        self._unwatch()
        self._report_exit()
        if self.alive:
            log.info("gvisor runtime: the Sentry of %s exited", self.name)
            task = asyncio.ensure_future(self._fail("the gVisor sandbox (runsc) exited"))
            task.add_done_callback(lambda _: self.abort())

    async def op(self, operation: Op[R], extra: dict[str, Any] | None = None) -> R:
        """Every operation as the rocklet runs it; stats (whatever operation returns them:
        the Worker sends its operations here, not through ``stats()``) with the limits and
        usage of the container's host cgroups, which the Sentry's own view does not have.
        """
        result = await super().op(operation, extra)
        if isinstance(result, SandboxStats):
            return cast(R, await self._with_host_view(result))
        return result

    async def _with_host_view(self, mine: SandboxStats) -> SandboxStats:
        update = await run_sync(host_stats, self.sentry_pid) if self.sentry_pid else {}
        if self.pids_limit is not None:
            update["pids_limit"] = self.pids_limit
        if "memory_limit_bytes" in update:
            update["memory_limit_bytes"] -= self.sentry_bytes
        if update.get("cpu_limit"):
            update["cpu_count"] = min(mine.cpu_count, max(1, -int(-update["cpu_limit"] // 1)))
        return mine.model_copy(update=update)

    async def close(self) -> None:
        """Stop watching the Sentry, then close as the docker runtime does."""
        self._unwatch()
        await super().close()


class GvisorRuntime(DockerRuntime):
    """Docker containers run by gVisor's runsc; see the module docstring."""

    name = "gvisor"
    config: GvisorRuntimeConfig

    def __init__(self, config: GvisorRuntimeConfig | None = None) -> None:
        super().__init__(config or GvisorRuntimeConfig())
        self._registered: set[str] = set()
        #: OOM kills counted in a sandbox's cgroup when its Sentry exited.
        self._sentry_ooms: dict[str, int] = {}
        #: Sandbox -> host pid of its Sentry that exited (seen by the pidfd).
        self._sentry_gone: dict[str, int] = {}
        if self.config.seccomp:
            try:
                _write_file(os.path.join(self.agent_dir, SECCOMP_FILE), compile_profile())
            except OSError as exc:
                raise InvalidConfig(
                    f"gvisor runtime: cannot write the seccomp filter into {self.agent_dir}: {exc}"
                ) from None

    def _rocklet_options(self, c: dict[str, Any]) -> list[str]:
        """``--seccomp``: the rocklet loads the default profile itself (see the module doc)."""
        if not self.config.seccomp or "seccomp=unconfined" in (
            c["HostConfig"].get("SecurityOpt") or []
        ):
            return []
        return ["--seccomp", f"{AGENT_MOUNT}/{SECCOMP_FILE}"]

    async def _check_registered(self, runtime_name: str) -> None:
        """Fail with a hint when the daemon does not know ``runtime_name`` (asked once)."""
        if runtime_name in self._registered:
            return
        api = await self._api()
        try:
            info: dict[str, Any] = await self._call(api.info)
        except docker.errors.APIError as exc:
            raise InvalidConfig(f"gvisor runtime: docker info failed: {exc}") from None
        known = set((info.get("Runtimes") or {}).keys())
        if runtime_name not in known:
            raise InvalidConfig(
                f"gvisor runtime: the Docker daemon has no OCI runtime {runtime_name!r} "
                f"(it has {', '.join(sorted(known)) or 'none'}); register runsc with "
                "scripts/start-dockerd"
            )
        self._registered.add(runtime_name)

    def _oci_runtime(self, network_mode: str) -> str:
        if network_mode == "none":
            return self.config.oci_runtime
        if self.config.network_oci_runtime is None:
            raise InvalidConfig(
                "gvisor runtime: network_oci_runtime is None, so only network 'none' is allowed"
            )
        return self.config.network_oci_runtime

    def _host_config(
        self,
        spec: SandboxSpec,
        network_mode: str,
        node_python: tuple[str, list[Mount]] | None,
    ) -> dict[str, Any]:
        """The docker runtime's host config, run by runsc, with pids enforced inside."""
        kwargs = super()._host_config(spec, network_mode, node_python)
        kwargs["runtime"] = self._oci_runtime(network_mode)
        if "mem_limit" in kwargs:
            extra = self.config.sentry_memory_mb << 20
            kwargs["mem_limit"] += extra
            kwargs["memswap_limit"] += extra
        pids = kwargs.pop("pids_limit", None)
        if pids is not None:
            kwargs["ulimits"] = [Ulimit(name="nproc", soft=pids, hard=pids)]
            kwargs["pids_limit"] = pids * HOST_TASKS_PER_PID + HOST_TASKS_BASE
        return kwargs

    async def create(self, sandbox_id: str, spec: SandboxSpec) -> SandboxInfo:
        """Create the container under runsc (checks once that the daemon has runsc)."""
        if spec.network == "none":
            await self._check_registered(self._oci_runtime("none"))
        elif self.config.allow_network:
            await self._check_registered(self._oci_runtime(spec.network))
        return await super().create(sandbox_id, spec)

    async def _new_handle(
        self,
        raw: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        sandbox_id: str,
        exec_id: str,
    ) -> ExecRocklet:
        """A :class:`GvisorRocklet` watching the container's Sentry."""
        try:
            c = await self._inspect(sandbox_id)
        except BaseException:
            writer.close()
            raise
        sentry_pid = int(c["State"].get("Pid") or 0)
        pids = None
        for limit in c["HostConfig"].get("Ulimits") or []:
            if limit.get("Name") == "nproc":
                pids = int(limit.get("Hard") or 0) or None
        return GvisorRocklet(
            raw,
            writer,
            name=sandbox_id,
            exec_id=exec_id,
            sentry_pid=sentry_pid,
            pids_limit=pids,
            sentry_bytes=self.config.sentry_memory_mb << 20 if c["HostConfig"].get("Memory") else 0,
            on_sentry_exit=lambda kills: self._sentry_exit(sandbox_id, sentry_pid, kills),
        )

    def _sentry_exit(self, sandbox_id: str, pid: int, kills: int | None) -> None:
        self._sentry_gone[sandbox_id] = pid
        if kills:
            self._sentry_ooms[sandbox_id] = kills

    async def _rocklet_running(self, sandbox_id: str, c: dict[str, Any]) -> bool:
        """False once the Sentry is gone, whatever Docker still says of the rocklet's exec."""
        if self._sentry_gone.get(sandbox_id) == int(c["State"].get("Pid") or 0):
            return False
        return await super()._rocklet_running(sandbox_id, c)

    async def _info(self, c: dict[str, Any]) -> SandboxInfo:
        """As docker's, and an exited container whose Sentry was OOM-killed is failed."""
        info = await super()._info(c)
        sid = info.id
        if (
            info.state == SandboxState.STOPPED
            and sid in self._sentry_ooms
            and c["State"].get("ExitCode") == 137
        ):
            info = info.model_copy(
                update={"state": SandboxState.FAILED, "reason": FailureReason.OOM_KILLED}
            )
        return info

    async def oom_kills(self, sandbox_id: str) -> int:
        """As docker's, or what the cgroup counted when the Sentry exited."""
        return max(await super().oom_kills(sandbox_id), self._sentry_ooms.get(sandbox_id, 0))

    async def remove(self, sandbox_id: str) -> None:
        """As docker's; forgets the sandbox's OOM record."""
        await super().remove(sandbox_id)
        self._sentry_ooms.pop(sandbox_id, None)
        self._sentry_gone.pop(sandbox_id, None)
