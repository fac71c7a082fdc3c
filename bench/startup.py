"""create -> first command on bwrap, split into phases (p50 / p99 in ms).

    .venv/bin/python bench/startup.py --phases          # phase table (cached bookworm image)
    .venv/bin/python bench/startup.py --phases -n 30 --no-disk-pool

The bwrap runtime (default config: userns, seccomp, a 4 GiB disk per sandbox) with the
bookworm test image (scripts/build-test-images) already in its store. Each sample creates a
sandbox, starts it and runs ``exec echo hi``; the runtime's steps are timed by wrapping them
(image lookup, state dir + disk, idmapped lowers, overlay, cgroup, record, start), and the
sandbox's start is split by running, in the same sandbox before its real start and with the
same wrapper, cgroup join, bwrap mounts and interpreter, first ``true`` (the floor: sh +
cgroup join + bwrap with every mount), then the interpreter alone, then the interpreter plus
the rocklet's boot code (environment, capability bounding set), then plus ``import agent``;
each row is the difference to the row before. "ready frame" is the real start (spawn ->
first reply) minus that last variant.

With ``--worker`` it adds bench/images.py's rows: create -> first command at the Worker (the
Worker class in-process on this runtime), from a cached image and from a warm pool.

With ``--compare REF`` the same run first measures the tree of git ref REF (``git archive``'d
to a temp dir, first on PYTHONPATH: e.g. ``main`` before this branch's merge, or the commit
before the disk pool and the rocklet's fast start), then this checkout, each in its own
process, so before/after come from one run on one machine state. Needs root and bwrap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if os.environ.get("ROCK_BENCH_TREE"):  # the "before" side: that tree's rock_serve
    sys.path.insert(0, os.environ["ROCK_BENCH_TREE"])

from bench._harness import pct  # noqa: E402
from rock_serve.config import BwrapRuntimeConfig, ImageStoreConfig  # noqa: E402
from rock_serve.protocol import ExecRequest, SandboxSpec  # noqa: E402
from rock_serve.rocklet import handle as handle_mod  # noqa: E402
from rock_serve.runtime import _cgroup, bwrap  # noqa: E402
from tests._registry import oci  # noqa: E402

CGROUP = "rock-serve-bench-startup"


class Clock:
    """Sums the time spent in wrapped callables per phase name, for the current sample."""

    def __init__(self) -> None:
        self.now: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.now[name] += (time.perf_counter() - t) * 1000

    def wrap(self, obj: Any, attr: str, name: str) -> None:
        orig = getattr(obj, attr)
        clock = self

        if asyncio.iscoroutinefunction(orig):

            async def awrapped(*a: Any, **k: Any) -> Any:
                with clock.phase(name):
                    return await orig(*a, **k)

            setattr(obj, attr, awrapped)
        else:

            def wrapped(*a: Any, **k: Any) -> Any:
                with clock.phase(name):
                    return orig(*a, **k)

            setattr(obj, attr, wrapped)


def _tail(argv: list[str]) -> int:
    """Index of the rocklet's command in a bwrap argv (after the last ``--``)."""
    return len(argv) - argv[::-1].index("--")


def run_variant(argv: list[str], cmd: list[str]) -> float:
    t = time.perf_counter()
    done = subprocess.run(
        [*argv[: _tail(argv)], *cmd], capture_output=True, check=False, env={"PATH": os.defpath}
    )
    if done.returncode != 0:
        raise SystemExit(f"variant {cmd[:4]} failed: {done.stderr.decode()[-2000:]}")
    return (time.perf_counter() - t) * 1000


def floors(rt: Any, sid: str) -> dict[str, float]:
    """The same start with the rocklet replaced by ``true``, then by ``python -c pass``."""
    meta = rt._meta(sid)
    spec = SandboxSpec.model_validate(meta.spec)
    argv = rt.argv(sid, spec, rt._cgroup(sid), meta.uid_base)
    env_file = os.path.join(rt._dir(sid), "env")
    rocklet = argv[_tail(argv) :]  # [python, -I, -S, -c, code, --root, /]
    python = rocklet[: rocklet.index("-c")]
    out: dict[str, float] = {}
    for name, cmd in (
        ("floor: bwrap `true` (same wrapper, cgroup join, mounts)", ["/bin/true"]),
        ("floor: same + `python3 -I -S -c pass`", [*python, "-c", "pass"]),
    ):
        bwrap._write_private(env_file, bwrap.env_bytes(rt.sandbox_env(sid, spec)))
        out[name] = run_variant(argv, cmd)
    return out


def _mark(name: str) -> str:
    """Boot code that writes ``@name <wall clock>`` to the rocklet's log (its stderr)."""
    return (
        f"import time as _T,sys as _S;_S.stderr.write('@{name} %r\\n'%_T.time());_S.stderr.flush();"
    )


def _cpu_ms(cg: Any) -> float | None:
    """CPU time used by the sandbox's processes so far (cpuacct / cpu.stat), in ms."""
    try:
        if "cpuacct" in cg.dirs:
            with open(os.path.join(cg.dirs["cpuacct"], "cpuacct.usage")) as f:
                return int(f.read()) / 1e6
        with open(os.path.join(cg.dirs[""], "cpu.stat")) as f:
            return int(dict(ln.split() for ln in f)["usage_usec"]) / 1e3
    except (OSError, KeyError, ValueError):
        return None


def _marks(path: str) -> dict[str, float]:
    out = {}
    with open(path) as f:
        for line in f:
            if line.startswith("@T"):
                name, value = line.split()
                out[name[1:]] = float(value)
    return out


async def phases(n: int, disk_pool: int) -> dict[str, list[float]]:
    """One runtime; ``n`` samples (after 3 warm-ups) of the phase split."""
    work = tempfile.mkdtemp(prefix="rock-bench-startup-", dir="/var/tmp")
    extra = {"disk_pool": disk_pool} if "disk_pool" in BwrapRuntimeConfig.model_fields else {}
    cfg = BwrapRuntimeConfig(
        state_dir=f"{work}/state",
        cgroup_parent=CGROUP,
        images=ImageStoreConfig(root=f"{work}/store", local_sources=["/var/cache/rock-serve/"]),
        **extra,
    )
    rt: Any = cfg.build()
    ref = oci("bookworm")
    await rt.images.get(ref)
    clock = Clock()
    clock.wrap(rt.images, "get", "image lookup")
    clock.wrap(rt, "_user", "image user")
    clock.wrap(rt, "_create_sync", "create (all sync steps)")
    clock.wrap(rt, "_make_disk", "disk (mkfs / pool + loop mount)")
    clock.wrap(rt, "_mount_disk", "disk: loop mount")
    clock.wrap(bwrap, "idmapped_mount", "idmapped lower mounts")
    clock.wrap(rt, "_overlay", "overlay mount")
    clock.wrap(_cgroup.Cgroup, "create", "cgroup")
    clock.wrap(bwrap, "write_meta", "record (meta.json)")
    clock.wrap(rt, "argv", "start: argv")
    clock.wrap(bwrap, "launch", "start: spawn -> first reply")
    # Timestamps from inside the sandbox (wall clock, the host's): interpreter up, boot code
    # done, agent imported; written to the rocklet's stderr (agent.log).
    bwrap._ENV_BOOT = _mark("T0") + bwrap._ENV_BOOT + _mark("T1")
    handle_mod._BOOT = handle_mod._BOOT.replace("import agent;", "import agent;" + _mark("T2"))
    spawned: list[float] = []
    orig_launch = bwrap.launch

    async def launch(*a: Any, **k: Any) -> Any:
        spawned.append(time.time())
        h = await orig_launch(*a, **k)
        spawned.append(time.time())
        return h

    bwrap.launch = launch
    table: dict[str, list[float]] = defaultdict(list)
    echo = ExecRequest(command="echo hi")
    try:
        for i in range(n + 3):
            sid = f"sb-startup-{uuid.uuid4().hex[:12]}"
            clock.now.clear()
            t0 = time.perf_counter()
            await rt.create(sid, SandboxSpec(image=ref))
            t_created = time.perf_counter()
            h = await rt.start(sid)
            t_started = time.perf_counter()
            res = await h.exec(echo)
            t_done = time.perf_counter()
            assert res.stdout == "hi\n", res
            marks = _marks(os.path.join(rt._dir(sid), "agent.log"))
            cpu = _cpu_ms(rt._cgroup(sid))
            t_spawn, t_ready = spawned[-2:]
            await rt.stop(sid)
            floor = await asyncio.to_thread(floors, rt, sid)
            await rt.remove(sid)
            if i < 3:
                continue
            now = dict(clock.now)
            create_ms = (t_created - t0) * 1000
            sync = now.pop("create (all sync steps)", 0.0)
            inner = sum(
                now.get(k, 0.0)
                for k in (
                    "disk (mkfs / pool + loop mount)",
                    "idmapped lower mounts",
                    "overlay mount",
                    "cgroup",
                    "record (meta.json)",
                )
            )
            for k in ("image lookup", "image user"):
                table[k].append(now.get(k, 0.0))
            table["state dir, upper/work, root file (rest of create)"].append(sync - inner)
            disk = now.get("disk (mkfs / pool + loop mount)", 0.0)
            table["disk: file (mkfs, or take from the pool)"].append(
                disk - now.get("disk: loop mount", 0.0)
            )
            for k in (
                "disk: loop mount",
                "idmapped lower mounts",
                "overlay mount",
                "cgroup",
            ):
                table[k].append(now.get(k, 0.0))
            table["record (meta.json), in create"].append(now.get("record (meta.json)", 0.0))
            table["create: other (validation, thread hops)"].append(
                create_ms - sync - now.get("image lookup", 0.0) - now.get("image user", 0.0)
            )
            launch_ms = now.get("start: spawn -> first reply", 0.0)
            table["start: spawn -> interpreter up (sh, cgroup join, bwrap, python init)"].append(
                (marks["T0"] - t_spawn) * 1000
            )
            table["start: rocklet boot code (env fd, capability bounding set)"].append(
                (marks["T1"] - marks["T0"]) * 1000
            )
            table["start: agent imports"].append((marks["T2"] - marks["T1"]) * 1000)
            table["start: agent main -> ready frame at the host"].append(
                (t_ready - marks["T2"]) * 1000
            )
            table["start: other (argv, env file, checks)"].append(
                (t_started - t_created) * 1000 - launch_ms
            )
            table["first exec `echo hi`"].append((t_done - t_started) * 1000)
            table["TOTAL create -> first command"].append((t_done - t0) * 1000)
            for k, v in floor.items():
                table[k].append(v)
            if cpu is not None:
                table["CPU ms in the sandbox's cgroup, start -> first command"].append(cpu)
    finally:
        for info in await rt.list():
            with contextlib.suppress(Exception):
                await rt.remove(info.id)
        await rt.close()
        shutil.rmtree(work, ignore_errors=True)
    return dict(table)


async def worker_rows(n: int) -> dict[str, list[float]]:
    """create -> first command at the Worker (bench/images.py's rows), cached and warm pool."""
    from bench.images import worker_latency

    work = tempfile.mkdtemp(prefix="rock-bench-startup-w-", dir="/var/tmp")
    try:
        state, store = f"{work}/state", f"{work}/store"
        cached, _ = await worker_latency(state, store, oci("bookworm"), n, pool=False)
        pooled, _ = await worker_latency(state, store, oci("bookworm"), n, pool=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "Worker: create -> first command, cached image": cached,
        "Worker: create -> first command, warm pool": pooled,
    }


def run_side(args: list[str], pythonpath: str | None = None) -> dict[str, list[float]]:
    """One configuration in its own process (a fresh interpreter, its own runtime)."""
    import json

    env = dict(os.environ)
    if pythonpath:
        env["ROCK_BENCH_TREE"] = pythonpath
    cmd = [sys.executable, __file__, "--side", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"side {args} failed:\n{done.stderr[-3000:]}")
    result: dict[str, list[float]] = json.loads(done.stdout.splitlines()[-1])
    return result


def fmt(xs: list[float]) -> str:
    return f"{pct(xs, 50):.1f} / {pct(xs, 99):.1f}"


def main() -> int:
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", action="store_true", help="print the phase table")
    parser.add_argument("--compare", metavar="REF", help="a 'before' column: git ref's tree")
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--disk-pool", type=int, default=None)
    parser.add_argument("--worker", action="store_true", help="Worker-level rows too")
    parser.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    pool = 4 if opts.disk_pool is None else opts.disk_pool
    if opts.side:
        out = asyncio.run(phases(opts.n, pool))
        if opts.worker:
            out.update(asyncio.run(worker_rows(opts.n)))
        print(json.dumps(out))
        return 0
    side = ["-n", str(opts.n), "--disk-pool", str(pool), *(["--worker"] if opts.worker else [])]
    cols: list[tuple[str, dict[str, list[float]]]] = []
    if opts.compare:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with tempfile.TemporaryDirectory(prefix="rock-before-") as before:
            archive = subprocess.run(
                ["git", "-C", repo, "archive", opts.compare, "rock_serve"],
                capture_output=True,
                check=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", before], input=archive, check=True)
            cols.append((f"before ({opts.compare})", run_side(side, before)))
    cols.append((f"now (disk pool {pool})", run_side(side)))
    print(f"bwrap, bookworm image (cached), default spec, n={opts.n}, p50 / p99 ms")
    print("| phase | " + " | ".join(c for c, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name in cols[-1][1]:
        print(f"| {name} | " + " | ".join(fmt(t[name]) for _, t in cols) + " |")
    if len(cols) == 2:
        b, a = (
            cols[0][1]["TOTAL create -> first command"],
            cols[1][1]["TOTAL create -> first command"],
        )
        print(f"| after / before (p50) | {pct(a, 50) / pct(b, 50):.2f}x | |")
    floor = cols[-1][1]["floor: bwrap `true` (same wrapper, cgroup join, mounts)"]
    total = cols[-1][1]["TOTAL create -> first command"]
    print(f"| now / floor `bwrap true` (p50) | {pct(total, 50) / pct(floor, 50):.2f}x | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
