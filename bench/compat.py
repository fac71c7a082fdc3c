"""Benchmark: ROCK's own SDK through our compat API vs our own SDK, same platform, same run.

Usage: ``.venv/bin/python bench/compat.py [--runtime local|bwrap] [--starts 10] [--echo 200]``

Starts Ray + Serve with one rock-serve app (auth off, loopback), then measures in seconds
(printed in ms, p50/p99):

- ``start()`` until alive: rl-rock 1.11.0's ``Sandbox.start()`` (``start_async``, then
  ``get_status`` until ``is_alive``; run in ``.clients/rl-rock``, see scripts/client-venvs) vs
  our ``AsyncClient.create_sandbox`` (returns once running);
- ``arun`` echo in an existing session (rl-rock: ``arun("echo hi", session=...)``) vs our
  ``run(..., session=...)``, both over HTTP;
- 8 x ``SandboxGroup.start()`` (wall, 5 runs) vs 8 concurrent creates (wall, 5 runs).

Each side runs twice, in the order ROCK, ours, ours, ROCK, with half the counts each time. The
ratio column is ROCK SDK / our SDK (the floor: the same platform reached by our client).
ROCK's SDK sleeps 3 s between ``get_status`` polls; on a ROCK server a sandbox is not alive at
the first poll (image pull + container start), so ``start()`` there costs at least 3 s by
construction. Here the first poll finds it alive. Never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import _harness as harness

ROOT = Path(__file__).resolve().parents[1]
ROCK_PYTHON = ROOT / ".clients" / "rl-rock" / "bin" / "python"
#: Our SDK's create resources (the ROCK SDK's 1g / 1 cpu; none with --warm).
RESOURCES: dict[str, object] = {"memory_mb": 1024, "cpus": 1}
#: Times each group start is measured (p50/p99 over these).
GROUP_RUNS = 5


async def ours(url: str, starts: int, echoes: int, group: int) -> dict[str, list[float]]:
    from rock_serve.sdk import AsyncClient

    out: dict[str, list[float]] = {"start": [], "echo": [], "group": []}
    async with AsyncClient(url) as client:
        resources = RESOURCES
        for _ in range(starts):
            t0 = time.perf_counter()
            record = await client.create_sandbox(resources=resources, lease_seconds=600)
            out["start"].append(time.perf_counter() - t0)
            await client.delete_sandbox(record.id)
        record = await client.create_sandbox(resources=resources, lease_seconds=600)
        await client.create_session(record.id, "bench")
        for i in range(echoes + 10):
            t0 = time.perf_counter()
            result = await client.run(record.id, "echo hi", session="bench")
            if i >= 10:
                out["echo"].append(time.perf_counter() - t0)
            assert result.output_bytes().strip() == b"hi"
        await client.delete_sandbox(record.id)
        for _ in range(GROUP_RUNS):
            t0 = time.perf_counter()
            records = await asyncio.gather(
                *(
                    client.create_sandbox(resources=resources, lease_seconds=600)
                    for _ in range(group)
                )
            )
            out["group"].append(time.perf_counter() - t0)
            await asyncio.gather(*(client.delete_sandbox(r.id) for r in records))
    return out


def rock_sdk(url: str, starts: int, echoes: int, group: int) -> dict[str, list[float]]:
    proc = subprocess.run(
        [str(ROCK_PYTHON), str(ROOT / "bench" / "_rock_client.py"), url]
        + [str(starts), str(echoes), str(group), str(GROUP_RUNS)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"rl-rock driver failed:\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"start": data["start"], "echo": data["echo"], "group": data["group"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default="local", choices=["local", "bwrap"])
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--echo", type=int, default=200)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument(
        "--warm",
        type=int,
        default=0,
        help="warm_pool_size, with compat.rock_resources=ignore and our SDK asking for no "
        "resources, so both sides' starts can take warm sandboxes",
    )
    args = parser.parse_args()
    if not ROCK_PYTHON.exists():
        raise SystemExit("rl-rock is not installed: run scripts/client-venvs rl-rock")
    app: dict[str, object] = {
        "runtime": args.runtime,
        "namespace": "rock-bench-compat",
        "max_sandboxes_per_node": 64,
        "warm_pool_size": args.warm,
        "compat": {"rock_resources": "ignore" if args.warm else "apply"},
    }
    global RESOURCES
    RESOURCES = {} if args.warm else {"memory_mb": 1024, "cpus": 1}
    with harness.platform({"/": app}) as urls:
        url = urls["/"]
        # A-B-B-A halves, so load that drifts during the run (a shared machine) hits both.
        half = (max(1, args.starts // 2), max(1, args.echo // 2), args.group)
        theirs = rock_sdk(url, *half)
        mine = asyncio.run(ours(url, *half))
        for key, values in asyncio.run(ours(url, *half)).items():
            mine[key] += values
        for key, values in rock_sdk(url, *half).items():
            theirs[key] += values
    print(
        f"runtime={args.runtime} starts={args.starts} echo={args.echo} group={args.group} "
        f"warm_pool_size={args.warm}"
    )
    print(f"{'metric':34} {'ROCK SDK p50/p99 ms':>22} {'our SDK p50/p99 ms':>22} {'ratio':>7}")
    rows = [
        ("start() until alive", "start"),
        ("arun echo in a session", "echo"),
        (f"{args.group} x SandboxGroup start (wall)", "group"),
    ]
    for label, key in rows:
        a50, a99 = harness.pct(theirs[key], 50) * 1000, harness.pct(theirs[key], 99) * 1000
        b50, b99 = harness.pct(mine[key], 50) * 1000, harness.pct(mine[key], 99) * 1000
        ratio = a50 / b50 if b50 else float("nan")
        print(f"{label:34} {a50:10.1f} / {a99:9.1f} {b50:10.1f} / {b99:9.1f} {ratio:6.2f}x")
    print(
        "ROCK's SDK polls get_status every 3 s: against a ROCK server start() takes >= 3000 ms "
        "whenever the sandbox is not alive at the first poll; here the first poll finds it alive."
    )


if __name__ == "__main__":
    sys.exit(main())
