"""Local runtime: the rocklet as a plain process in a directory. No isolation at all.

For development on any OS. Every sandbox is ``<state_dir>/<id>/``: ``meta.json`` plus
``root/``, which is the rocklet's ``--root`` (its file API is confined there), its working
directory and ``HOME``. Nothing else is enforced: commands see the host, its network and its
files, and resource limits are ignored. The runtime logs a loud warning saying so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time

from rock_serve.config import LocalRuntimeConfig
from rock_serve.errors import (
    Conflict,
    InvalidConfig,
    SandboxNotFound,
)
from rock_serve.protocol import SandboxInfo, SandboxSpec
from rock_serve.rocklet.handle import AGENT_PATH, RockletHandle, agent_argv
from rock_serve.runtime._state import (
    SandboxMeta,
    alive,
    check_id,
    finish_stop,
    labels_for,
    launch,
    list_metas,
    matches,
    process_start,
    read_meta,
    to_info,
    write_meta,
)
from rock_serve.runtime._sync import run_sync
from rock_serve.runtime.base import Runtime

__all__ = ["MARKER_ENV", "LocalRuntime"]

log = logging.getLogger(__name__)

#: Environment variable set on every process of a local sandbox (its directory), so that
#: stop/remove find processes that left the rocklet's process tree.
MARKER_ENV = "ROCK_LOCAL_SANDBOX"

_WARNING = (
    "rock-serve LOCAL runtime: sandboxes are plain processes WITHOUT ANY ISOLATION "
    "(no namespaces, no limits, full host and network access). Use it for development only."
)


def _default_state_dir() -> str:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"rock-serve-local-{uid}")


class LocalRuntime(Runtime):
    """Sandboxes as unisolated processes in per-sandbox directories."""

    name = "local"

    def __init__(self, config: LocalRuntimeConfig | None = None) -> None:
        self.config = config or LocalRuntimeConfig()
        self.state_dir = os.path.abspath(self.config.state_dir or _default_state_dir())
        self.python = self.config.python or sys.executable
        if shutil.which(self.python) is None:
            raise InvalidConfig(f"local runtime: python interpreter {self.python!r} not found")
        try:
            os.makedirs(self.state_dir, exist_ok=True)
        except OSError as exc:
            raise InvalidConfig(
                f"local runtime: cannot use state_dir {self.state_dir}: {exc}"
            ) from None
        self._handles: dict[str, RockletHandle] = {}
        self._warned = False

    def _dir(self, sandbox_id: str) -> str:
        return os.path.join(self.state_dir, check_id(sandbox_id))

    def _meta(self, sandbox_id: str) -> SandboxMeta:
        meta = read_meta(self._dir(sandbox_id))
        if meta is None or meta.runtime != self.name:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return meta

    async def create(self, sandbox_id: str, spec: SandboxSpec) -> SandboxInfo:
        """Make the sandbox directory and its record; nothing runs yet."""
        if not self._warned:
            log.warning(_WARNING)
            self._warned = True
        path = self._dir(sandbox_id)
        if spec.image is not None:
            raise InvalidConfig("the local runtime has no images; leave spec.image unset")
        if spec.egress is not None:
            raise InvalidConfig("the local runtime enforces no egress allow-list (host network)")
        try:
            os.mkdir(path)
        except FileExistsError:
            raise Conflict(f"sandbox {sandbox_id!r} exists already") from None
        os.mkdir(os.path.join(path, "root"))
        meta = SandboxMeta(
            id=sandbox_id,
            runtime=self.name,
            labels=labels_for(sandbox_id, spec, self.name),
            spec=spec.model_dump(mode="json"),
        )
        write_meta(path, meta)
        return self._info(meta)

    async def start(self, sandbox_id: str) -> RockletHandle:
        """Start the rocklet in the sandbox directory and return a connected handle."""
        meta = self._meta(sandbox_id)
        if alive(meta):
            raise Conflict(f"sandbox {sandbox_id!r} is running already")
        path = self._dir(sandbox_id)
        root = os.path.join(path, "root")
        spec = SandboxSpec.model_validate(meta.spec)
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": root,
            "TMPDIR": os.environ.get("TMPDIR", tempfile.gettempdir()),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
        }
        env.update(spec.env)
        env[MARKER_ENV] = path
        return await launch(
            path,
            meta,
            agent_argv(self.python, os.path.dirname(AGENT_PATH), "--root", root),
            env=env,
            cwd=root,
            handles=self._handles,
            stop=lambda: self.stop(sandbox_id),
            timeout=30,
        )

    async def stop(self, sandbox_id: str) -> None:
        """Kill the rocklet, its sessions and anything else carrying the sandbox's marker."""
        meta = self._meta(sandbox_id)
        await run_sync(_kill_sandbox, self._dir(sandbox_id), meta)
        await finish_stop(self._dir(sandbox_id), meta, self._handles)

    async def remove(self, sandbox_id: str) -> None:
        """Kill everything and delete the directory; a missing sandbox is no error."""
        path = self._dir(sandbox_id)
        meta = read_meta(path)
        if meta is not None:
            await run_sync(_kill_sandbox, path, meta)
        handle = self._handles.pop(sandbox_id, None)
        if handle is not None:
            await handle.close()
        if os.path.isdir(path):
            await run_sync(shutil.rmtree, path, ignore_errors=True)

    async def inspect(self, sandbox_id: str) -> SandboxInfo:
        """State from the record and the rocklet's process."""
        return self._info(self._meta(sandbox_id))

    async def list(self, labels: dict[str, str] | None = None) -> list[SandboxInfo]:
        """Sandboxes in the state dir (also those of earlier instances) matching ``labels``."""
        metas = await run_sync(list_metas, self.state_dir, self.name)
        return [self._info(m) for m in metas if matches(m.labels, labels)]

    async def close(self) -> None:
        """Forget the handles; sandboxes keep running until stopped or removed."""
        self._handles.clear()

    def _info(self, meta: SandboxMeta) -> SandboxInfo:
        return to_info(meta)


def sandbox_pids(path: str, meta: SandboxMeta) -> set[int]:
    """Pids that belong to the sandbox at ``path``: its rocklet, descendants and marked ones."""
    marker = f"{MARKER_ENV}={path}".encode() + b"\0"
    root = meta.pid if meta.pid is not None and process_start(meta.pid) == meta.pid_start else None
    parents: dict[int, int] = {}
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            parents[pid] = int(stat[stat.rindex(b")") + 2 :].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except (OSError, ValueError):
            continue
        if env.startswith(marker) or b"\0" + marker in env:
            found.add(pid)
    if root is not None:
        found.add(root)
        changed = True
        while changed:
            changed = False
            for pid, ppid in parents.items():
                if ppid in found and pid not in found:
                    found.add(pid)
                    changed = True
    found.discard(os.getpid())
    return found


def _kill_sandbox(path: str, meta: SandboxMeta, timeout: float = 5.0) -> None:
    if not os.path.isdir("/proc"):  # pragma: no cover - non-Linux: best effort
        if meta.pid is not None:
            with contextlib.suppress(OSError):
                os.killpg(meta.pid, signal.SIGKILL)
        return
    deadline = time.monotonic() + timeout
    while True:
        pids = {p for p in sandbox_pids(path, meta) if process_start(p) is not None}
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            log.warning("local sandbox %s: processes survive SIGKILL: %s", meta.id, sorted(pids))
            return
        time.sleep(0.005)
