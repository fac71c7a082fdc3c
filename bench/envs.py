"""Benchmark: vectorised text envs on a running platform, and env reset (sandbox create) latency.

Usage: ``.venv/bin/python bench/envs.py [--sizes 1,8,64] [--steps 20] [--quick] [--runtime local]``

It starts its own platform like tests/e2e/conftest.py does (``ray.init(address="local")`` with
its own temp dir, Serve on a free loopback port, the rock-serve app with room for the largest
vector, and the Admin's ``max_ongoing_requests`` of serve_config.yaml) on the local runtime (or
``--runtime bwrap``), then measures, in one run:

- env reset latency, p50/p99: the first reset of a fresh ``rock/GuessNumber-v0`` (sandbox
  create + task upload), and a later reset of the same env (sandbox reused);
- steps/s of ``rock/Terminal-v0`` vectors of N envs (one sandbox each; action ``echo hi``, one
  in-session command per step) for each N: our ``AsyncVectorEnv`` over HTTP and over the Ray
  transport, Gymnasium's ``SyncVectorEnv`` over our sync envs (the same sandboxes stepped one
  after the other), and the raw SDK floor (the same ``run`` calls gathered, no env layer);
- the wall time of the vector's first reset (N sandboxes created concurrently) and close.

No peer is measured: ROCK's env API (``rock.make`` -> its admin's ``/apis/v1/envs/gem/*``) needs
ROCK's admin server with Docker (it starts a ``python:3.11`` sandbox per env and polls it every
second), which does not run here. The output says so. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable

import gymnasium

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import _harness as harness  # noqa: E402

import rock_serve.envs as envs  # noqa: E402
from rock_serve.sdk import AsyncClient, Client  # noqa: E402

NAMESPACE = "rock-bench-envs"
ENV_ID = "rock/Terminal-v0"
ACTION = "echo hi"


@contextlib.contextmanager
def platform(capacity: int, runtime: str):
    """The platform (see bench/_harness.py) with room for ``capacity`` sandboxes; its URL."""
    args = {
        "runtime": runtime,
        "namespace": NAMESPACE,
        "max_sandboxes_per_node": capacity,
        "default_ttl_seconds": 1800,
        "reap_interval_seconds": 1.0,
        "auth": {"mode": "disabled"},
    }
    with harness.platform({"/": args}) as urls:
        yield urls["/"]


async def reset_latency(client: AsyncClient, n: int) -> dict[str, tuple[float, float]]:
    first: list[float] = []
    again: list[float] = []
    for i in range(n + 1):
        env = envs.make_async("rock/GuessNumber-v0", client=client)
        t = time.perf_counter()
        await env.reset(seed=i)
        t1 = time.perf_counter()
        await env.step("50")
        t2 = time.perf_counter()
        await env.reset(seed=i + 1)
        t3 = time.perf_counter()
        await env.close()
        if i:  # the first one warms caches
            first.append((t1 - t) * 1000)
            again.append((t3 - t2) * 1000)
    return {
        "reset, new sandbox (create + setup)": (harness.pct(first, 50), harness.pct(first, 99)),
        "reset, sandbox reused": (harness.pct(again, 50), harness.pct(again, 99)),
    }


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    t = time.perf_counter()
    await fn()
    return time.perf_counter() - t


async def vector_rate(client: AsyncClient, n: int, steps: int) -> dict[str, float]:
    vec = envs.make_vec(ENV_ID, n, client=client)
    reset_s = await timed(lambda: vec.reset(seed=0))
    actions = [ACTION] * n
    for _ in range(2):
        await vec.step(actions)
    t = time.perf_counter()
    for _ in range(steps):
        obs, *_ = await vec.step(actions)
    rate = n * steps / (time.perf_counter() - t)
    assert obs[0].startswith("hi\n"), obs[0]
    close_s = await timed(vec.close)
    return {"steps/s": rate, "reset wall s": reset_s, "close wall s": close_s}


async def raw_rate(client: AsyncClient, n: int, steps: int) -> float:
    records = await asyncio.gather(*(client.create_sandbox() for _ in range(n)))
    ids = [r.id for r in records]
    try:
        await asyncio.gather(*(client.create_session(i, "bench") for i in ids))

        async def one() -> None:
            await asyncio.gather(*(client.run(i, ACTION, session="bench") for i in ids))

        await one()
        t = time.perf_counter()
        for _ in range(steps):
            await one()
        return n * steps / (time.perf_counter() - t)
    finally:
        await asyncio.gather(*(client.delete_sandbox(i) for i in ids))


def gym_sync_rate(url: str, n: int, steps: int) -> float:
    with Client(url) as client:
        vec = gymnasium.vector.SyncVectorEnv([lambda: envs.make(ENV_ID, client=client)] * n)
        try:
            vec.reset(seed=0)
            actions = tuple([ACTION] * n)
            vec.step(actions)
            t = time.perf_counter()
            for _ in range(steps):
                vec.step(actions)
            return n * steps / (time.perf_counter() - t)
        finally:
            vec.close()


async def run(url: str, sizes: list[int], steps: int, n_reset: int) -> None:
    from rock_serve.deployments.client import platform_client

    http = AsyncClient(url)
    ray_client = platform_client(NAMESPACE)
    try:
        print(f"\nenv reset latency ({n_reset} envs, one after the other; p50 / p99 ms)")
        for label, client in (("HTTP", http), ("Ray", ray_client)):
            for metric, (p50, p99) in (await reset_latency(client, n_reset)).items():
                print(f"  {label:<5} {metric:<38} {p50:8.1f} / {p99:.1f}")
        print(f"\n{ENV_ID} vectors, action {ACTION!r}, {steps} timed steps")
        head = (
            f"  {'N':>3}  {'ours HTTP':>10}  {'ours Ray':>10}  {'gym Sync':>10}  "
            f"{'raw SDK':>10}  {'reset N (s)':>11}  {'close N (s)':>11}"
        )
        print(head + "\n  " + "-" * (len(head) - 2) + "   (steps/s)")
        for n in sizes:
            ours = await vector_rate(http, n, steps)
            over_ray = await vector_rate(ray_client, n, steps)
            gym = await asyncio.to_thread(gym_sync_rate, url, n, max(2, steps // 4))
            raw = await raw_rate(http, n, steps)
            print(
                f"  {n:>3}  {ours['steps/s']:>10.0f}  {over_ray['steps/s']:>10.0f}  {gym:>10.0f}  "
                f"{raw:>10.0f}  {ours['reset wall s']:>11.2f}  {ours['close wall s']:>11.2f}",
                flush=True,
            )
        print(
            "\nPeer: none. ROCK's env API (rock.make -> /apis/v1/envs/gem/*) needs ROCK's admin "
            "server and Docker (a python:3.11 sandbox per env, status polled every second); it "
            "does not run here."
        )
    finally:
        await http.aclose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sizes", default="1,8,64", help="vector sizes, comma separated")
    ap.add_argument("--steps", type=int, default=20, help="timed vector steps per size")
    ap.add_argument("--resets", type=int, default=30, help="envs for the reset latency")
    ap.add_argument("--runtime", default="local", choices=["local", "bwrap"])
    ap.add_argument("--quick", action="store_true", help="sizes 1,8; few steps (a smoke run)")
    args = ap.parse_args()
    sizes = [1, 8] if args.quick else [int(s) for s in args.sizes.split(",")]
    steps = 5 if args.quick else args.steps
    n_reset = 5 if args.quick else args.resets
    print(
        f"env bench: {args.runtime} runtime, sizes {sizes}, {os.cpu_count()} cpus, "
        f"python {sys.version.split()[0]}, gymnasium {gymnasium.__version__}"
    )
    with platform(max(sizes) + 8, args.runtime) as url:
        asyncio.run(run(url, sizes, steps, n_reset))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
