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
import os
import socket
import tempfile
import time

import httpx

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _p(samples: list[float], q: float) -> float:
    return sorted(samples)[min(len(samples) - 1, int(q * len(samples)))] * 1000


def start(runtime: str) -> str:
    import ray
    from fastapi import FastAPI
    from ray import serve

    from rock_serve.deployments.app import build_app

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="rsbench-", dir="/tmp"),
        log_to_driver=False,
    )
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    ping_app = FastAPI()

    @ping_app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(ping_app)
    class Ping:
        pass

    serve.run(Ping.bind(), name="ping", route_prefix="/bare")  # type: ignore[attr-defined]
    rt: dict[str, object] = {"type": runtime, "state_dir": tempfile.mkdtemp(prefix="rsb-")}
    if runtime == "bwrap":
        rt["cgroup_parent"] = "rock-serve-bench"
    args = {"runtime": rt, "namespace": "rock-bench", "auth": {"mode": "disabled"}}
    serve.run(build_app(args), name="rock", route_prefix="/")
    warm = {**args, "namespace": "rock-bench-warm", "warm_pool_size": 4}
    serve.run(build_app(warm), name="warm", route_prefix="/warm")
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/v1/health", timeout=5).json().get("status") == "ok":
                return url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise SystemExit("the platform did not become healthy")


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
    url = start(opts.runtime)
    results = asyncio.run(measure(url, opts.n))
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

    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
