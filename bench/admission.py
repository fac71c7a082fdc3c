"""Benchmark: Scheduler admissions per second against the number of records it holds (issue 13.5).

Usage: ``.venv/bin/python bench/admission.py [--creates 2000] [--workers 8] [--quick]``

No Ray, no sandboxes: the Scheduler runs against fake Workers at its seam (a create returns a
record) with a namespace quota set, so each create pays admission (quota, cluster room,
placement over ``--workers`` Workers) and the registry insert. For each registry size (records
held, spread over the Workers and two namespaces) it times ``--creates`` creates one after the
other and prints admissions/s and the p50 / p99 of one create, for:

- *incremental*: the Registry's per-Worker and per-namespace counters (what runs);
- *scan*: the same Scheduler answering each admission question by scanning every record (how
  admission worked before: O(workers x records) per create), for comparison.

The floor is the incremental rate with an empty registry, measured in the same run; the ratio
column is rate / floor. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import builtins
import time
from typing import Any

from rock_serve.config import ServerArgs
from rock_serve.deployments._registry import Registry, Usage, weights
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.lifetime import Lifetime
from rock_serve.protocol import (
    CreateSandboxRequest,
    Resources,
    SandboxRecord,
    SandboxState,
    WorkerStatus,
)


def pct(samples: list[float], p: float) -> float:
    xs = sorted(samples)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))] if xs else 0.0


class ScanRegistry(Registry):
    """The registry answering admission by a scan of every record (the old cost)."""

    def load(self, worker: str, now: float) -> int:
        return sum(1 for r in dict.values(self) if r.worker == worker and Lifetime.live(r, now))

    def usage(self, namespace: str, now: float) -> Usage:
        usage = Usage()
        for r in dict.values(self):
            if r.namespace == namespace and Lifetime.live(r, now):
                usage.add(weights(self._weigh(r.resources)), 1)
        return usage


class FakeWorker:
    def __init__(self, name: str) -> None:
        self.name, self.node_id = name, name * 4
        self.records: dict[str, SandboxRecord] = {}

    def _record(self, sid: str, namespace: str, ttl: float) -> SandboxRecord:
        now = time.time()
        return SandboxRecord(
            id=sid,
            state=SandboxState.RUNNING,
            worker=self.name,
            node_id=self.node_id,
            created_at=now,
            expires_at=now + ttl,
            namespace=namespace,
            resources=Resources(cpus=0.5),
        )

    async def create(
        self, sid: str, req: CreateSandboxRequest, ttl: float, namespace: str
    ) -> SandboxRecord:
        record = self.records[sid] = self._record(sid, namespace, ttl)
        return record

    async def list(self) -> builtins.list[SandboxRecord]:
        return builtins.list(self.records.values())

    async def remove(self, sid: str) -> None:
        self.records.pop(sid, None)

    async def reap_ids(self, ids: builtins.list[str], reason: str) -> builtins.list[str]:
        return []

    async def reconfigure(self, args: ServerArgs) -> None:
        pass

    async def status(self) -> WorkerStatus:
        return WorkerStatus(
            name=self.name, node_id=self.node_id, alive=True, sandboxes=0, capacity=1, runtime="x"
        )


class FakeDirectory:
    def __init__(self, workers: builtins.list[FakeWorker]) -> None:
        self.workers = {w.node_id: w for w in workers}

    async def alive_nodes(self) -> builtins.list[str]:
        return builtins.list(self.workers)

    async def ensure(self, node_id: str) -> FakeWorker:
        return self.workers[node_id]

    async def dead_jobs(self, job_ids: set[str]) -> set[str]:
        return set()


async def run(held: int, creates: int, n_workers: int, scan: bool) -> tuple[float, list[float]]:
    workers = [FakeWorker(f"w{i:011d}") for i in range(n_workers)]
    for i in range(held):
        w = workers[i % n_workers]
        sid = f"sb-{w.name}-held{i:07d}"
        w.records[sid] = w._record(sid, "team" if i % 2 else "other", 3600)
    args: dict[str, Any] = {
        "runtime": {"type": "fake"},
        "max_sandboxes_per_node": held + creates + 1,
        "reap_interval_seconds": 3600,
        "quotas": {"team": {"max_sandboxes": 10**9, "max_cpus": 10**9}},
    }
    scheduler = Scheduler(ServerArgs.model_validate(args), FakeDirectory(workers))  # type: ignore[arg-type]
    if scan:
        scheduler._records = ScanRegistry(scheduler._weigh)
    await scheduler.ready()
    samples: list[float] = []
    start = time.perf_counter()
    for _ in range(creates):
        t0 = time.perf_counter()
        await scheduler.create(CreateSandboxRequest(), "team")
        samples.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    await scheduler.close()
    return creates / wall, samples


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--creates", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    ns = parser.parse_args()
    sizes = [0, 1_000, 10_000] if ns.quick else [0, 1_000, 10_000, 50_000]
    creates = 200 if ns.quick else ns.creates
    floor, _ = await run(0, creates, ns.workers, scan=False)
    print(
        f"{creates} creates per row (scan rows: at most 200), {ns.workers} Workers; "
        f"floor (incremental, empty registry): {floor:.0f} admissions/s"
    )
    header = ("records held", "mode", "adm/s", "p50 ms", "p99 ms")
    print("{:>12} | {:<11} | {:>8} | {:>7} | {:>7} | ratio".format(*header))
    for held in sizes:
        for scan in (False, True):
            n = min(creates, 200) if scan else creates  # a scan row is slow: fewer creates
            rate, samples = await run(held, n, ns.workers, scan)
            print(
                f"{held:>12} | {'scan' if scan else 'incremental':<11} | {rate:>8.0f} | "
                f"{pct(samples, 50) * 1e3:>7.3f} | {pct(samples, 99) * 1e3:>7.3f} | "
                f"{rate / floor:.2f}x"
            )


if __name__ == "__main__":
    asyncio.run(main())
