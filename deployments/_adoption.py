"""Taking back the sandboxes an earlier incarnation of a Worker left running.

Every sandbox a Worker makes carries ``rock.worker=<short>`` and, in ``rock.record``, the JSON
of its record. A restarted Worker (after ``kill -9`` or a node restart) lists its runtime by
that label: a sandbox still running (or whose only fault is its dead rocklet), within its TTL,
not from the warm pool, whose runtime can reattach (``Runtime.attach``, e.g. docker) is adopted
with a fresh rocklet; the rest (bwrap and local sandboxes die with their Worker) are removed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Container

from rock_serve.deployments._warm_pool import LABEL_WARM
from rock_serve.deployments._worker_table import LABEL_RECORD, LABEL_WORKER, step
from rock_serve.errors import RockError
from rock_serve.lifetime import Lifetime
from rock_serve.protocol import FailureReason, SandboxInfo, SandboxRecord, SandboxState
from rock_serve.rocklet.handle import RockletHandle
from rock_serve.runtime.base import Runtime

__all__ = ["adopt", "adoptable", "sweep"]

log = logging.getLogger(__name__)


def adoptable(info: SandboxInfo, now: float) -> SandboxRecord | None:
    """The record of a leftover sandbox a Worker may take back, or None if it must go."""
    raw = info.labels.get(LABEL_RECORD)
    # A container outlives its Worker but its rocklet does not (EOF on its stdin): such a
    # sandbox shows failed/agent_exited and can be reattached with a fresh rocklet.
    alive = info.state == SandboxState.RUNNING or (
        info.state == SandboxState.FAILED and info.reason == FailureReason.AGENT_EXITED
    )
    if not alive or raw is None or LABEL_WARM in info.labels:
        return None
    try:
        record = SandboxRecord.model_validate_json(raw)
    except ValueError:
        return None
    return record if Lifetime.adoptable(record, now) else None


async def adopt(
    runtime: Runtime, info: SandboxInfo, worker: str, node_id: str, now: float
) -> tuple[SandboxRecord, RockletHandle] | None:
    """Reattach a leftover sandbox: its record (now this Worker's, running, "adopted") and a
    fresh rocklet; None if it cannot be adopted.
    """
    record = adoptable(info, now)
    if record is None:
        return None
    try:
        handle = await runtime.attach(info.id)
    except RockError as exc:
        log.info("worker %s: cannot adopt %s: %s", worker, info.id, exc)
        return None
    record.worker, record.node_id = worker, node_id
    step(record, SandboxState.RUNNING, now, "adopted")
    return record, handle


async def sweep(
    runtime: Runtime,
    worker: str,
    known: Container[str],
    take: Callable[[Runtime, SandboxInfo], Awaitable[bool]],
) -> list[str]:
    """Go through ``runtime``'s sandboxes labelled as ``worker``'s: skip those ``known``, offer
    the others to ``take`` and remove those it refuses; returns the ids removed.
    """
    removed = []
    for info in await runtime.list(labels={LABEL_WORKER: worker}):
        if info.id in known or await take(runtime, info):
            continue
        log.warning("worker %s: removing leftover sandbox %s", worker, info.id)
        with contextlib.suppress(Exception):
            await runtime.remove(info.id)
        removed.append(info.id)
    return removed
