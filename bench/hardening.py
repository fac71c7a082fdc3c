"""Benchmark: what the bwrap hardening (issue 11) costs, before and after in the same run.

Usage: ``.venv/bin/python bench/hardening.py [--before main] [--n 200] [--sandboxes 20]``

"Before" is the tree of a git ref (default ``main``; pick the commit before the hardening)
exported with ``git archive`` to a temp dir and imported first on ``PYTHONPATH``; "after" is
this checkout. Each side runs in its own process, one after the other, on the bwrap runtime
with a default spec and its own state dir and cgroup parent, and reports (p50 / p99 in ms):

- create -> first command: ``create`` + ``start`` + ``exec echo hi`` through the rocklet;
- in-session ``echo hi`` in a running sandbox;
- churn: create -> exec -> remove, sequential, sandboxes per second;
- idle memory per sandbox: the memory cgroup's usage of ``--sandboxes`` idle sandboxes
  (after one command each), mean in MiB.

The ratio column is after / before. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


async def side(n: int, sandboxes: int) -> dict[str, Any]:
    """Measure the importable rock_serve (one side)."""
    from rock_serve.config import BwrapRuntimeConfig
    from rock_serve.protocol import (
        ExecRequest,
        SandboxSpec,
        SessionCreateRequest,
        SessionRunRequest,
    )

    state = tempfile.mkdtemp(prefix="rock-bench-hardening-")
    cfg = BwrapRuntimeConfig(state_dir=f"{state}/s", cgroup_parent="rock-bench-hardening")
    rt = cfg.build()
    echo = ExecRequest(command="echo hi")
    out: dict[str, Any] = {}

    def new_id() -> str:
        return f"bench-{uuid.uuid4().hex[:10]}"

    try:
        first: list[float] = []
        ids = []
        for _ in range(sandboxes):
            sid = new_id()
            t = time.perf_counter()
            await rt.create(sid, SandboxSpec())
            h = await rt.start(sid)
            assert (await h.exec(echo)).stdout == "hi\n"
            first.append((time.perf_counter() - t) * 1000)
            ids.append(sid)
        out["create -> first command (ms)"] = [pct(first, 50), pct(first, 99)]

        await asyncio.sleep(1.0)  # let the last starts settle before reading memory
        usage = []
        for sid in ids:
            cg = rt._cgroup(sid)
            mem = cg.dirs.get("memory", cg.dirs.get(""))
            name = "memory.usage_in_bytes" if "memory" in cg.dirs else "memory.current"
            with open(f"{mem}/{name}") as f:
                usage.append(int(f.read()) / (1 << 20))
        out["idle memory per sandbox (MiB)"] = [sum(usage) / len(usage), max(usage)]

        h = rt._handles[ids[0]]
        await h.create_session(SessionCreateRequest())
        run = SessionRunRequest(command="echo hi")
        xs = []
        for i in range(n + 5):
            t = time.perf_counter()
            await h.run_in_session(run)
            if i >= 5:
                xs.append((time.perf_counter() - t) * 1000)
        out["in-session echo (ms)"] = [pct(xs, 50), pct(xs, 99)]

        for sid in ids:
            await rt.remove(sid)
        ids = []

        count, t0 = 0, time.perf_counter()
        while count < sandboxes:
            sid = new_id()
            await rt.create(sid, SandboxSpec())
            h = await rt.start(sid)
            await h.exec(echo)
            await rt.remove(sid)
            count += 1
        rate = count / (time.perf_counter() - t0)
        out["churn create->exec->remove (/s)"] = [rate, rate]
    finally:
        for info in await rt.list():
            await rt.remove(info.id)
        await rt.close()
        subprocess.run(["rm", "-rf", state], check=False)
    return out


def run_side(pythonpath: str | None, n: int, sandboxes: int) -> dict[str, Any]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--side", "--n", str(n), "--sandboxes", str(sandboxes)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"side failed ({pythonpath or 'after'}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="main", help="git ref of the 'before' tree")
    parser.add_argument("--n", type=int, default=200, help="in-session echo iterations")
    parser.add_argument("--sandboxes", type=int, default=20, help="sandboxes per metric")
    parser.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(asyncio.run(side(args.n, args.sandboxes))))
        return 0
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="rock-before-") as before:
        archive = subprocess.run(
            ["git", "-C", repo, "archive", args.before, "rock_serve"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", before], input=archive, check=True)
        results = {
            "before": run_side(before, args.n, args.sandboxes),
            "after": run_side(None, args.n, args.sandboxes),
        }
    print(f"bwrap, default spec, {args.sandboxes} sandboxes, n={args.n}; before = {args.before}")
    print("| metric | before p50 / p99 | after p50 / p99 | after/before (p50) |")
    print("|---|---|---|---|")
    for metric, (b50, b99) in results["before"].items():
        a50, a99 = results["after"][metric]
        print(f"| {metric} | {b50:.2f} / {b99:.2f} | {a50:.2f} / {a99:.2f} | {a50 / b50:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
