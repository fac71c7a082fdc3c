"""Benchmark: our rocklet (handle and HTTP mode) against ROCK's rocklet and SWE-ReX, same run.

Usage: ``.venv/bin/python bench/rocklet.py [--n 200] [--quick]``

It starts every HTTP server itself on a free loopback port (ours with ``python -m
rock_serve.rocklet``, the peers from their own venvs, see bench/README.md), drives the three
with the same httpx client and the same SWE-ReX request bodies, prints p50/p99 in ms and the
peer/ours ratios, then stops them. A peer whose venv is missing is skipped with a line saying
so. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import httpx

from rock_serve.protocol import ExecRequest, SessionCreateRequest, SessionRunRequest
from rock_serve.rocklet import AGENT_PATH, RockletHandle

TOKEN = "bench-" + uuid.uuid4().hex
SWEREX_VENV = Path(os.environ.get("ROCK_BENCH_SWEREX_VENV", "/opt/peers/swerex"))
ROCK_VENV = Path(os.environ.get("ROCK_BENCH_ROCK_VENV", "/opt/peers/rock"))
STARTUP_TIMEOUT = 90.0
REQUEST_TIMEOUT = 60.0


class Target:
    """What every benchmarked thing can do; one subclass speaks HTTP, one the pipe."""

    name = ""

    async def create_session(self, session: str) -> None:
        raise NotImplementedError

    async def run(self, session: str, command: str) -> str:
        raise NotImplementedError

    async def execute(self, command: str) -> str:
        raise NotImplementedError

    async def close_session(self, session: str) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


class HandleTarget(Target):
    """Our rocklet through a RockletHandle (no HTTP)."""

    name = "ours (handle)"

    def __init__(self, handle: RockletHandle) -> None:
        self.h = handle

    async def create_session(self, session: str) -> None:
        await self.h.create_session(SessionCreateRequest(session=session))

    async def run(self, session: str, command: str) -> str:
        res = await self.h.run_in_session(SessionRunRequest(session=session, command=command))
        return res.output

    async def execute(self, command: str) -> str:
        return (await self.h.exec(ExecRequest(command=command))).stdout

    async def close_session(self, session: str) -> None:
        await self.h.close_session(session)

    async def aclose(self) -> None:
        await self.h.close()


class HttpTarget(Target):
    """Any server speaking the SWE-ReX protocol; identical requests for all of them."""

    def __init__(self, name: str, url: str, proc: asyncio.subprocess.Process | None) -> None:
        self.name = name
        self.url = url
        self.proc = proc
        # ROCK requires sandbox_id in every body; SWE-ReX and ours ignore unknown fields.
        self.extra = {"sandbox_id": "bench"}
        self.client = httpx.AsyncClient(
            base_url=url,
            headers={"X-API-Key": TOKEN},
            timeout=REQUEST_TIMEOUT,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
        )

    async def _post(self, path: str, body: Mapping[str, object]) -> dict[str, object]:
        r = await self.client.post(path, json={**body, **self.extra})
        if r.status_code != 200:
            raise RuntimeError(f"{self.name} {path}: HTTP {r.status_code}: {r.text[:300]}")
        data: dict[str, object] = r.json()
        return data

    async def create_session(self, session: str) -> None:
        await self._post("/create_session", {"session": session, "session_type": "bash"})

    async def run(self, session: str, command: str) -> str:
        body = {"session": session, "command": command, "action_type": "bash", "check": "silent"}
        return str((await self._post("/run_in_session", body))["output"])

    async def execute(self, command: str) -> str:
        return str((await self._post("/execute", {"command": command, "shell": True}))["stdout"])

    async def close_session(self, session: str) -> None:
        await self._post("/close_session", {"session": session, "session_type": "bash"})

    async def aclose(self) -> None:
        await self.client.aclose()
        await stop_process(self.proc)


# ---------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def stop_process(proc: asyncio.subprocess.Process | None) -> None:
    """SIGTERM the process group we started, then SIGKILL after 10 s."""
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def wait_alive(url: str, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    async with httpx.AsyncClient(headers={"X-API-Key": TOKEN}, timeout=2) as c:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"exited with status {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await c.get(f"{url}/is_alive")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"not alive after {STARTUP_TIMEOUT:.0f} s")


async def start_server(name: str, argv: list[str], port: int, log: Path) -> HttpTarget:
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            cwd=tempfile.gettempdir(),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_alive(url, proc)
    except BaseException:
        await stop_process(proc)
        raise
    return HttpTarget(name, url, proc)


# ---------------------------------------------------------------------------- measuring


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


Stats = tuple[float, float]  # p50, p99 in ms


async def timed(n: int, fn: Callable[[], Awaitable[object]], warmup: int = 3) -> Stats:
    for _ in range(warmup):
        await fn()
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        xs.append((time.perf_counter() - t) * 1000)
    return pct(xs, 50), pct(xs, 99)


async def measure(t: Target, n: int, n_create: int, rounds: int) -> dict[str, Stats]:
    out: dict[str, Stats] = {}
    await t.create_session("echo")
    assert (await t.run("echo", "echo hi")).strip() == "hi", "echo gave the wrong output"
    out["in-session echo hi"] = await timed(n, lambda: t.run("echo", "echo hi"))

    counter = iter(range(1_000_000))
    created: list[str] = []

    async def create() -> None:
        name = f"c{next(counter)}"
        await t.create_session(name)
        created.append(name)

    out["create_session"] = await timed(n_create, create, warmup=1)
    for name in created:
        await t.close_session(name)

    assert (await t.execute("echo hi")).strip() == "hi"
    out["one-shot exec echo hi"] = await timed(n, lambda: t.execute("echo hi"))

    names = [f"p{i}" for i in range(8)]
    for name in names:
        await t.create_session(name)

    async def parallel() -> None:
        await asyncio.gather(*(t.run(name, "sleep 0.2") for name in names))

    out["8 sessions x sleep 0.2 (wall)"] = await timed(rounds, parallel, warmup=1)
    for name in names:
        await t.close_session(name)
    await t.close_session("echo")
    return out


async def bench_bwrap(n: int) -> dict[str, Stats] | str:
    try:
        from rock_serve.config import BwrapRuntimeConfig
        from rock_serve.protocol import SandboxSpec
    except ImportError as exc:
        return f"bwrap runtime not available ({exc})"
    if shutil.which("bwrap") is None:
        return "bwrap not installed"
    state = tempfile.mkdtemp(prefix="rock-bench-bwrap-")
    try:
        rt = BwrapRuntimeConfig(state_dir=state).build()
    except Exception as exc:
        shutil.rmtree(state, ignore_errors=True)
        return f"bwrap runtime unusable: {type(exc).__name__}: {exc}"
    first: list[float] = []
    removes: list[float] = []
    try:
        for i in range(n + 1):
            sid = f"bench-{uuid.uuid4().hex[:8]}"
            t = time.perf_counter()
            await rt.create(sid, SandboxSpec())
            try:
                handle = await rt.start(sid)
                res = await handle.exec(ExecRequest(command="echo hi"))
                assert res.stdout == "hi\n", res
                t1 = time.perf_counter()
            finally:
                t2 = time.perf_counter()
                await rt.remove(sid)
                t3 = time.perf_counter()
            if i:  # the first one warms caches
                first.append((t1 - t) * 1000)
                removes.append((t3 - t2) * 1000)
    except Exception as exc:
        return f"bwrap run failed: {type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            await rt.close()
        shutil.rmtree(state, ignore_errors=True)
    return {
        "bwrap create -> first command": (pct(first, 50), pct(first, 99)),
        "bwrap remove": (pct(removes, 50), pct(removes, 99)),
    }


# ---------------------------------------------------------------------------- report


def fmt(s: Stats | None) -> str:
    if s is None:
        return "-"
    return f"{s[0]:.2f} / {s[1]:.2f}" if s[0] < 100 else f"{s[0]:.0f} / {s[1]:.0f}"


def ratio(peer: Stats | None, ours: Stats | None) -> str:
    if peer is None or ours is None or ours[0] <= 0:
        return "-"
    return f"{peer[0] / ours[0]:.0f}x" if peer[0] / ours[0] >= 10 else f"{peer[0] / ours[0]:.1f}x"


def print_table(results: dict[str, dict[str, Stats]], names: list[str]) -> None:
    metrics: list[str] = []
    for r in results.values():
        metrics += [m for m in r if m not in metrics]
    ours = results.get("ours (HTTP)", {})
    peers = [p for p in ("ROCK", "SWE-ReX") if p in results]
    head = ["metric (p50 / p99 ms)", *names, *(f"{p}/ours" for p in peers)]
    rows = [
        [
            m,
            *(fmt(results[n].get(m)) for n in names),
            *(ratio(results[p].get(m), ours.get(m)) for p in peers),
        ]
        for m in metrics
    ]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))

    print(line(head))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=200, help="iterations for echo and exec")
    ap.add_argument("--quick", action="store_true", help="few iterations (a smoke run)")
    ap.add_argument("--no-peers", action="store_true", help="skip ROCK and SWE-ReX")
    args = ap.parse_args()
    n = min(args.n, 30) if args.quick else args.n
    n_create = 5 if args.quick else 20
    rounds = 3 if args.quick else 10
    n_bwrap = 5 if args.quick else 20
    logdir = Path(tempfile.mkdtemp(prefix="rock-bench-"))
    print(
        f"rocklet bench: n={n}, create_session x{n_create}, parallel rounds x{rounds}; "
        f"{os.cpu_count()} cpus; server logs in {logdir}"
    )

    specs: list[tuple[str, Callable[[int], list[str]] | None, str]] = [
        (
            "ours (HTTP)",
            lambda p: [
                sys.executable,
                "-m",
                "rock_serve.rocklet",
                "--host",
                "127.0.0.1",
                "--port",
                str(p),
                "--token",
                TOKEN,
            ],
            "",
        ),
    ]
    if not args.no_peers:
        rock_bin = ROCK_VENV / "bin" / "rocklet"
        swx_bin = SWEREX_VENV / "bin" / "swerex-remote"
        specs.append(
            (
                "ROCK",
                (lambda p: [str(rock_bin), "--host", "127.0.0.1", "--port", str(p)])
                if rock_bin.exists()
                else None,
                f"{rock_bin} missing",
            )
        )
        specs.append(
            (
                "SWE-ReX",
                (
                    lambda p: [
                        str(swx_bin),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(p),
                        "--auth-token",
                        TOKEN,
                    ]
                )
                if swx_bin.exists()
                else None,
                f"{swx_bin} missing",
            )
        )

    results: dict[str, dict[str, Stats]] = {}
    notes: list[str] = []

    handle = await RockletHandle.spawn([sys.executable, "-I", AGENT_PATH], name="bench")
    target: Target = HandleTarget(handle)
    try:
        results[target.name] = await measure(target, n, n_create, rounds)
    finally:
        await target.aclose()
    print(f"  measured {target.name}", flush=True)

    for name, argv, why in specs:
        if argv is None:
            notes.append(f"SKIPPED {name}: {why} (see bench/README.md to install it)")
            print(f"  {notes[-1]}", flush=True)
            continue
        port = free_port()
        try:
            http = await start_server(name, argv(port), port, logdir / f"{name.split()[0]}.log")
        except Exception as exc:
            notes.append(f"SKIPPED {name}: failed to start: {exc}")
            print(f"  {notes[-1]}", flush=True)
            continue
        try:
            results[name] = await measure(http, n, n_create, rounds)
            print(f"  measured {name}", flush=True)
        except Exception as exc:
            notes.append(f"FAILED {name}: {type(exc).__name__}: {exc}")
            print(f"  {notes[-1]}", flush=True)
        finally:
            await http.aclose()

    bw = await bench_bwrap(n_bwrap)
    if isinstance(bw, str):
        notes.append(f"SKIPPED bwrap: {bw}")
    else:
        results.setdefault("ours (handle)", {}).update(bw)

    print()
    print_table(results, list(results))
    for note in notes:
        print(note)
    ours = results.get("ours (HTTP)", {}).get("in-session echo hi")
    if ours:
        print(
            f"target: in-session echo p50 <= 3 ms through HTTP: "
            f"{'MET' if ours[0] <= 3 else 'MISSED'} ({ours[0]:.2f} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
