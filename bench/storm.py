"""Benchmark: a storm of concurrent creates against one machine; nothing stuck, lost or leaked.

Usage: ``.venv/bin/python bench/storm.py [--n 1000] [--runtime bwrap|local] [--capacity 256]``

Starts its own Ray + Serve with the rock-serve app (like the e2e tests), then fires ``--n``
``POST /v1/sandboxes`` at once from one process (raw HTTP, no SDK retries), and counts the
answers: 201 (served), 429 (refused with Retry-After: the node is full or the create queue
timed out), anything else (a failure). Every request must end with 201 or 429 and every 201
sandbox must be deletable; at the end the runtime must list nothing (no orphan). Then a second
phase runs the same number of *SDK* creates with its polite retries (each creates, runs
``echo``, deletes), where every one must succeed eventually.

No peer runs here: ROCK's admin needs its own cluster; its only published number is "1k
concurrent creates p50 4.9 s" (a claim, printed for context). Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections import Counter

import _harness as harness
import httpx


def _pct(samples: list[float], q: float) -> float:
    return harness.pct(samples, q * 100) * 1000


async def raw_storm(url: str, n: int) -> None:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as api:
        latencies: dict[int, list[float]] = {}
        created: list[str] = []
        statuses: Counter[str] = Counter()
        retry_after: list[float] = []

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            try:
                resp = await api.post(
                    "/v1/sandboxes", json={"owner": "storm", "labels": {"i": str(i)}}
                )
            except httpx.HTTPError as exc:
                statuses[f"transport:{type(exc).__name__}"] += 1
                return
            latencies.setdefault(resp.status_code, []).append(time.perf_counter() - t0)
            statuses[str(resp.status_code)] += 1
            if resp.status_code == 201:
                created.append(resp.json()["id"])
            elif resp.status_code == 429:
                retry_after.append(float(resp.headers.get("Retry-After", "nan")))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
        listed = (await api.get("/v1/sandboxes", params={"owner": "storm"})).json()["items"]
        deletes = await asyncio.gather(*(api.delete(f"/v1/sandboxes/{sid}") for sid in created))
        print(f"\n== phase 1: {n} raw creates at once (no retries), wall {wall:.1f} s")
        print(f"answers: {dict(statuses)}")
        for status, samples in sorted(latencies.items()):
            p50, p99 = _pct(samples, 0.5), _pct(samples, 0.99)
            print(f"  {status}: n={len(samples)} p50 {p50:.0f} ms  p99 {p99:.0f} ms")
        if retry_after:
            print(f"  429 Retry-After: {statistics.median(retry_after):.0f} s (median)")
        other = sum(v for k, v in statuses.items() if k not in ("201", "429"))
        print(f"neither 201 nor 429 (stuck/failed): {other}")
        print(
            f"registry after the storm: {len(listed)} listed, {len(created)} created -> "
            f"{'consistent' if len(listed) == len(created) else 'MISMATCH'}"
        )
        print(f"deletes: {Counter(r.status_code for r in deletes)}")


async def sdk_storm(url: str, n: int) -> None:
    from rock_serve.sdk import AsyncClient, RetryPolicy

    retry = RetryPolicy(max_attempts=1000, base=0.2, max_backoff=2.0, max_total=900)
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=n))
    async with AsyncClient(base_url=url, timeout=300, retry=retry, transport=transport) as client:
        latencies: list[float] = []
        failures: Counter[str] = Counter()

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                async with client.sandbox(owner="storm-sdk") as sb:
                    assert (await sb.exec("echo ok")).stdout == "ok\n"
                latencies.append(time.perf_counter() - t0)
            except Exception as exc:  # counted and printed
                failures[type(exc).__name__] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - t0
        print(
            f"\n== phase 2: {n} SDK create+exec+delete at once (polite retries), wall {wall:.1f} s"
        )
        print(f"served {len(latencies)}/{n}; failures {dict(failures)}")
        p50, p99 = _pct(latencies, 0.5) / 1000, _pct(latencies, 0.99) / 1000
        print(f"  end-to-end p50 {p50:.1f} s  p99 {p99:.1f} s")
        print(f"  throughput {len(latencies) / wall:.1f} sandboxes/s")


def leftovers(runtime: str, state_dir: str) -> int:
    from rock_serve.config import parse_runtime_config

    cfg = harness.runtime_config(runtime, state_dir)

    async def count() -> int:
        rt = parse_runtime_config(cfg).build()
        try:
            return len(await rt.list())
        finally:
            await rt.close()

    return asyncio.run(count())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--runtime", default="bwrap", choices=["bwrap", "local"])
    parser.add_argument("--capacity", type=int, default=256)
    parser.add_argument("--skip-sdk", action="store_true")
    opts = parser.parse_args()
    state_dir = tempfile.mkdtemp(prefix="rock-storm-")
    args = {
        "runtime": harness.runtime_config(opts.runtime, state_dir),
        "namespace": "rock-bench-storm",
        "max_sandboxes_per_node": opts.capacity,
        "default_ttl_seconds": 600,
        "default_lease_seconds": 600,
        "reap_interval_seconds": 1,
        "auth": {"mode": "disabled"},
    }
    with harness.platform({"/": args}) as urls:
        url = urls["/"]
        print(f"platform: {opts.runtime} runtime, capacity {opts.capacity}/node, 1 node, {url}")
        print("peer: none runnable here; ROCK's published claim: 1k concurrent creates p50 4.9 s")
        asyncio.run(raw_storm(url, opts.n))
        if not opts.skip_sdk:
            asyncio.run(sdk_storm(url, opts.n))
        deadline = time.monotonic() + 60
        left = leftovers(opts.runtime, state_dir)
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = leftovers(opts.runtime, state_dir)
        print(f"\norphans in the runtime at the end: {left}")


if __name__ == "__main__":
    main()
