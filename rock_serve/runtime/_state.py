"""On-disk sandbox records shared by the process-based runtimes (local, bwrap).

Each sandbox has ``<state_dir>/<id>/meta.json``; a new runtime instance on the same state dir
finds, inspects and removes what an earlier one made by scanning these files.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rock_serve.errors import InvalidRequest, RockletUnavailable, RuntimeUnavailable
from rock_serve.protocol import FailureReason, SandboxInfo, SandboxSpec, SandboxState
from rock_serve.rocklet.handle import RockletHandle
from rock_serve.runtime.base import LABEL_ID, LABEL_OWNER, LABEL_RUNTIME

__all__ = [
    "META",
    "SandboxMeta",
    "check_id",
    "labels_for",
    "list_metas",
    "matches",
    "process_start",
    "read_meta",
    "write_meta",
]

META = "meta.json"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class SandboxMeta(BaseModel):
    """What a runtime persists about one sandbox."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(description="Sandbox id.")
    runtime: str = Field(description="Runtime that made it.")
    image: str | None = Field(default=None, description="Image or rootfs.")
    labels: dict[str, str] = Field(default_factory=dict, description="All labels.")
    created_at: float = Field(default_factory=time.time, description="Creation time.")
    spec: dict[str, Any] = Field(default_factory=dict, description="The spec it was made from.")
    started: bool = Field(default=False, description="start() was called at least once.")
    stopped: bool = Field(default=False, description="stop() was called after the last start.")
    pid: int | None = Field(default=None, description="Host pid of the first process.")
    pid_start: int | None = Field(default=None, description="Start time of pid (clock ticks).")
    uid_base: int | None = Field(
        default=None, description="First host uid/gid of its user namespace's range, if any."
    )


def check_id(sandbox_id: str) -> str:
    """Validate a sandbox id (it names a directory and a cgroup).

    Raises:
        InvalidRequest: not 1-128 characters of ``[A-Za-z0-9_.-]`` starting alphanumeric.
    """
    if not isinstance(sandbox_id, str) or not _ID.match(sandbox_id):
        raise InvalidRequest(f"bad sandbox id {sandbox_id!r}")
    return sandbox_id


def labels_for(sandbox_id: str, spec: SandboxSpec, runtime: str) -> dict[str, str]:
    """The spec's labels plus the ``rock.*`` labels every sandbox carries."""
    labels = dict(spec.labels)
    labels[LABEL_ID] = sandbox_id
    labels[LABEL_OWNER] = spec.owner
    labels[LABEL_RUNTIME] = runtime
    return labels


def read_meta(sandbox_dir: str) -> SandboxMeta | None:
    """Read one record; None when it is missing or unreadable."""
    try:
        with open(os.path.join(sandbox_dir, META), "rb") as f:
            return SandboxMeta.model_validate_json(f.read())
    except (OSError, ValueError):
        return None


def _private(path: str, flags: int) -> int:
    """Open ``path`` for writing with mode 0600 (also when it existed with another mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def write_meta(sandbox_dir: str, meta: SandboxMeta) -> None:
    """Write one record atomically, readable by its owner only (the spec holds env values)."""
    path = os.path.join(sandbox_dir, META)
    tmp = f"{path}.tmp"
    with os.fdopen(_private(tmp, os.O_TRUNC), "w") as f:
        json.dump(meta.model_dump(mode="json"), f)
    os.replace(tmp, path)


def list_metas(state_dir: str, runtime: str) -> list[SandboxMeta]:
    """Every readable record of ``runtime`` under ``state_dir``, sorted by creation time."""
    out: list[SandboxMeta] = []
    try:
        names = os.listdir(state_dir)
    except FileNotFoundError:
        return out
    for name in names:
        meta = read_meta(os.path.join(state_dir, name))
        if meta is not None and meta.runtime == runtime and meta.id == name:
            out.append(meta)
    out.sort(key=lambda m: (m.created_at, m.id))
    return out


def matches(labels: dict[str, str], want: dict[str, str] | None) -> bool:
    """True when ``labels`` include every item of ``want``."""
    return not want or all(labels.get(k) == v for k, v in want.items())


def process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks (to tell a reused pid apart); None if gone/zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def alive(meta: SandboxMeta) -> bool:
    """True while the sandbox's first process runs; a reused pid does not count (start time)."""
    return meta.pid is not None and process_start(meta.pid) == meta.pid_start


def to_info(meta: SandboxMeta, *, failure: FailureReason | None = None) -> SandboxInfo:
    """The runtime-independent view of a record: running while its first process lives,
    pending before the first start, stopped after a stop, else failed (``failure`` says why;
    default ``agent_exited``).
    """
    reason = None
    if alive(meta):
        state = SandboxState.RUNNING
    elif not meta.started:
        state = SandboxState.PENDING
    elif meta.stopped:
        state = SandboxState.STOPPED
    else:
        state, reason = SandboxState.FAILED, failure or FailureReason.AGENT_EXITED
    return SandboxInfo(
        id=meta.id,
        state=state,
        reason=reason,
        runtime=meta.runtime,
        image=meta.image,
        labels=meta.labels,
        created_at=meta.created_at,
        pid=meta.pid if state == SandboxState.RUNNING else None,
    )


def log_tail(sandbox_dir: str, size: int = 2000) -> str:
    """The end of the rocklet's stderr log, for error messages."""
    try:
        with open(os.path.join(sandbox_dir, "agent.log"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace").strip() or "(no output)"
    except OSError:
        return "(no log)"


async def launch(
    sandbox_dir: str,
    meta: SandboxMeta,
    argv: list[str],
    *,
    env: dict[str, str],
    handles: dict[str, RockletHandle],
    stop: Callable[[], Awaitable[None]],
    timeout: float,
    cwd: str | None = None,
) -> RockletHandle:
    """Start a sandbox's first process (the rocklet), record its pid and wait for its first reply.

    stderr goes to ``agent.log``; the handle is registered in ``handles`` before the first reply
    so that ``stop`` can find it when the rocklet does not come up.

    Raises:
        RuntimeUnavailable: the rocklet died or did not answer within ``timeout``.
    """
    with os.fdopen(_private(os.path.join(sandbox_dir, "agent.log"), os.O_APPEND), "ab") as logf:
        handle = await RockletHandle.spawn(
            argv, env=env, cwd=cwd, name=meta.id, stderr=logf, start_new_session=True
        )
    proc = handle.process
    assert proc is not None
    handles[meta.id] = handle
    meta.started, meta.stopped = True, False
    meta.pid, meta.pid_start = proc.pid, process_start(proc.pid)
    write_meta(sandbox_dir, meta)
    try:
        await asyncio.wait_for(handle.ping(), timeout)
    except (RockletUnavailable, asyncio.TimeoutError) as exc:
        await stop()
        raise RuntimeUnavailable(
            f"rocklet of {meta.id!r} did not start ({exc}): {log_tail(sandbox_dir)}"
        ) from None
    return handle


async def finish_stop(
    sandbox_dir: str, meta: SandboxMeta, handles: dict[str, RockletHandle]
) -> None:
    """After a sandbox's processes were killed: close its handle and record it as stopped."""
    handle = handles.pop(meta.id, None)
    if handle is not None:
        await handle.close()
    if meta.started and not meta.stopped:
        meta.stopped = True
        write_meta(sandbox_dir, meta)
