"""Benchmark: in-session echo through the whole platform, beside a bare Serve ping, same run.

Usage: ``.venv/bin/python bench/latency.py [--n 300] [--runtime local|bwrap]``

Starts Ray + Serve with two applications: the rock-serve app and a one-route FastAPI ``/ping``
app (the floor: Serve proxy -> replica -> reply). Then measures, p50/p99 in ms:

- ``GET /ping`` on the bare app (keep-alive httpx client);
- in-session ``echo hi`` over HTTP (proxy -> Admin -> Worker -> rocklet), via the SDK;
- the same echo through the Ray transport (``AsyncClient.from_ray``: Worker actor -> rocklet);
- ``GET /v1/health`` (Admin -> Scheduler);
- create -> first command (``exec echo``) over HTTP, with and without a warm pool of 4, each
  followed by a delete (not timed).

Targets (../shared/TARGETS.md): HTTP echo <= ping + 3 ms; Ray echo <= 3 ms. Never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import _harness as harness
import httpx


def _p(samples: list[float], q: float) -> float:
    return harness.pct(samples, q * 100) * 1000


def add_ping_app(serve: Any) -> None:
    """The floor: a one-route FastAPI app under /bare, with the Admin's limit on requests."""
    from fastapi import FastAPI

    ping_app = FastAPI()

    @ping_app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    # the Admin's limit: Serve's default (5 in flight per replica) makes the proxy back off
    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=harness.MAX_ONGOING)
    @serve.ingress(ping_app)
    class Ping:
        pass

    serve.run(Ping.bind(), name="ping", route_prefix="/bare")


async def measure(url: str, n: int) -> dict[str, list[float]]:
    from rock_serve.sdk import AsyncClient

    out: dict[str, list[float]] = {}

    async def timed(name: str, fn) -> None:  # type: ignore[no-untyped-def]
        for _ in range(20):
            await fn()
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await fn()
            samples.append(time.perf_counter() - t0)
        out[name] = samples

    async with httpx.AsyncClient(base_url=url) as raw:

        async def ping() -> None:
            (await raw.get("/bare/ping")).raise_for_status()

        async def health() -> None:
            (await raw.get("/v1/health")).raise_for_status()

        await timed("bare Serve GET /ping", ping)
        await timed("GET /v1/health", health)

    async with AsyncClient(base_url=url) as client, client.sandbox() as sb:
        await sb.run("true")

        async def echo() -> None:
            await sb.run("echo hi")

        await timed("in-session echo over HTTP", echo)
        await timed("bare Serve GET /ping (again)", ping_again(url))
        ray_client = AsyncClient.from_ray(namespace="rock-bench")
        async with ray_client.sandbox() as rsb:
            await rsb.run("true")

            async def ray_echo() -> None:
                await rsb.run("echo hi")

            await timed("in-session echo over Ray", ray_echo)

    for name, base in (("create -> first command", url), ("  ... from a warm pool", f"{url}/warm")):
        async with AsyncClient(base_url=base) as client:
            samples = []
            for i in range(40):
                t0 = time.perf_counter()
                record = await client.create_sandbox()
                await client.exec(record.id, "echo hi")
                if i >= 5:
                    samples.append(time.perf_counter() - t0)
                await client.delete_sandbox(record.id)
                if "warm" in name:  # give the pool its refill, as between episodes
                    await asyncio.sleep(0.3)
            out[name] = samples
    return out


def ping_again(url: str):  # type: ignore[no-untyped-def]
    client = httpx.AsyncClient(base_url=url)

    async def ping() -> None:
        (await client.get("/bare/ping")).raise_for_status()

    return ping


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--runtime", default="local", choices=["local", "bwrap"])
    opts = parser.parse_args()
    base = {"runtime": opts.runtime, "auth": {"mode": "disabled"}}
    apps = {
        "/": {**base, "namespace": "rock-bench"},
        "/warm": {**base, "namespace": "rock-bench-warm", "warm_pool_size": 4},
    }
    with harness.platform(apps, extra=add_ping_app) as urls:
        results = asyncio.run(measure(urls["/"], opts.n))
    report(results, opts)


def report(results: dict[str, list[float]], opts: argparse.Namespace) -> None:
    print(f"\n{'what':36} {'p50 ms':>8} {'p99 ms':>8}   (n={opts.n}, {opts.runtime} runtime)")
    for name, samples in results.items():
        print(f"{name:36} {_p(samples, 0.5):8.2f} {_p(samples, 0.99):8.2f}")
    floor = min(
        _p(results["bare Serve GET /ping"], 0.5), _p(results["bare Serve GET /ping (again)"], 0.5)
    )
    http = _p(results["in-session echo over HTTP"], 0.5)
    print(
        f"\nHTTP echo - bare ping: {http - floor:+.2f} ms (target <= +3 ms); "
        f"Ray echo p50 {_p(results['in-session echo over Ray'], 0.5):.2f} ms (target <= 3 ms)"
    )


if __name__ == "__main__":
    main()
