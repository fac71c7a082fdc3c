"""The Scheduler's sandbox registry, with the counts admission needs kept up to date.

Admission asks, for every create: how many live sandboxes does each Worker hold, how many does
the caller's namespace hold, and how many CPUs, MiB of memory and MiB of disk do they use.
Scanning the registry for that costs O(records) per create (O(workers x records) to place it);
:class:`Registry` instead updates per-Worker and per-namespace counters when a record is added,
replaced or removed, and drops a record from them when its TTL passes (a heap of deadlines, swept
by the next question). A record past its TTL stays in the mapping (the Worker's reaper removes
it, and the next sync drops it) but counts nowhere, as ``Lifetime.live`` says.

It is a ``dict`` (id -> record) so every writer of the registry (Scheduler, fork, snapshot)
keeps the counters right without knowing about them. ``scanned`` counts the records visited by
whole-registry iterations, so a test can show that admission visits none.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, ItemsView, Iterator, ValuesView
from dataclasses import dataclass
from typing import Any

from rock_serve.lifetime import Lifetime
from rock_serve.protocol import Resources, SandboxRecord

__all__ = ["RESOURCE_FIELDS", "Registry", "Usage", "weights"]

#: The resources quotas count, in :class:`Usage` order.
RESOURCE_FIELDS = ("cpus", "memory_mb", "disk_mb")

#: Effective resources of a record (the runtime's defaults fill what it leaves unset).
Weigh = Callable[[Resources], Resources]


#: CPUs are summed in millionths of a CPU: integers, so removals leave no rounding behind.
_CPU_UNITS = 1_000_000

#: One sandbox's weights: (micro-CPUs, MiB of memory, MiB of disk).
Weights = tuple[int, int, int]


@dataclass
class Usage:
    """Live sandboxes and their resources (integer sums, exact through adds and removals)."""

    sandboxes: int = 0
    micro_cpus: int = 0
    memory_mb: int = 0
    disk_mb: int = 0

    def add(self, weights: Weights, sign: int) -> None:
        """Count (``sign=1``) or uncount (``sign=-1``) one sandbox of these weights."""
        self.sandboxes += sign
        self.micro_cpus += sign * weights[0]
        self.memory_mb += sign * weights[1]
        self.disk_mb += sign * weights[2]

    def total(self, field: str) -> float:
        """One resource's sum (``cpus``, ``memory_mb`` or ``disk_mb``)."""
        if field == "cpus":
            return self.micro_cpus / _CPU_UNITS
        value: int = getattr(self, field)
        return float(value)


@dataclass(frozen=True, slots=True)
class _Counted:
    worker: str
    namespace: str
    expires_at: float | None
    resources: Resources
    weights: Weights


def weights(resources: Resources) -> Weights:
    """What one sandbox of these (effective) resources adds to its namespace's usage."""
    return (
        round((resources.cpus or 0) * _CPU_UNITS),
        resources.memory_mb or 0,
        resources.disk_mb or 0,
    )


class Registry(dict[str, SandboxRecord]):
    """Sandbox id -> record, with live counts per Worker and per namespace."""

    def __init__(self, weigh: Weigh) -> None:
        super().__init__()
        self._weigh = weigh
        self._counted: dict[str, _Counted] = {}
        self._by_worker: dict[str, int] = {}
        self._by_namespace: dict[str, Usage] = {}
        self._deadlines: list[tuple[float, str]] = []  # (expires_at, id) heap, lazily cleaned
        self._swept_to = float("-inf")
        #: Records visited by whole-registry iterations (``values``, ``items``, ``iter``).
        self.scanned = 0
        #: Records counted or uncounted (adds, replacements, removals, expiries).
        self.updates = 0

    # ------------------------------------------------------------------ dict writes

    def __setitem__(self, sandbox_id: str, record: SandboxRecord) -> None:
        super().__setitem__(sandbox_id, record)
        old = self._counted.get(sandbox_id)
        if old is not None:
            if (
                old.expires_at == record.expires_at
                and old.worker == record.worker
                and old.namespace == record.namespace
                and old.resources == record.resources
            ):
                return  # a sync's fresh copy of the same sandbox: its counts stand
            self._uncount(sandbox_id, old)
        if record.expires_at is not None and record.expires_at <= self._swept_to:
            return  # past its TTL already: counts nowhere
        counted = _Counted(
            record.worker,
            record.namespace,
            record.expires_at,
            record.resources,
            weights(self._weigh(record.resources)),
        )
        self._count(sandbox_id, counted)
        if record.expires_at is not None and (old is None or old.expires_at != record.expires_at):
            heapq.heappush(self._deadlines, (record.expires_at, sandbox_id))
            self._compact()

    def __delitem__(self, sandbox_id: str) -> None:
        super().__delitem__(sandbox_id)
        old = self._counted.get(sandbox_id)
        if old is not None:
            self._uncount(sandbox_id, old)

    _MISSING: Any = object()

    def pop(self, sandbox_id: str, default: Any = _MISSING) -> Any:
        """Remove and return a record (``default`` when absent, KeyError without one)."""
        if sandbox_id in self:
            record = self[sandbox_id]
            del self[sandbox_id]
            return record
        if default is self._MISSING:
            raise KeyError(sandbox_id)
        return default

    def setdefault(self, sandbox_id: str, default: SandboxRecord) -> SandboxRecord:
        """The record of ``sandbox_id``, adding ``default`` when absent."""
        if sandbox_id not in self:
            self[sandbox_id] = default
        return self[sandbox_id]

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Add or replace records (through :meth:`__setitem__`)."""
        for sandbox_id, record in dict(*args, **kwargs).items():
            self[sandbox_id] = record

    def clear(self) -> None:
        """Remove every record."""
        for sandbox_id in list(super().keys()):
            del self[sandbox_id]

    def popitem(self) -> tuple[str, SandboxRecord]:
        """Remove and return the last record added."""
        sandbox_id = next(reversed(list(super().keys())))
        return sandbox_id, self.pop(sandbox_id)

    def __ior__(self, other: Any) -> Registry:  # type: ignore[override,misc]
        self.update(other)
        return self

    # ------------------------------------------------------------------ counted reads

    def __iter__(self) -> Iterator[str]:
        self.scanned += len(self)
        return super().__iter__()

    def values(self) -> ValuesView[SandboxRecord]:  # type: ignore[override]
        """Every record (counted in :attr:`scanned`)."""
        self.scanned += len(self)
        return super().values()

    def items(self) -> ItemsView[str, SandboxRecord]:  # type: ignore[override]
        """Every (id, record) pair (counted in :attr:`scanned`)."""
        self.scanned += len(self)
        return super().items()

    # ------------------------------------------------------------------ admission

    def load(self, worker: str, now: float) -> int:
        """Live sandboxes on ``worker`` at ``now``."""
        self._sweep(now)
        return self._by_worker.get(worker, 0)

    def usage(self, namespace: str, now: float) -> Usage:
        """Live sandboxes of ``namespace`` at ``now`` and their effective resources (a copy)."""
        self._sweep(now)
        usage = self._by_namespace.get(namespace)
        return Usage() if usage is None else Usage(**vars(usage))

    def reweigh(self, weigh: Weigh) -> None:
        """Count resources anew with ``weigh`` (a redeploy changed the runtime's defaults)."""
        self._weigh = weigh
        for sandbox_id, counted in list(self._counted.items()):
            self._uncount(sandbox_id, counted)
            self[sandbox_id] = dict.__getitem__(self, sandbox_id)

    # ------------------------------------------------------------------ internals

    def _count(self, sandbox_id: str, counted: _Counted) -> None:
        self.updates += 1
        self._counted[sandbox_id] = counted
        self._by_worker[counted.worker] = self._by_worker.get(counted.worker, 0) + 1
        self._by_namespace.setdefault(counted.namespace, Usage()).add(counted.weights, 1)

    def _uncount(self, sandbox_id: str, counted: _Counted) -> None:
        self.updates += 1
        del self._counted[sandbox_id]
        left = self._by_worker[counted.worker] - 1
        if left:
            self._by_worker[counted.worker] = left
        else:
            del self._by_worker[counted.worker]
        usage = self._by_namespace[counted.namespace]
        usage.add(counted.weights, -1)
        if usage.sandboxes == 0:
            del self._by_namespace[counted.namespace]

    def _sweep(self, now: float) -> None:
        """Uncount the records whose TTL passed by ``now``."""
        self._swept_to = max(self._swept_to, now)
        heap = self._deadlines
        while heap and not Lifetime.live(_Deadline(heap[0][0]), now):
            expires_at, sandbox_id = heapq.heappop(heap)
            counted = self._counted.get(sandbox_id)
            if counted is not None and counted.expires_at == expires_at:
                self._uncount(sandbox_id, counted)

    def _compact(self) -> None:
        """Drop the heap's stale deadlines once they outnumber the counted ones (amortised)."""
        if len(self._deadlines) > 2 * len(self._counted) + 64:
            self._deadlines = [
                (c.expires_at, sid) for sid, c in self._counted.items() if c.expires_at is not None
            ]
            heapq.heapify(self._deadlines)


@dataclass(frozen=True, slots=True)
class _Deadline:
    """A bare deadline, for :meth:`Lifetime.live`."""

    expires_at: float | None
    lease_expires_at: float | None = None
