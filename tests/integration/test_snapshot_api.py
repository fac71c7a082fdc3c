"""Snapshots (issue 16 item 2) through a real Scheduler and two real Workers (two simulated
nodes on the bwrap runtime, each with its own state dir) and real S3 (moto on loopback).

No Ray: the Scheduler's directory hands it the two Workers (the seam test_fork.py uses), so
placement, namespaces, retention and the state store are the platform's own code. The archive
moves from node A to node B only through S3 (B's node store starts empty). The routes over
HTTP are in tests/e2e/test_snapshot_http.py.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator

import pytest

from rock_serve.config import ServerArgs, SnapshotConfig, SnapshotS3Config
from rock_serve.deployments._snapshot import snapshot_dir
from rock_serve.deployments._store import MemoryStore
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.deployments.worker import Worker
from rock_serve.errors import ArtifactCorrupt, NotFound, SandboxNotFound, http_status
from rock_serve.protocol import CreateSandboxRequest
from rock_serve.protocol.ops import ExecOp
from rock_serve.protocol.snapshot import SnapshotRequest
from rock_serve.runtime._fork import FROZEN_DIR
from tests._s3 import use_test_credentials
from tests.contract.conftest import RUNTIMES, make_config

pytestmark = [pytest.mark.s3, pytest.mark.bwrap, *RUNTIMES[1].marks]

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")


class _Directory:
    """Two nodes, each a real Worker on the bwrap runtime with its own state dir."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = {w.node_id: w for w in workers}

    async def alive_nodes(self) -> list[str]:
        return list(self.workers)

    async def ensure(self, node_id: str) -> Worker:
        return self.workers[node_id]

    async def dead_jobs(self, job_ids: set[str]) -> set[str]:
        return set()


class _Cluster:
    def __init__(self, scheduler: Scheduler, a: Worker, b: Worker, dirs: dict[str, str]) -> None:
        self.scheduler, self.a, self.b, self.dirs = scheduler, a, b, dirs

    def worker(self, name: str) -> Worker:
        return self.a if name == self.a.name else self.b

    async def sh(self, worker_name: str, sandbox_id: str, command: str) -> str:
        result = await self.worker(worker_name).op(sandbox_id, ExecOp(command=command, timeout=60))
        assert result.exit_code == 0, (command, result)
        return result.stdout


@pytest.fixture
async def cluster(tmp_path, s3_endpoint, monkeypatch) -> AsyncIterator[_Cluster]:
    use_test_credentials(monkeypatch)
    bucket = f"snap-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    snapshots = SnapshotConfig(
        s3=SnapshotS3Config(bucket=bucket, endpoint_url=s3_endpoint, region="us-east-1"),
        max_per_namespace=2,
    )
    workers, dirs = [], {}
    for name in ("snapa", "snapb"):
        state_dir = str(tmp_path / name)
        args = ServerArgs(runtime=make_config("bwrap", state_dir), snapshots=snapshots)  # type: ignore[arg-type]
        worker = Worker(args, name, f"node-{name}")
        await worker.ready()
        workers.append(worker)
        dirs[name] = os.path.realpath(state_dir)
    scheduler = Scheduler(workers[0].args, directory=_Directory(workers))  # type: ignore[arg-type]
    try:
        yield _Cluster(scheduler, workers[0], workers[1], dirs)
    finally:
        await scheduler.close()
        for worker in workers:
            with contextlib.suppress(Exception):
                await worker.shutdown()


async def _source(c: _Cluster, namespace: str = "default") -> str:
    """A sandbox on node A with some state written (placement: A is the first, both empty)."""
    record = await c.scheduler.create(
        CreateSandboxRequest(env={"SECRET": "hunter2"}, labels={"task": "t"}), namespace
    )
    await c.sh(
        record.worker or "",
        record.id,
        "mkdir -p /work && head -c 2000000 /dev/urandom > /work/blob && rm -f /etc/motd",
    )
    return record.id


async def test_snapshot_on_a_restores_on_b_through_s3(cluster: _Cluster) -> None:
    c = cluster
    src = await _source(c)
    src_worker = c.scheduler._records[src].worker or ""
    want = await c.sh(src_worker, src, "md5sum < /work/blob")
    snap = await c.scheduler.snapshot(src, SnapshotRequest())
    assert snap.id.startswith("snap-") and snap.namespace == "default" and snap.in_s3
    assert snap.size > 0 and snap.archive.startswith(snap.digest)
    assert "SECRET" in snap.env_keys and "hunter2" not in snap.model_dump_json()
    assert snap.labels == {"task": "t"} and snap.node == src_worker
    assert snap.image_digest, snap  # the image the files sit over, by id
    assert [s.id for s in await c.scheduler.snapshots("default")] == [snap.id]
    assert await c.scheduler.get_snapshot(snap.id) == snap

    # The other node's store does not have it: the create there fetches it from S3.
    other = c.b if src_worker == c.a.name else c.a
    assert not os.path.exists(os.path.join(snapshot_dir(c.dirs[other.name]), snap.archive))
    restored = await c.scheduler.create(CreateSandboxRequest(snapshot=snap.id))
    assert restored.worker == other.name  # least loaded: the node without the source
    out = await c.sh(other.name, restored.id, "md5sum < /work/blob; ls /etc/motd 2>&1 || :")
    assert out.splitlines()[0] == want.strip()
    assert "No such file" in out  # the deletion (a whiteout) came along
    await c.sh(other.name, restored.id, "echo b > /work/b")
    assert await c.sh(src_worker, src, "ls /work") == "blob\n"

    # The records live in the state store: a new Scheduler over it sees them.
    store = c.scheduler._store
    again = Scheduler(c.a.args, directory=c.scheduler._directory, store=store)  # type: ignore[attr-defined]
    assert [s.id for s in await again.snapshots("default")] == [snap.id]
    assert isinstance(store, MemoryStore)


async def test_corrupt_archive_in_s3_is_typed_and_leaves_nothing(cluster: _Cluster) -> None:
    c = cluster
    src = await _source(c)
    snap = await c.scheduler.snapshot(src, SnapshotRequest())
    s3 = c.a._s3()
    s3._s3.put_object(Bucket=s3.config.bucket, Key=s3.key(snap.digest), Body=b"not it")
    src_worker = c.scheduler._records[src].worker
    other = c.b if src_worker == c.a.name else c.a
    before = {r.id for r in await other.list()}
    with pytest.raises(ArtifactCorrupt) as bad:
        await c.scheduler.create(CreateSandboxRequest(snapshot=snap.id))
    assert http_status(bad.value.code) == 502 and bad.value.code.value == "artifact_corrupt"
    assert {r.id for r in await other.list()} == before
    state = c.dirs[other.name]
    assert os.listdir(snapshot_dir(state)) == []  # no archive, no half-downloaded temp file
    frozen = os.path.join(state, FROZEN_DIR)
    assert not os.path.isdir(frozen) or os.listdir(frozen) == []
    assert not [r for r in c.scheduler._records.values() if r.worker == other.name]


async def test_namespaces_and_retention(cluster: _Cluster) -> None:
    c = cluster
    src = await _source(c, namespace="team-a")
    first = await c.scheduler.snapshot(src, SnapshotRequest(), "team-a")
    for call in (
        c.scheduler.get_snapshot(first.id, "team-b"),
        c.scheduler.delete_snapshot(first.id, "team-b"),
        c.scheduler.create(CreateSandboxRequest(snapshot=first.id), "team-b"),
    ):
        with pytest.raises(NotFound) as gone:
            await call
        assert http_status(gone.value.code) == 404
    assert await c.scheduler.snapshots("team-b") == []

    # max_per_namespace=2: the third snapshot deletes the oldest (record, archive, S3 object).
    await c.sh(c.scheduler._records[src].worker or "", src, "echo 2 > /work/two")
    second = await c.scheduler.snapshot(src, SnapshotRequest(labels={"n": "2"}), "team-a")
    await c.sh(c.scheduler._records[src].worker or "", src, "echo 3 > /work/three")
    third = await c.scheduler.snapshot(src, SnapshotRequest(), "team-a")
    assert [s.id for s in await c.scheduler.snapshots("team-a")] == [third.id, second.id]
    assert second.labels == {"n": "2"}
    s3 = c.a._s3()
    assert not s3.exists(first.digest) and s3.exists(third.digest)
    node = c.dirs[first.node]
    assert not os.path.exists(os.path.join(snapshot_dir(node), first.archive))
    with pytest.raises(NotFound):
        await c.scheduler.get_snapshot(first.id, "team-a")

    await c.scheduler.delete_snapshot(third.id, "team-a")
    assert [s.id for s in await c.scheduler.snapshots("team-a")] == [second.id]
    assert not s3.exists(third.digest)

    # max_age_seconds: a snapshot made later deletes those older than that (made an hour ago
    # here by rewriting its record's created_at in the state store).
    snapshots = c.scheduler.args.snapshots.model_copy(update={"max_age_seconds": 600})
    c.scheduler.args = c.scheduler.args.model_copy(update={"snapshots": snapshots})
    old = second.model_copy(update={"created_at": second.created_at - 3600})
    await c.scheduler._store.doc_put("snapshots", old.id, old.model_dump_json())
    await c.sh(c.scheduler._records[src].worker or "", src, "echo 4 > /work/four")
    fourth = await c.scheduler.snapshot(src, SnapshotRequest(), "team-a")
    assert [s.id for s in await c.scheduler.snapshots("team-a")] == [fourth.id]
    assert not s3.exists(second.digest)


async def test_archive_on_lease_expiry_then_resume_with_the_same_id(cluster: _Cluster) -> None:
    c = cluster
    rec = await c.scheduler.create(CreateSandboxRequest(archive_on_expiry=True, lease_seconds=600))
    assert rec.archive_on_expiry
    worker = c.worker(rec.worker or "")
    await c.sh(worker.name, rec.id, "echo kept > /root/kept")
    worker._boxes[rec.id].record.lease_expires_at = worker._clock() - 1  # the lease ran out
    await worker.reap()
    assert rec.id not in worker._boxes
    await c.scheduler.sync()
    assert rec.id not in c.scheduler._records
    archived = [s for s in await c.scheduler.snapshots() if s.archived]
    assert [s.sandbox_id for s in archived] == [rec.id] and archived[0].in_s3
    with pytest.raises(SandboxNotFound):  # another namespace cannot resume it
        await c.scheduler.resume(rec.id, "team-b")

    back = await c.scheduler.resume(rec.id)
    assert back.id == rec.id and back.worker == rec.worker and back.state.value == "running"
    assert await c.sh(worker.name, rec.id, "cat /root/kept") == "kept\n"
    assert [s for s in await c.scheduler.snapshots() if s.archived] == []
    assert not c.a._s3().exists(archived[0].digest)  # the archive went with its record
    with pytest.raises(SandboxNotFound):
        await c.scheduler.resume("sb-snapa-0000000000000000")
