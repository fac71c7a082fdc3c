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

Prints p50 / p99 over ``--rounds`` in ms. Snapshot/restore through S3 is not implemented yet
(issue 16 item 2); it prints a line saying so. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import uuid

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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=16)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    if opts.quick:
        opts.children, opts.mb, opts.rounds = 4, 20, 1
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
        print("snapshot/restore via S3: not implemented (issue 16 item 2)")
    finally:
        for info in await rt.list():
            await rt.remove(info.id)
        await rt.close()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
