"""Benchmark: snapshot and restore through the platform's Scheduler and Workers (issue 16).

Usage: ``.venv/bin/python bench/snapshot_api.py [--mb 100] [--rounds 3] [--quick]``

A real Scheduler with two real Workers on the bwrap runtime (two simulated nodes with their own
state dirs; no Ray, no HTTP: those add one actor call each) and S3 (moto on loopback). In the
same run:

- *snapshot*: ``Scheduler.snapshot`` of a sandbox on node A with a ``--mb`` MB delta (freeze,
  copy, tar.zst, S3 put, record in the state store, retention).
- *restore*: ``Scheduler.create(snapshot=id)`` placed on node B, whose store lacks the archive
  (S3 get, digest check, unpack, overlay, start), until the sandbox answers a command.
- *floor*: a plain S3 put + get of an archive of the same size, plus a fresh create on node B:
  the ratios say what snapshot/restore add over moving the bytes and starting a sandbox.

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

from rock_serve.config import BwrapRuntimeConfig, ServerArgs, SnapshotConfig, SnapshotS3Config
from rock_serve.deployments._snapshot import snapshot_dir
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.deployments.worker import Worker
from rock_serve.protocol import CreateSandboxRequest, ExecRequest
from rock_serve.protocol.ops import ExecOp
from rock_serve.protocol.snapshot import SnapshotRequest


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


class _Directory:
    def __init__(self, workers: list[Worker]) -> None:
        self.workers = {w.node_id: w for w in workers}

    async def alive_nodes(self) -> list[str]:
        return list(self.workers)

    async def ensure(self, node_id: str) -> Worker:
        return self.workers[node_id]

    async def dead_jobs(self, job_ids: set[str]) -> set[str]:
        return set()


async def sh(worker: Worker, sid: str, command: str) -> None:
    result = await worker.op(sid, ExecOp.of(ExecRequest(command=command, timeout=300)))
    assert result.exit_code == 0, result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    if opts.quick:
        opts.mb, opts.rounds = 10, 2
    import boto3
    from moto.server import ThreadedMotoServer

    for key, value in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "x")):
        os.environ.setdefault(key, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    s3.create_bucket(Bucket="snap")
    snapshots = SnapshotConfig(s3=SnapshotS3Config(bucket="snap", endpoint_url=url))
    dirs, workers = [], []
    for name in ("bencha", "benchb"):
        state = tempfile.mkdtemp(prefix=f"rock-bench-{name}-", dir="/var/tmp")
        dirs.append(state)
        runtime = BwrapRuntimeConfig(state_dir=state, cgroup_parent="rock-serve-bench")
        worker = Worker(ServerArgs(runtime=runtime, snapshots=snapshots), name, f"node-{name}")
        await worker.ready()
        workers.append(worker)
    a, b = workers
    scheduler = Scheduler(a.args, directory=_Directory(workers))  # type: ignore[arg-type]
    try:
        src = await scheduler.create(CreateSandboxRequest())
        node_a = a if src.worker == a.name else b
        node_b = b if node_a is a else a
        await sh(node_a, src.id, f"head -c {opts.mb}M /dev/urandom > /root/delta && sync")
        snaps, restores, floors_io, floors_create, sizes = [], [], [], [], []
        for i in range(opts.rounds):
            await sh(node_a, src.id, f"echo {i} >> /root/round")  # a new digest each round
            t0 = time.perf_counter()
            snap = await scheduler.snapshot(src.id, SnapshotRequest())
            t1 = time.perf_counter()
            restored = await scheduler.create(CreateSandboxRequest(snapshot=snap.id))
            assert restored.worker == node_b.name, restored.worker
            await sh(node_b, restored.id, "test -s /root/delta")
            t2 = time.perf_counter()
            snaps.append((t1 - t0) * 1000)
            restores.append((t2 - t1) * 1000)
            sizes.append(snap.size)
            # floor: the same bytes through S3, and a fresh create on node B
            archive = os.path.join(snapshot_dir(dirs[workers.index(node_a)]), snap.archive)
            t3 = time.perf_counter()
            await asyncio.to_thread(s3.upload_file, archive, "snap", f"floor/{i}")
            await asyncio.to_thread(s3.download_file, "snap", f"floor/{i}", archive + ".floor")
            t4 = time.perf_counter()
            os.unlink(archive + ".floor")
            await scheduler.delete(restored.id)
            fresh = await scheduler.create(CreateSandboxRequest())
            await sh(node_b if fresh.worker == node_b.name else node_a, fresh.id, "true")
            t5 = time.perf_counter()
            floors_io.append((t4 - t3) * 1000)
            floors_create.append((t5 - t4) * 1000)
            await scheduler.delete(fresh.id)
            await scheduler.delete_snapshot(snap.id)
        mb = opts.mb
        print(f"bwrap, 2 simulated nodes, moto S3, {mb} MB delta, {opts.rounds} rounds")
        print("| metric | p50 ms | p99 ms |")
        print("|---|---|---|")
        rows = [
            ("Scheduler.snapshot (freeze, copy, tar.zst, S3 put, record)", snaps),
            ("create(snapshot) on node B -> answering (S3 get, verify, unpack, start)", restores),
            ("floor: S3 put + get of the same archive", floors_io),
            ("floor: fresh create -> answering", floors_create),
        ]
        for label, xs in rows:
            print(f"| {label} | {pct(xs, 50):.0f} | {pct(xs, 99):.0f} |")
        floor = pct(floors_io, 50) + pct(floors_create, 50)
        print(
            f"ratios (p50): snapshot / S3 transfer {pct(snaps, 50) / pct(floors_io, 50):.2f}x, "
            f"restore / (transfer + fresh create) {pct(restores, 50) / floor:.2f}x"
        )
        print(f"archive size: {pct(sizes, 50) / 2**20:.1f} MiB (random data: incompressible)")
    finally:
        await scheduler.close()
        for worker in workers:
            await worker.shutdown()
        for state in dirs:
            shutil.rmtree(state, ignore_errors=True)
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
