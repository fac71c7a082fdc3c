"""What the limits cost: the same Worker (no Ray, no HTTP) with and without the rocklet liveness
watchdog, in one run, so the ratio is the watchdog's price.

```
.venv/bin/python bench/limits.py [--runtime bwrap|local] [-n 200] [--idle 50]
```

Prints p50/p99 in ms of create -> first command, in-session ``echo hi`` and one-shot exec, for
``rocklet_ping_interval_seconds=None`` (the floor: no watchdog) and for a 0.05 s interval (a
ping whenever a rocklet was silent for 50 ms: far more often than the 10 s default), plus the
Worker's CPU time over a wait with ``--idle`` idle sandboxes being pinged.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._harness import pct, runtime_config  # noqa: E402
from rock_serve.config import ServerArgs  # noqa: E402
from rock_serve.deployments.worker import Worker  # noqa: E402
from rock_serve.protocol import (  # noqa: E402
    CreateSandboxRequest,
    ExecRequest,
    SessionCreateRequest,
    SessionRunRequest,
)
from rock_serve.protocol.ops import ExecOp, SessionCreateOp, SessionRunOp  # noqa: E402


async def _measure(runtime: str, interval: float | None, n: int, idle: int) -> dict[str, object]:
    state = tempfile.mkdtemp(prefix="rock-bench-limits-")
    args = ServerArgs.model_validate(
        {
            "runtime": runtime_config(runtime, state),
            "rocklet_ping_interval_seconds": interval,
            "rocklet_ping_timeout_seconds": 5.0,
            "max_sandboxes_per_node": idle + 8,
        }
    )
    worker = Worker(args, "bench", "node-bench")
    await worker.ready()
    out: dict[str, object] = {}
    try:
        creates: list[float] = []
        for _ in range(max(n // 10, 5)):
            started = time.perf_counter()
            record = await worker.create(
                f"sb-bench-{uuid.uuid4().hex[:16]}", CreateSandboxRequest(), 600
            )
            await worker.op(record.id, ExecOp.of(ExecRequest(command="echo hi")))
            creates.append((time.perf_counter() - started) * 1000)
            await worker.remove(record.id)
        out["create -> first command"] = creates
        sid = (
            await worker.create(f"sb-bench-{uuid.uuid4().hex[:16]}", CreateSandboxRequest(), 600)
        ).id
        await worker.op(sid, SessionCreateOp.of(SessionCreateRequest()))
        echo: list[float] = []
        execs: list[float] = []
        for _ in range(n):
            started = time.perf_counter()
            await worker.op(sid, SessionRunOp.of(SessionRunRequest(command="echo hi")))
            echo.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await worker.op(sid, ExecOp.of(ExecRequest(command="echo hi")))
            execs.append((time.perf_counter() - started) * 1000)
        out["in-session echo"] = echo
        out["one-shot exec"] = execs
        for _ in range(idle):
            await worker.create(f"sb-bench-{uuid.uuid4().hex[:16]}", CreateSandboxRequest(), 600)
        cpu = time.process_time()
        await asyncio.sleep(2.0)  # idle sandboxes: only the watchdog works
        out["worker cpu ms over 2 s idle"] = (time.process_time() - cpu) * 1000
    finally:
        await worker.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default="bwrap", choices=["bwrap", "local"])
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--idle", type=int, default=50)
    opts = parser.parse_args()
    floor = asyncio.run(_measure(opts.runtime, None, opts.n, opts.idle))
    watched = asyncio.run(_measure(opts.runtime, 0.05, opts.n, opts.idle))
    print(
        f"runtime={opts.runtime} n={opts.n} idle={opts.idle}; p50 / p99 ms; ratio = watched/floor"
    )
    print(f"{'metric':34} {'no watchdog':>16} {'ping every 50ms':>16} {'ratio':>6}")
    for key, base in floor.items():
        other = watched[key]
        if isinstance(base, list) and isinstance(other, list):
            b50, o50 = pct(base, 50), pct(other, 50)
            print(
                f"{key:34} {b50:7.2f} / {pct(base, 99):6.2f} {o50:7.2f} / {pct(other, 99):6.2f} "
                f"{o50 / b50:6.2f}"
            )
        else:
            assert isinstance(base, float) and isinstance(other, float)
            print(f"{key:34} {base:16.1f} {other:16.1f} {other / max(base, 0.1):6.2f}")


if __name__ == "__main__":
    main()
