"""Benchmark: in-session ops/s at 1, 16 and 64 concurrent clients, churn, and the floors, one run.

Usage: ``.venv/bin/python bench/throughput.py [--seconds 5] [--runtime bwrap|local]
[--clients 1,16,64] [--churn-seconds 8] [--only floors,admin,direct,batch,ray,churn]
[--warm-pool N] [--profile DIR]``

Paths measured (each client owns one sandbox and runs ``echo hi`` in its session in a loop;
clients are asyncio tasks of one process, as one rollout driver stepping many envs is):

- HTTP via the Admin (Serve proxy -> Admin replica -> Worker actor -> rocklet), the SDK's
  ``AsyncClient(dataplane="admin")``;
- the direct data plane (``AsyncClient(dataplane="direct")``: HTTP straight to the node's
  data-plane server in the Worker -> rocklet; one grant per sandbox from the Admin);
- Ray transport (``AsyncClient.from_ray``: Worker actor -> rocklet);
- the batch op (``client.run_many``: N sandboxes stepped by one request to the node's direct
  plane, or by one Worker actor call over Ray);
- churn: create -> first command -> delete, 1 and 8 loops at once, over HTTP and over Ray, and
  create -> first command on its own (1 loop);
- paced: create -> first command over HTTP, one create every ``--pace`` s (a create on an
  otherwise idle node; with ``--warm-pool N`` the pool refills between creates).

``--profile DIR`` records each row's processes with py-spy (bench/_profile.py) and prints, per
process, CPU ms per operation and the frames with the most self time.

Floors measured in the same run:

- the rocklet itself through its ``RockletHandle`` (no Worker, no HTTP);
- a bare Serve ``GET /ping`` (proxy -> replica -> reply);
- a bare uvicorn echo route (a separate process; no Serve);
- a bare async Ray actor's echo method (the Ray transport's floor).

Prints ops/s, p50 and p99 per path and concurrency, and each HTTP row's ratio to the bare Serve
ping at the same concurrency. Targets (issue 13, ../shared/TARGETS.md): direct data plane >= 1,000
ops/s at 16 clients with p50 <= 3 ms, Ray >= 2,000 ops/s, churn >= 30 sandboxes/s on bwrap,
create -> first command over REST <= 50 ms. Never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import _harness as harness
import httpx
from latency import add_ping_app

#: The bench's own bwrap image store (kept between runs; ROCK_BENCH_IMAGES overrides).
IMAGES = "/var/tmp/rock-bench-images"

#: Where ``--profile`` writes py-spy recordings of each row (None: no profiling).
PROFILE: Path | None = None

Op = Callable[[], Awaitable[object]]


@dataclass
class Row:
    """One measured path at one concurrency."""

    path: str
    clients: int
    samples: list[float] = field(default_factory=list)
    seconds: float = 0.0

    #: Operations per sample (a batch of N commands is one sample of N operations).
    weight: int = 1

    @property
    def rate(self) -> float:
        return len(self.samples) * self.weight / self.seconds if self.seconds else 0.0


async def drive(path: str, ops: list[Op], seconds: float) -> Row:
    """Run each op in its own loop for ``seconds`` (after a short warm-up); one sample per call."""
    for op in ops:
        for _ in range(3):
            await op()
    row = Row(path, len(ops))
    stop = time.perf_counter() + seconds

    async def loop(op: Op) -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await op()
            row.samples.append(time.perf_counter() - t0)

    recording = None
    if PROFILE is not None:
        import _profile

        recording = _profile.start(PROFILE, f"{path} x{len(ops)}")
    t0 = time.perf_counter()
    await asyncio.gather(*(loop(op) for op in ops))
    row.seconds = time.perf_counter() - t0
    if recording is not None:
        recording.stop(row.seconds, len(row.samples) * row.weight)
    return row


async def rocklet_floor(clients: list[int], seconds: float) -> list[Row]:
    """The rocklet through its handle: one agent per client, a session each."""
    from rock_serve.protocol import SessionCreateRequest, SessionRunRequest
    from rock_serve.rocklet import AGENT_PATH, RockletHandle

    rows = []
    root = tempfile.mkdtemp(prefix="rock-bench-rocklet-")
    for n in clients:
        handles = [
            await RockletHandle.spawn([sys.executable, "-I", AGENT_PATH, "--root", root])
            for _ in range(n)
        ]
        try:
            for h in handles:
                await h.create_session(SessionCreateRequest())
            req = SessionRunRequest(command="echo hi")
            rows.append(
                await drive(
                    "rocklet handle (floor)",
                    [lambda h=h, req=req: h.run_in_session(req) for h in handles],
                    seconds,
                )
            )
        finally:
            for h in handles:
                await h.close()
    shutil.rmtree(root, ignore_errors=True)
    return rows


UVICORN_APP = textwrap.dedent(
    """
    import sys
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def echo(request):
        return JSONResponse(await request.json())

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
    """
)


async def http_floor(name: str, url: str, method: str, clients: list[int], seconds: float):
    from rock_serve.sdk._async_transport import LIMITS, AsyncSpreadTransport

    rows = []
    # the SDK's connection pools, so the floor has the client stack the SDK rows have
    spread = AsyncSpreadTransport(limits=LIMITS)
    async with httpx.AsyncClient(base_url=url, transport=spread, timeout=60) as client:
        for n in clients:

            async def call() -> None:
                if method == "POST":
                    r = await client.post("/echo", json={"command": "echo hi"})
                else:
                    r = await client.get("/bare/ping")
                r.raise_for_status()

            rows.append(await drive(name, [call] * n, seconds))
    return rows


async def sessions(
    url: str | None, clients: list[int], seconds: float, runtime: str, mode: str = "admin"
):
    """In-session echo over HTTP (url given; ``mode`` admin or direct) or over Ray (url None)."""
    from rock_serve.sdk import AsyncClient

    name = (
        ("HTTP via Admin" if mode == "admin" else "direct data plane") if url else "Ray transport"
    )
    rows = []
    for n in clients:
        if url:  # the SDK's own connection pools, as a user gets them
            client = AsyncClient(base_url=url, timeout=120, dataplane=mode)  # type: ignore[arg-type]
        else:
            client = AsyncClient.from_ray(namespace="rock-bench")
        async with client:
            boxes = [client.sandbox() for _ in range(n)]
            try:
                for sb in boxes:
                    await sb.__aenter__()
                rows.append(
                    await drive(name, [lambda sb=sb: sb.run("echo hi") for sb in boxes], seconds)
                )
            finally:
                for sb in boxes:
                    await sb.__aexit__(None, None, None)
    return rows


async def batched(url: str | None, clients: list[int], seconds: float) -> list[Row]:
    """The batch op: all N sandboxes stepped by one call per round (a GRPO group's step): one
    request to the node's direct plane (``url``), or one Worker actor call over Ray (None);
    ops/s counts commands, p50/p99 are per round.
    """
    from rock_serve.sdk import AsyncClient

    name = "direct batch (1 req/group)" if url else "Ray batch (1 call/group)"
    rows = []
    for n in clients:
        if n == 1:
            continue
        client = (
            AsyncClient(base_url=url, timeout=120, dataplane="direct")
            if url
            else AsyncClient.from_ray(namespace="rock-bench")
        )
        async with client:
            boxes = [client.sandbox() for _ in range(n)]
            try:
                for sb in boxes:
                    await sb.__aenter__()
                    await sb.run("true")  # its session
                group = [(sb.id, "echo hi") for sb in boxes]

                async def step(
                    group: list[tuple[str, str]] = group, client: AsyncClient = client
                ) -> None:
                    for result in await client.run_many(group):
                        if isinstance(result, Exception):
                            raise result

                row = await drive(name, [step], seconds)
                row.clients, row.weight = n, n
                rows.append(row)
            finally:
                for sb in boxes:
                    await sb.__aexit__(None, None, None)
    return rows


async def churn(url: str | None, loops: list[int], seconds: float) -> list[Row]:
    """create -> first command -> delete per sample; with one loop also the create -> first
    command latency on its own (a row of its own).
    """
    from rock_serve.sdk import AsyncClient

    name = "churn over HTTP" if url else "churn over Ray"
    rows = []
    for n in loops:
        client = (
            AsyncClient(base_url=url, timeout=120, dataplane="admin")
            if url
            else AsyncClient.from_ray(namespace="rock-bench")
        )
        first = Row(f"create->1st cmd {'HTTP' if url else 'Ray'}", n)
        async with client:

            async def one(client: AsyncClient = client, first: Row = first) -> None:
                t0 = time.perf_counter()
                record = await client.create_sandbox()
                await client.exec(record.id, "echo hi")
                first.samples.append(time.perf_counter() - t0)
                await client.delete_sandbox(record.id)

            row = await drive(name, [one] * n, seconds)
            rows.append(row)
            if n == 1:
                first.samples = first.samples[-len(row.samples) :]  # without the warm-up
                first.seconds = row.seconds
                rows.append(first)
    return rows


async def paced(url: str, seconds: float, pace: float) -> list[Row]:
    """create -> first command over HTTP, one create every ``pace`` s after the last delete
    (the latency of a create on an otherwise idle node: the warm pool, if any, refills).
    """
    from rock_serve.sdk import AsyncClient

    row = Row(f"create->1st cmd HTTP, paced {pace:g}s", 1)
    async with AsyncClient(base_url=url, timeout=120, dataplane="admin") as client:
        stop = time.perf_counter() + seconds
        first = True
        while time.perf_counter() < stop or len(row.samples) < 5:
            await asyncio.sleep(pace)
            t0 = time.perf_counter()
            record = await client.create_sandbox()
            await client.exec(record.id, "echo hi")
            if not first:  # the first one warms up connections
                row.samples.append(time.perf_counter() - t0)
            first = False
            await client.delete_sandbox(record.id)
    row.seconds = sum(row.samples)  # ops/s of this row: 1 / mean latency
    return [row]


def report(rows: list[Row], runtime: str) -> None:
    print(f"\n{'path':28} {'clients':>7} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs ping':>8}")
    ping = {r.clients: r for r in rows if r.path.startswith("bare Serve")}
    for r in rows:
        base = ping.get(r.clients)
        ratio = (
            f"{r.rate / base.rate:7.2f}x"
            if base and base.rate and r.path in ("HTTP via Admin", "direct data plane")
            else ""
        )
        print(
            f"{r.path:28} {r.clients:7d} {r.rate:9.1f} {harness.pct(r.samples, 50) * 1e3:8.2f} "
            f"{harness.pct(r.samples, 99) * 1e3:8.2f} {ratio:>8}"
        )
    print(
        f"\n({runtime} runtime; 'vs ping' = ops/s over the bare Serve ping's at the same "
        "concurrency; a create->1st cmd row's ops/s is that of its churn loop.)"
    )


async def measure(url: str, opts: argparse.Namespace) -> list[Row]:
    clients = [int(c) for c in opts.clients.split(",")]
    only = set(opts.only.split(",")) if opts.only else set(PATHS)
    rows: list[Row] = []
    if "floors" in only:
        rows += await floors(url, clients, opts.seconds)
    if "admin" in only:
        rows += await sessions(url, clients, opts.seconds, opts.runtime, "admin")
    if "direct" in only:
        rows += await sessions(url, clients, opts.seconds, opts.runtime, "direct")
    if "batch" in only:
        rows += await batched(url, clients, opts.seconds)
    if "ray" in only:
        rows += await sessions(None, clients, opts.seconds, opts.runtime)
    if "raybatch" in only:
        rows += await batched(None, clients, opts.seconds)
    loops = [int(c) for c in opts.churn.split(",")]
    if "churn" in only:
        rows += await churn(url, loops, opts.churn_seconds)
        rows += await churn(None, loops, opts.churn_seconds)
    if "paced" in only:
        rows += await paced(url, opts.churn_seconds, opts.pace)
    return rows


#: The groups of rows ``--only`` can pick.
PATHS = ("floors", "admin", "direct", "batch", "ray", "raybatch", "churn", "paced")


async def ray_floor(clients: list[int], seconds: float) -> list[Row]:
    """A bare async Ray actor's echo method called from this process (no rock-serve code)."""
    import ray

    @ray.remote(num_cpus=0, max_concurrency=1000)
    class Echo:
        async def echo(self, value: str) -> str:
            return value

    actor = Echo.remote()  # type: ignore[attr-defined]
    rows = []
    try:
        for n in clients:

            async def call() -> None:
                await actor.echo.remote("echo hi")

            rows.append(await drive("bare Ray actor call", [call] * n, seconds))
    finally:
        ray.kill(actor)
    return rows


async def floors(url: str, clients: list[int], seconds: float) -> list[Row]:
    """The rocklet through its handle, a bare Serve ping, a bare uvicorn echo and a bare Ray
    actor call.
    """
    rows: list[Row] = []
    rows += await rocklet_floor(clients, seconds)
    rows += await ray_floor(clients, seconds)
    rows += await http_floor("bare Serve GET /ping", url, "GET", clients, seconds)
    port = harness.free_port()
    proc = subprocess.Popen([sys.executable, "-c", UVICORN_APP, str(port)])
    try:
        echo_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.post(f"{echo_url}/echo", json={}, timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        rows += await http_floor("bare uvicorn echo", echo_url, "POST", clients, seconds)
    finally:
        proc.terminate()
        proc.wait(10)
    return rows


def _unmount_leftovers(state: str) -> None:
    """Lazily unmount what sandboxes the platform did not remove left mounted in ``state``
    (and their root links), so that removing the dir never walks into an image layer.
    """
    from rock_serve.runtime.bwrap import mounts_under

    points = mounts_under(state)
    if os.path.isdir(state):
        for name in os.listdir(state):
            points += mounts_under(f"/run/rock-serve/roots/{name}")
    for point in points:  # deepest first
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    if points:
        print(f"(unmounted {len(points)} leftover mounts of sandboxes the run did not remove)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--churn-seconds", type=float, default=8.0)
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--churn", default="1,8")
    parser.add_argument("--runtime", default="bwrap", choices=["local", "bwrap"])
    parser.add_argument("--only", default="", help=f"comma list of {','.join(PATHS)} (all)")
    parser.add_argument(
        "--profile",
        default="",
        metavar="DIR",
        help="py-spy each row's processes (bench, Worker, Admin, Scheduler, proxy) into DIR "
        "and print where their time goes",
    )
    parser.add_argument(
        "--pace", type=float, default=0.3, help="seconds between the paced row's creates"
    )
    parser.add_argument(
        "--warm-pool", type=int, default=0, help="the Worker's warm_pool_size (default 0)"
    )
    opts = parser.parse_args()
    global PROFILE
    PROFILE = Path(opts.profile) if opts.profile else None
    capacity = max(int(c) for c in opts.clients.split(",")) + 16
    # A bench-private state dir and (bwrap) image store: the node's shared store at
    # /var/lib/rock-serve/images is also what tests evict from and unpack into.
    state = tempfile.mkdtemp(prefix="rock-bench-state-")
    runtime = harness.runtime_config(opts.runtime, state)
    if opts.runtime == "bwrap":
        runtime["images"] = {"root": os.environ.get("ROCK_BENCH_IMAGES", IMAGES)}
    base = {
        "runtime": runtime,
        "auth": {"mode": "disabled"},
        "max_sandboxes_per_node": capacity,
        "namespace": "rock-bench",
        "warm_pool_size": opts.warm_pool,
    }
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        with harness.platform({"/": base}, extra=add_ping_app) as urls:
            rows = asyncio.run(measure(urls["/"], opts))
    finally:
        _unmount_leftovers(state)
        shutil.rmtree(state, ignore_errors=True)
    report(rows, opts.runtime)


if __name__ == "__main__":
    main()
