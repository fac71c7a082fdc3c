"""Benchmark: what carrying a trace id into the rocklet costs (issue 17.5).

Usage: ``.venv/bin/python bench/trace.py [--n 500]``

One rocklet process (its stderr to a file, as ``agent.log`` on the bwrap and local runtimes)
driven through :class:`~rock_serve.rocklet.handle.RockletHandle`: ``ping`` and ``file.stat``
(ops that cost almost nothing, so the trace's frame field and two log lines are most visible)
and ``exec`` of ``true``, untraced and traced, interleaved in rounds so that machine load hits
both alike. Prints p50/p99 in ms of each and the traced/untraced ratio of the p50s (the floor is
the untraced run, measured in the same run). Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

from rock_serve._tracing import TRACE_ID, new_trace_id
from rock_serve.protocol import ExecRequest
from rock_serve.rocklet import AGENT_PATH, RockletHandle

sys.path.insert(0, os.path.dirname(__file__))
from _harness import pct  # noqa: E402


async def _timed(op: Callable[[], Awaitable[object]], traced: bool) -> float:
    token = TRACE_ID.set(new_trace_id() if traced else "-")
    try:
        started = time.perf_counter()
        await op()
        return (time.perf_counter() - started) * 1000
    finally:
        TRACE_ID.reset(token)


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="rock-bench-trace-") as tmp:
        log_path = os.path.join(tmp, "agent.log")
        with open(log_path, "ab") as log:
            handle = await RockletHandle.spawn(
                [sys.executable, "-I", AGENT_PATH, "--root", tmp], stderr=log
            )
        try:
            ops: dict[str, Callable[[], Awaitable[object]]] = {
                "ping": handle.ping,
                "file.stat": lambda: handle.stat(tmp),
                "exec true": lambda: handle.exec(ExecRequest(command=["true"])),
            }
            print(f"rocklet trace overhead, n={n} per op and mode (ms)")
            print(f"{'op':<10} {'untraced p50':>13} {'p99':>8} {'traced p50':>11} {'p99':>8} ratio")
            for name, op in ops.items():
                for _ in range(20):  # warm-up
                    await op()
                plain: list[float] = []
                traced: list[float] = []
                for _ in range(n):
                    plain.append(await _timed(op, False))
                    traced.append(await _timed(op, True))
                ratio = pct(traced, 50) / pct(plain, 50)
                print(
                    f"{name:<10} {pct(plain, 50):13.3f} {pct(plain, 99):8.3f} "
                    f"{pct(traced, 50):11.3f} {pct(traced, 99):8.3f} {ratio:5.2f}"
                )
        finally:
            await handle.close()
        lines = sum(1 for _ in open(log_path, "rb"))
        print(f"agent.log: {lines} lines ({os.path.getsize(log_path)} bytes) for the traced ops")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=500)
    asyncio.run(main(parser.parse_args().n))
