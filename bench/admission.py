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
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import pct  # noqa: E402
from rock_serve.config import ServerArgs  # noqa: E402
from rock_serve.deployments._registry import Registry, Usage, weights  # noqa: E402
from rock_serve.deployments.scheduler import Scheduler  # noqa: E402
from rock_serve.lifetime import Lifetime  # noqa: E402
from rock_serve.protocol import CreateSandboxRequest, Resources  # noqa: E402
from tests.unit.test_admission import FakeDirectory, FakeWorker  # noqa: E402


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


async def run(held: int, creates: int, n_workers: int, scan: bool) -> tuple[float, list[float]]:
    workers = [FakeWorker(f"w{i:011d}", time.time) for i in range(n_workers)]
    for i in range(held):
        w = workers[i % n_workers]
        sid = f"sb-{w.name}-held{i:07d}"
        w.records[sid] = w.record(sid, "team" if i % 2 else "other", 3600, Resources(cpus=0.5))
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
