"""A Worker's table of sandboxes: the live ones, those being made, and why the gone ones went.

Plain data with an injected clock (no Ray, no runtime calls): the Worker facade and its parts
(create/remove, fork, snapshot, the reaper, adoption) read and write it. A lookup renews the
sandbox's lease; a lookup of a removed sandbox says why it went ("reaped: lease_expired") for
as long as the graveyard remembers it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from rock_serve.errors import SandboxFailed, SandboxNotFound, SandboxNotRunning
from rock_serve.lifetime import Lifetime
from rock_serve.protocol import SandboxRecord, SandboxState, StateChange
from rock_serve.rocklet.handle import RockletHandle
from rock_serve.runtime.base import Runtime

__all__ = ["GRAVEYARD", "LABEL_RECORD", "LABEL_WORKER", "Box", "SandboxTable", "step"]

#: Label on every sandbox a Worker makes: the Worker's short name.
LABEL_WORKER = "rock.worker"
#: Label holding the sandbox's record as JSON, so a restarted Worker can adopt it.
LABEL_RECORD = "rock.record"

#: How many removed sandboxes a table remembers (and why) for late callers.
GRAVEYARD = 4096


@dataclass
class Box:
    """One sandbox a Worker owns: its record, its rocklet and the runtime that made it."""

    record: SandboxRecord
    handle: RockletHandle
    runtime: Runtime
    watcher: asyncio.Task[None] | None = None
    pool: str = ""  # the warm pool's key, while it waits in one


def step(record: SandboxRecord, state: SandboxState, at: float, reason: str | None = None) -> None:
    """Move ``record`` to ``state`` at ``at`` and note it in its history."""
    record.state = state
    record.history.append(StateChange(state=state, at=at, reason=reason))


class SandboxTable:
    """The sandboxes of one Worker by id, the ids being created, and a bounded graveyard."""

    def __init__(self, clock: Callable[[], float], graveyard: int = GRAVEYARD) -> None:
        self.clock = clock
        self.boxes: dict[str, Box] = {}
        self.creating: set[str] = set()
        self.graveyard: OrderedDict[str, StateChange] = OrderedDict()
        self._graveyard_size = graveyard

    def load(self) -> int:
        """Sandboxes held or being made (what counts against the node's limit)."""
        return len(self.boxes) + len(self.creating)

    def taken(self, sandbox_id: str) -> bool:
        """Whether the id is held or being made."""
        return sandbox_id in self.boxes or sandbox_id in self.creating

    def add(self, box: Box, now: float) -> None:
        """Hold ``box`` (its lease starts at ``now``)."""
        self.touch(box, now)
        self.boxes[box.record.id] = box

    def pop(self, sandbox_id: str, reason: str) -> Box:
        """Forget a sandbox and remember why it went.

        Raises:
            SandboxNotFound: no such sandbox.
        """
        box = self.boxes.pop(sandbox_id, None)
        if box is None:
            raise self.not_found(sandbox_id)
        self.graveyard[sandbox_id] = StateChange(
            state=SandboxState.REMOVED, at=self.clock(), reason=reason
        )
        while len(self.graveyard) > self._graveyard_size:
            self.graveyard.popitem(last=False)
        return box

    def lookup(self, sandbox_id: str) -> Box:
        """A sandbox in any state; the lookup renews its lease.

        Raises:
            SandboxNotFound: no such sandbox (or it was removed: the reason is in the details).
        """
        box = self.boxes.get(sandbox_id)
        if box is None:
            raise self.not_found(sandbox_id)
        self.touch(box, self.clock())
        return box

    def live(self, sandbox_id: str) -> Box:
        """A sandbox that can take a data-plane call; the lookup renews its lease.

        Raises:
            SandboxNotFound: no such sandbox (or it was removed: the reason is in the details).
            SandboxFailed: its rocklet exited or stopped answering (``details['reason']``).
            SandboxNotRunning: it is paused.
        """
        box = self.lookup(sandbox_id)
        if box.record.state == SandboxState.FAILED:
            reason = box.record.reason.value if box.record.reason else "failed"
            raise SandboxFailed(f"sandbox {sandbox_id!r} failed ({reason})", reason=reason)
        if box.record.state == SandboxState.PAUSED:
            raise SandboxNotRunning(f"sandbox {sandbox_id!r} is paused: resume it first")
        return box

    def not_found(self, sandbox_id: str) -> SandboxNotFound:
        """The error for a missing sandbox, with why it went if the graveyard remembers."""
        gone = self.graveyard.get(sandbox_id)
        if gone is None:
            return SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return SandboxNotFound(
            f"sandbox {sandbox_id!r} was removed ({gone.reason})",
            reason=gone.reason,
            removed_at=gone.at,
        )

    @staticmethod
    def touch(box: Box, now: float) -> None:
        """Renew ``box``'s lease (if it has one) from ``now``."""
        deadline = Lifetime.lease_deadline(box.record.lease_seconds, now)
        if deadline is not None:
            box.record.lease_expires_at = deadline

    def still_running(self, box: Box) -> bool:
        """Whether ``box`` is still held and running (not removed or marked meanwhile)."""
        return self.boxes.get(box.record.id) is box and box.record.state == SandboxState.RUNNING

    def expired(self, now: float) -> list[tuple[str, str]]:
        """(id, reason) of each sandbox past its TTL or its lease at ``now``."""
        out: list[tuple[str, str]] = []
        for sid, box in self.boxes.items():
            why = Lifetime.reap_reason(box.record, now)
            if why is not None:
                out.append((sid, why))
        return out

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Sandboxes by state and by namespace."""
        by_state: dict[str, int] = {}
        by_namespace: dict[str, int] = {}
        for box in self.boxes.values():
            state, ns = box.record.state.value, box.record.namespace
            by_state[state] = by_state.get(state, 0) + 1
            by_namespace[ns] = by_namespace.get(ns, 0) + 1
        return by_state, by_namespace
