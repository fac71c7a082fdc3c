"""Benchmark: background process start -> first output line, against ``exec`` of the same
command in the same run (issue 15.1).

Usage: ``.venv/bin/python bench/process.py [--n 100] [--runtime local|bwrap] [--no-platform]``

Two levels, each printing p50/p99 in ms and the ratio process/exec of the p50s:

- rocklet: a bare rocklet over its pipes (``RockletHandle``): ``proc.start`` then a
  ``proc.output`` follow until the first newline, vs one ``exec``.
- platform: Ray Serve with one rock-serve app (its own local Ray, never another cluster) and
  the SDK over HTTP: ``p = await sb.process.start(cmd); async for line in p.stdout`` (first
  line), vs ``await sb.exec(cmd)``.

``echo hi`` is the same command for both; ``echo hi; sleep 30`` shows the first line arriving
while the process keeps running (it is killed after each sample), which ``exec`` cannot do.
Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

from _harness import pct, platform

from rock_serve.protocol import ExecRequest
from rock_serve.protocol.processes import ProcessOutputChunk, ProcessStartRequest
from rock_serve.rocklet import AGENT_PATH, RockletHandle
from rock_serve.sdk import AsyncClient

QUICK = "echo hi"
LONG = "echo hi; sleep 30"


Once = Callable[[], Awaitable[Callable[[], Awaitable[object]] | None]]


async def _samples(n: int, once: Once) -> list[float]:
    """Times of ``once()`` in ms; the clean-up it returns (wait or kill) runs untimed."""
    for _ in range(min(5, n)):  # warm-up
        cleanup = await once()
        if cleanup is not None:
            await cleanup()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        cleanup = await once()
        out.append((time.perf_counter() - t0) * 1000)
        if cleanup is not None:
            await cleanup()
    return out


def _row(name: str, xs: list[float], floor: list[float] | None) -> str:
    ratio = f"{pct(xs, 50) / pct(floor, 50):.2f}x" if floor else ""
    return f"| {name} | {pct(xs, 50):.2f} | {pct(xs, 99):.2f} | {ratio} |"


async def bench_rocklet(n: int) -> list[str]:
    with tempfile.TemporaryDirectory() as root:
        h = await RockletHandle.spawn([sys.executable, "-I", AGENT_PATH, "--root", root])
        try:

            async def exec_once() -> None:
                result = await h.exec(ExecRequest(command=QUICK))
                assert result.stdout == "hi\n"

            def proc_once(command: str) -> Once:
                async def once() -> Callable[[], Awaitable[object]]:
                    info = await h.start_process(ProcessStartRequest(command=command))
                    items = h.process_output(info.pid, follow=True)
                    async for item in items:
                        if isinstance(item, ProcessOutputChunk) and "\n" in item.data:
                            break
                    await items.aclose()  # type: ignore[attr-defined]
                    return lambda: h.kill_process(info.pid)

                return once

            floor = await _samples(n, exec_once)
            quick = await _samples(n, proc_once(QUICK))
            long = await _samples(n, proc_once(LONG))
        finally:
            await h.close()
    return [
        _row(f"rocklet: exec `{QUICK}` (floor)", floor, None),
        _row(f"rocklet: process `{QUICK}` -> first line", quick, floor),
        _row(f"rocklet: process `{LONG}` -> first line", long, floor),
    ]


async def bench_platform(url: str, n: int) -> list[str]:
    async with AsyncClient(url) as client, client.sandbox(ttl_seconds=900) as sb:

        async def exec_once() -> None:
            assert (await sb.exec(QUICK)).stdout == "hi\n"

        def proc_once(command: str) -> Once:
            async def once() -> Callable[[], Awaitable[object]]:
                p = await sb.process.start(command)
                lines = p.stdout.lines()
                async for line in lines:
                    assert line == "hi"
                    break
                await lines.aclose()  # type: ignore[attr-defined]
                return p.kill

            return once

        floor = await _samples(n, exec_once)
        quick = await _samples(n, proc_once(QUICK))
        long = await _samples(n, proc_once(LONG))
    return [
        _row(f"platform (HTTP SDK): exec `{QUICK}` (floor)", floor, None),
        _row(f"platform (HTTP SDK): process `{QUICK}` -> first line", quick, floor),
        _row(f"platform (HTTP SDK): process `{LONG}` -> first line", long, floor),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="samples per row")
    parser.add_argument("--runtime", default="local", help="runtime of the platform level")
    parser.add_argument("--no-platform", action="store_true", help="only the rocklet level")
    args = parser.parse_args()
    rows = asyncio.run(bench_rocklet(args.n))
    if not args.no_platform:
        app = {"runtime": args.runtime, "max_processes_per_sandbox": 64}
        with platform({"/": app}) as urls:
            rows += asyncio.run(bench_platform(urls["/"], args.n))
    print(f"n={args.n} per row; ms; ratio = p50 / the exec floor's p50 in the same run")
    print("| metric | p50 | p99 | ratio |")
    print("|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
