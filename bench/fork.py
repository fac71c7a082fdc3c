"""Benchmark: fork of a prepared bwrap sandbox vs fresh creates that replay the setup (issue 16).

Usage: ``.venv/bin/python bench/fork.py [--children 16] [--mb 200] [--rounds 3] [--quick]``

On the bwrap runtime (no Ray: the runtime is what does the work; the Worker adds a table
insert per child), in the same run:

- *fork*: a parent that wrote ``--mb`` MB (its setup) is forked into ``--children`` children;
  wall time until every child answered a command (``cat`` of a file the setup wrote), split
  into the fork itself (freeze, one copy of the parent's layer, thaw, children's overlays) and
  the children's start (bwrap + rocklet until it answers).
- *replay*: ``--children`` fresh sandboxes created at once, each replaying the setup (writing
  ``--mb`` MB), until every one answered the same command.
- *floor*: ``--children`` fresh sandboxes created at once with no setup (what starting that
  many rocklets costs here): the ratio fork / floor says what the fork adds.
- *disk*: bytes on disk of the children before they write (their own dirs, not counting mounts:
  each holds a sparse ext4 file of its own), and of the one frozen copy they share.

- *snapshot*: a ``--snap-mb`` MB delta snapshotted to S3 (moto on loopback: freeze, copy,
  tar.zst, put) and restored on a second runtime with its own state dir (get, digest check,
  unpack, create, start, answer).

Prints p50 / p99 over ``--rounds`` in ms. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from rock_serve.config import BwrapRuntimeConfig
from rock_serve.protocol import ExecRequest, SandboxSpec
from rock_serve.runtime.bwrap import BwrapRuntime, mounts_under


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def _id() -> str:
    return f"bf-{uuid.uuid4().hex[:12]}"


def allocated(path: str) -> int:
    """Bytes on disk under ``path``, not crossing mounts (sparse files count what they hold)."""
    skip = set(mounts_under(path))
    total = 0
    for parent, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if os.path.join(parent, d) not in skip]
        for name in files:
            total += os.lstat(os.path.join(parent, name)).st_blocks * 512
    return total


async def answer(rt: BwrapRuntime, sid: str, command: str) -> None:
    handle = await rt.start(sid)
    _HANDLES[sid] = handle
    result = await handle.exec(ExecRequest(command=command, timeout=300))
    assert result.exit_code == 0, result


async def round_fork(rt: BwrapRuntime, parent: str, n: int) -> tuple[float, float, int, int]:
    kids = [_id() for _ in range(n)]
    t0 = time.perf_counter()
    await rt.fork(parent, kids, lambda _cid, spec: spec)
    t1 = time.perf_counter()
    await asyncio.gather(*(answer(rt, k, "cat /root/marker") for k in kids))
    t2 = time.perf_counter()
    disk = sum(allocated(os.path.join(rt.state_dir, k)) for k in kids)
    frozen_dir = os.path.join(rt.state_dir, ".frozen")
    frozen = sum(allocated(os.path.join(frozen_dir, d)) for d in os.listdir(frozen_dir))
    await asyncio.gather(*(rt.remove(k) for k in kids))
    return t1 - t0, t2 - t0, disk, frozen


async def round_fresh(rt: BwrapRuntime, n: int, setup: str) -> float:
    kids = [_id() for _ in range(n)]
    t0 = time.perf_counter()

    async def one(sid: str) -> None:
        await rt.create(sid, SandboxSpec())
        await answer(rt, sid, f"{setup}cat /root/marker")

    await asyncio.gather(*(one(k) for k in kids))
    elapsed = time.perf_counter() - t0
    await asyncio.gather(*(rt.remove(k) for k in kids))
    return elapsed


async def bench_snapshot(rt: BwrapRuntime, opts: argparse.Namespace) -> None:
    """Snapshot of a --snap-mb delta to S3 (moto on loopback) and restore on a second
    runtime (another state dir: a simulated node), p50/p99 over --rounds."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer

        from rock_serve.envs.hub import S3ArtifactStore, S3StoreConfig
    except ImportError as exc:
        print(f"snapshot/restore via S3: skipped ({exc})")
        return
    for key, value in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "x")):
        os.environ.setdefault(key, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    other_state = tempfile.mkdtemp(prefix="rock-bench-fork-b-", dir="/var/tmp")
    other = BwrapRuntimeConfig(state_dir=other_state, cgroup_parent="rock-serve-bench").build()
    assert isinstance(other, BwrapRuntime)
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="snap")
        store = S3ArtifactStore(
            S3StoreConfig(bucket="snap", endpoint_url=url, region="us-east-1", prefix="bench")
        )
        src = _id()
        await rt.create(src, SandboxSpec())
        await answer(rt, src, f"head -c {opts.snap_mb}M /dev/urandom > /root/delta && sync")
        snaps, restores, sizes = [], [], []
        for i in range(opts.rounds):
            await answer_again(rt, src, f"echo {i} >> /root/round")  # a new digest each round
            t0 = time.perf_counter()
            path, sha, size = await rt.snapshot(src, os.path.join(rt.state_dir, ".snap"))
            await asyncio.to_thread(store.put_file, Path(path), sha)
            t1 = time.perf_counter()
            dest = Path(other_state) / f"fetched-{sha}"
            await asyncio.to_thread(store.fetch, sha, dest)
            sid = _id()
            await other.restore(sid, SandboxSpec(), str(dest), sha)
            await answer(other, sid, "test -s /root/delta")
            t2 = time.perf_counter()
            snaps.append((t1 - t0) * 1000)
            restores.append((t2 - t1) * 1000)
            sizes.append(size)
            await other.remove(sid)
            os.unlink(path)
            dest.unlink()
        await rt.remove(src)
        mb = opts.snap_mb
        print(
            f"| snapshot {mb} MB delta -> S3 (freeze, copy, tar.zst, put) | "
            f"{pct(snaps, 50):.0f} | {pct(snaps, 99):.0f} |"
        )
        print(
            f"| restore on node B (get, verify, unpack, create, answer) | "
            f"{pct(restores, 50):.0f} | {pct(restores, 99):.0f} |"
        )
        print(f"archive size: {pct(sizes, 50) / 2**20:.1f} MiB (random data: incompressible)")
    finally:
        for info in await other.list():
            await other.remove(info.id)
        await other.close()
        shutil.rmtree(other_state, ignore_errors=True)
        server.stop()


_HANDLES: dict[str, object] = {}


async def answer_again(rt: BwrapRuntime, sid: str, command: str) -> None:
    """Run a command in a sandbox started by :func:`answer` earlier."""
    handle = _HANDLES[sid]
    result = await handle.exec(ExecRequest(command=command, timeout=300))  # type: ignore[attr-defined]
    assert result.exit_code == 0, result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=16)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--snap-mb", type=int, default=100)
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    if opts.quick:
        opts.children, opts.mb, opts.rounds, opts.snap_mb = 4, 20, 1, 10
    state = tempfile.mkdtemp(prefix="rock-bench-fork-", dir="/var/tmp")
    rt = BwrapRuntimeConfig(state_dir=state, cgroup_parent="rock-serve-bench").build()
    assert isinstance(rt, BwrapRuntime)
    setup = f"head -c {opts.mb}M /dev/urandom > /root/data && echo ready > /root/marker && "
    parent = _id()
    try:
        await rt.create(parent, SandboxSpec())
        await answer(rt, parent, f"{setup}sync")
        forks, totals, disks, frozens, replays, floors = [], [], [], [], [], []
        for _ in range(opts.rounds):
            fork_s, total_s, disk, frozen = await round_fork(rt, parent, opts.children)
            forks.append(fork_s * 1000)
            totals.append(total_s * 1000)
            disks.append(disk)
            frozens.append(frozen)
            floors.append(await round_fresh(rt, opts.children, "echo > /root/marker && ") * 1000)
            replays.append(await round_fresh(rt, opts.children, setup) * 1000)
        n, mb = opts.children, opts.mb
        print(f"bwrap, {n} children of a parent with {mb} MB written, {opts.rounds} rounds")
        print("| metric | p50 ms | p99 ms |")
        print("|---|---|---|")
        print(
            f"| fork {n}: freeze + copy + overlays | {pct(forks, 50):.0f} | {pct(forks, 99):.0f} |"
        )
        print(
            f"| fork {n} -> all answering a command | {pct(totals, 50):.0f} | "
            f"{pct(totals, 99):.0f} |"
        )
        print(
            f"| {n} fresh creates, no setup (floor) | {pct(floors, 50):.0f} | "
            f"{pct(floors, 99):.0f} |"
        )
        print(
            f"| {n} fresh creates + replayed setup ({mb} MB each) | {pct(replays, 50):.0f} | "
            f"{pct(replays, 99):.0f} |"
        )
        print(
            f"ratios (p50): replay/fork {pct(replays, 50) / pct(totals, 50):.1f}x, "
            f"fork/floor {pct(totals, 50) / pct(floors, 50):.2f}x"
        )
        print(
            f"disk of {n} children before they write: {pct(disks, 50) / 2**20:.1f} MiB in all "
            f"({pct(disks, 50) / n / 2**20:.2f} MiB each, their empty ext4 files); the shared "
            f"frozen copy: {pct(frozens, 50) / 2**20:.0f} MiB (once, not per child)"
        )
        await bench_snapshot(rt, opts)
    finally:
        for info in await rt.list():
            await rt.remove(info.id)
        await rt.close()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
