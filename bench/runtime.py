"""Benchmark: sandbox runtimes side by side, same run: bwrap, docker and gvisor.

Usage: ``.venv/bin/python bench/runtime.py [--sandboxes 10] [--n 200] [--quick]``

For each runtime this machine has, it times sandbox create -> first command (``create``,
``start``, then ``exec echo hi`` through the rocklet), the same with a bash session
(``create_session`` + ``echo hi`` in it), in-session ``echo hi`` in a running sandbox, one-shot
``exec echo hi``, remove, and 8 creates at once (wall time until all 8 answered). For docker it
also measures the floor in the same run: ``create`` + ``start`` of a bare container through the
SDK (no rocklet, no limits). gvisor is docker with runsc (``scripts/start-dockerd`` registers
it). Idle memory per sandbox: 5 started sandboxes whose rocklet answered, each one's memory
cgroup on the host (usage, and its rss part) in MiB; docker and gvisor also keep a
containerd-shim per container outside that cgroup. Prints p50 / p99 in ms and the ratios to
bwrap. Docker and gvisor use the offline test image from scripts/build-test-image (never
pulled). A runtime that cannot run here is skipped with a line saying why. Never part of the
test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from rock_serve.config import (
    DOCKER_TEST_IMAGE,
    BwrapRuntimeConfig,
    DockerRuntimeConfig,
    GvisorRuntimeConfig,
)
from rock_serve.protocol import ExecRequest, SandboxSpec, SessionCreateRequest, SessionRunRequest
from rock_serve.runtime import Runtime

Stats = tuple[float, float]  # p50, p99 in ms


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def stats(xs: list[float]) -> Stats:
    return pct(xs, 50), pct(xs, 99)


async def timed(n: int, fn: Callable[[], Awaitable[object]], warmup: int = 3) -> Stats:
    for _ in range(warmup):
        await fn()
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        xs.append((time.perf_counter() - t) * 1000)
    return stats(xs)


def new_id() -> str:
    return f"bench-{uuid.uuid4().hex[:10]}"


def memory_mib(pid: int) -> tuple[float, float]:
    """Usage and rss (MiB) of the memory cgroup of host process ``pid``."""
    with open(f"/proc/{pid}/cgroup") as f:
        rows = [line.strip().split(":", 2) for line in f]
    for _, controllers, path in rows:
        if "memory" in controllers.split(","):
            base = f"/sys/fs/cgroup/memory{path}"
            with open(f"{base}/memory.usage_in_bytes") as f:
                usage = int(f.read())
            with open(f"{base}/memory.stat") as f:
                rss = next(int(v) for k, v in (r.split() for r in f) if k == "total_rss")
            return usage / 2**20, rss / 2**20
    for _, controllers, path in rows:
        if controllers == "":  # cgroup v2
            base = f"/sys/fs/cgroup{path}"
            with open(f"{base}/memory.current") as f:
                usage = int(f.read())
            with open(f"{base}/memory.stat") as f:
                rss = next(int(v) for k, v in (r.split() for r in f) if k == "anon")
            return usage / 2**20, rss / 2**20
    raise RuntimeError(f"no memory cgroup for pid {pid}")


async def idle_memory(rt: Runtime, count: int = 5) -> dict[str, Stats]:
    """Memory cgroup usage and rss of ``count`` idle started sandboxes (MiB, not ms)."""
    ids = []
    usage, rss = [], []
    try:
        for _ in range(count):
            sid = new_id()
            ids.append(sid)
            await rt.create(sid, SandboxSpec())
            handle = await rt.start(sid)
            await handle.exec(ExecRequest(command="true"))
        for sid in ids:
            pid = (await rt.inspect(sid)).pid
            assert pid, sid
            u, r = memory_mib(pid)
            usage.append(u)
            rss.append(r)
    finally:
        await asyncio.gather(*(rt.remove(s) for s in ids))
    return {
        "idle memory per sandbox, MiB: cgroup usage": stats(usage),
        "idle memory per sandbox, MiB: of which rss": stats(rss),
    }


async def measure(rt: Runtime, sandboxes: int, n: int) -> dict[str, Stats]:
    """Everything for one runtime; every sandbox it makes is removed."""
    out: dict[str, Stats] = {}
    first, session_first, creates, starts, removes = [], [], [], [], []
    for i in range(sandboxes + 1):
        sid = new_id()
        t0 = time.perf_counter()
        await rt.create(sid, SandboxSpec())
        try:
            t1 = time.perf_counter()
            handle = await rt.start(sid)
            t2 = time.perf_counter()
            res = await handle.exec(ExecRequest(command="echo hi"))
            t3 = time.perf_counter()
            assert res.stdout == "hi\n", res
            await handle.create_session(SessionCreateRequest())
            run = await handle.run_in_session(SessionRunRequest(command="echo hi"))
            t4 = time.perf_counter()
            assert run.output == "hi\n", run
        finally:
            t5 = time.perf_counter()
            await rt.remove(sid)
            t6 = time.perf_counter()
        if i:  # the first one warms caches (image, page cache, the rocklet's .pyc)
            creates.append((t1 - t0) * 1000)
            starts.append((t2 - t1) * 1000)
            first.append((t3 - t0) * 1000)
            session_first.append((t4 - t0) * 1000 - (t3 - t2) * 1000)
            removes.append((t6 - t5) * 1000)
    out["create -> first command (exec)"] = stats(first)
    out["create -> first command (session)"] = stats(session_first)
    out["  of which create"] = stats(creates)
    out["  of which start (rocklet answers)"] = stats(starts)
    out["remove"] = stats(removes)

    sid = new_id()
    await rt.create(sid, SandboxSpec())
    try:
        handle = await rt.start(sid)
        await handle.create_session(SessionCreateRequest())
        req = SessionRunRequest(command="echo hi")
        out["in-session echo hi"] = await timed(n, lambda: handle.run_in_session(req))
        one = ExecRequest(command="echo hi")
        out["one-shot exec echo hi"] = await timed(max(20, n // 4), lambda: handle.exec(one))
    finally:
        await rt.remove(sid)

    async def one_sandbox() -> str:
        sid = new_id()
        await rt.create(sid, SandboxSpec())
        handle = await rt.start(sid)
        await handle.exec(ExecRequest(command="true"))
        return sid

    walls = []
    for _ in range(max(1, sandboxes // 5)):
        t = time.perf_counter()
        ids = await asyncio.gather(*(one_sandbox() for _ in range(8)))
        walls.append((time.perf_counter() - t) * 1000)
        await asyncio.gather(*(rt.remove(s) for s in ids))
    out["8 creates at once (wall)"] = stats(walls)
    out.update(await idle_memory(rt))
    return out


async def docker_floor(sandboxes: int, runtime: str | None = None) -> Stats:
    """Bare ``create`` + ``start`` of a container through the SDK (OCI ``runtime``), then
    remove it."""
    import docker

    from rock_serve.runtime._sync import run_sync

    api: Any = await run_sync(docker.APIClient, version="auto")
    xs = []
    try:
        for i in range(sandboxes + 1):
            t = time.perf_counter()
            c = await run_sync(
                api.create_container,
                DOCKER_TEST_IMAGE,
                ["sleep", "infinity"],
                host_config=api.create_host_config(network_mode="none", runtime=runtime),
            )
            await run_sync(api.start, c["Id"])
            if i:
                xs.append((time.perf_counter() - t) * 1000)
            await run_sync(api.remove_container, c["Id"], force=True)
    finally:
        await run_sync(api.close)
    return stats(xs)


async def bench(kind: str, sandboxes: int, n: int) -> dict[str, Stats] | str:
    state = tempfile.mkdtemp(prefix=f"rock-bench-{kind}-")
    rt: Runtime | None = None
    try:
        if kind == "bwrap":
            rt = BwrapRuntimeConfig(state_dir=state, cgroup_parent="rock-serve-bench").build()
        else:
            config = GvisorRuntimeConfig if kind == "gvisor" else DockerRuntimeConfig
            rt = config(
                image=DOCKER_TEST_IMAGE,
                pull="never",
                scope=f"bench-{uuid.uuid4().hex[:8]}",
                agent_dir=f"{state}/agent",
            ).build()
            await rt.list()  # fails here, with the reason, when no daemon answers
        out = await measure(rt, sandboxes, n)
        if kind == "docker":
            out["floor: bare SDK create+start"] = await docker_floor(sandboxes)
        if kind == "gvisor":
            runsc = GvisorRuntimeConfig.model_fields["oci_runtime"].default
            out["floor: bare SDK create+start"] = await docker_floor(sandboxes, runsc)
        return out
    except Exception as exc:
        return f"{kind}: {type(exc).__name__}: {exc}"
    finally:
        if rt is not None:
            with contextlib.suppress(Exception):
                for info in await rt.list():
                    await rt.remove(info.id)
            with contextlib.suppress(Exception):
                await rt.close()
        shutil.rmtree(state, ignore_errors=True)


def fmt(s: Stats | None) -> str:
    if s is None:
        return "-"
    return f"{s[0]:.2f} / {s[1]:.2f}" if s[0] < 100 else f"{s[0]:.0f} / {s[1]:.0f}"


def print_table(results: dict[str, dict[str, Stats]]) -> None:
    names = list(results)
    metrics: list[str] = []
    for res in results.values():
        metrics += [m for m in res if m not in metrics]
    head = ["metric (p50 / p99 ms)", *names]
    ratios = [n for n in names if n != "bwrap"] if "bwrap" in names else []
    head += [f"{n}/bwrap" for n in ratios]
    rows = []
    for m in metrics:
        row = [m, *(fmt(results[name].get(m)) for name in names)]
        for name in ratios:
            b, d = results["bwrap"].get(m), results[name].get(m)
            row.append(f"{d[0] / b[0]:.1f}x" if b and d and b[0] > 0 else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))

    print(line(head))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sandboxes", type=int, default=10, help="sandboxes per create metric")
    parser.add_argument("--n", type=int, default=200, help="iterations of in-session echo")
    parser.add_argument("--quick", action="store_true", help="a smoke run (3 sandboxes, n=30)")
    args = parser.parse_args()
    sandboxes, n = (3, 30) if args.quick else (args.sandboxes, args.n)
    print(f"sandbox runtimes, same run: {sandboxes} sandboxes per create metric, n={n}")
    results: dict[str, dict[str, Stats]] = {}
    notes = []
    for kind in ("bwrap", "docker", "gvisor"):
        res = await bench(kind, sandboxes, n)
        if isinstance(res, str):
            notes.append(f"skipped {res}")
            print(f"  {notes[-1]}", flush=True)
        else:
            results[kind] = res
            print(f"  measured {kind}", flush=True)
    print()
    if results:
        print_table(results)
    for note in notes:
        print(note)
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
