"""The Worker on the fake runtime with an injected clock: leases, TTLs, adoption, reconfigure."""

from __future__ import annotations

import asyncio

import pytest

from rock_serve.config import ServerArgs
from rock_serve.deployments.worker import LABEL_RECORD, Worker
from rock_serve.errors import SandboxNotFound
from rock_serve.protocol import (
    CreateSandboxRequest,
    ExecRequest,
    SandboxRecord,
    SandboxState,
    SessionCreateRequest,
    SessionRunRequest,
)
from rock_serve.protocol.ops import ExecOp, FileReadOp, FileWriteOp, SessionCreateOp, SessionRunOp
from rock_serve.runtime.fake import FakeRuntime


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _args(**extra) -> ServerArgs:
    return ServerArgs.model_validate({"runtime": {"type": "fake"}, **extra})


@pytest.fixture
async def made():
    workers: list[Worker] = []
    yield workers
    for worker in workers:
        await worker.shutdown()


async def _worker(made, runtime: FakeRuntime, clock: Clock, **extra) -> Worker:
    worker = Worker(_args(**extra), "w1", "node-1", clock, runtime=runtime)
    await worker.ready()
    made.append(worker)
    return worker


async def test_a_lease_is_renewed_by_calls_and_reaped_when_it_runs_out(made):
    clock, runtime = Clock(), FakeRuntime()
    worker = await _worker(made, runtime, clock)
    req = CreateSandboxRequest(lease_seconds=10, owner="trainer")
    record = await worker.create("sb-w1-aaaaaaaa", req, ttl=3600)
    assert record.lease_expires_at == 1010.0
    assert [h.state for h in record.history] == ["pending", "starting", "running"]
    clock.now += 8
    await worker.op(record.id, ExecOp.of(ExecRequest(command="echo hi")))  # renews
    clock.now += 8
    assert await worker.reap() == []
    assert (await worker.renew(record.id)).lease_expires_at == clock.now + 10
    clock.now += 11
    assert await worker.reap() == [record.id]
    assert await runtime.list() == []
    with pytest.raises(SandboxNotFound) as gone:
        await worker.op(record.id, ExecOp.of(ExecRequest(command="echo hi")))
    assert gone.value.details["reason"] == "lease_expired"
    assert "lease_expired" in str(gone.value)


async def test_the_ttl_is_a_hard_deadline_whatever_the_lease(made):
    clock, runtime = Clock(), FakeRuntime()
    worker = await _worker(made, runtime, clock, default_lease_seconds=None)
    record = await worker.create("sb-w1-bbbbbbbb", CreateSandboxRequest(), ttl=5)
    assert record.lease_expires_at is None
    clock.now += 4
    assert await worker.reap() == []
    clock.now += 2
    assert await worker.reap() == [record.id]
    with pytest.raises(SandboxNotFound, match="ttl_expired"):
        await worker.get(record.id)


async def test_a_restarted_worker_adopts_running_sandboxes_with_their_files(made):
    clock, runtime = Clock(), FakeRuntime()
    first = await _worker(made, runtime, clock)
    req = CreateSandboxRequest(owner="o", labels={"k": "v"}, trajectory_id="traj-1")
    record = await first.create("sb-w1-cccccccc", req, ttl=3600, namespace="team")
    await first.op(record.id, FileWriteOp(path="/tmp/f", data=b"kept"))
    made.remove(first)  # it "dies": its process and handles are gone, the sandbox is not
    stored = SandboxRecord.model_validate_json((await runtime.list())[0].labels[LABEL_RECORD])
    assert stored.namespace == "team" and stored.trajectory_id == "traj-1"

    clock.now += 30
    second = await _worker(made, runtime, clock)
    [adopted] = await second.list()
    assert adopted.id == record.id and adopted.owner == "o" and adopted.labels == {"k": "v"}
    assert adopted.namespace == "team" and adopted.expires_at == record.expires_at
    assert adopted.history[-1].reason == "adopted"
    assert adopted.lease_expires_at == clock.now + 600
    assert await second.op(record.id, FileReadOp(path="/tmp/f")) == b"kept"
    # Files survive; bash sessions lived in the old rocklet and start afresh.
    await second.op(record.id, SessionCreateOp(session="default"))
    result = await second.op(record.id, SessionRunOp(session="default", command="echo again"))
    assert result.output == "again\n"


async def test_a_restarted_worker_removes_what_it_cannot_adopt(made):
    clock, runtime = Clock(), FakeRuntime()
    first = await _worker(made, runtime, clock)
    expired = await first.create("sb-w1-dddddddd", CreateSandboxRequest(), ttl=10)
    stopped = await first.create("sb-w1-eeeeeeee", CreateSandboxRequest(), ttl=3600)
    await runtime.stop(stopped.id)
    made.remove(first)
    clock.now += 11
    second = await _worker(made, runtime, clock)
    assert await second.list() == []
    assert {i.id for i in await runtime.list()} == set()
    assert expired.id and stopped.id


async def test_reconfigure_applies_limits_and_keeps_old_sandboxes_on_their_runtime(made, tmp_path):
    clock, runtime = Clock(), FakeRuntime()
    worker = await _worker(made, runtime, clock)
    old = await worker.create("sb-w1-ffffffff", CreateSandboxRequest(), ttl=3600)
    local = {"type": "local", "state_dir": str(tmp_path / "local")}
    await worker.reconfigure(_args(runtime=local, max_sandboxes_per_node=5))
    assert worker.args.max_sandboxes_per_node == 5
    new = await worker.create("sb-w1-gggggggg", CreateSandboxRequest(), ttl=3600)
    out = await worker.op(new.id, ExecOp.of(ExecRequest(command="echo $((6*7))")))
    assert out.stdout == "42\n"  # a real bash: the local runtime
    assert (await worker.op(old.id, ExecOp.of(ExecRequest(command="echo hi")))).stdout == "hi\n"
    assert [i.id for i in await runtime.list()] == [old.id]
    await worker.remove(old.id)
    await worker.remove(new.id)
    assert list((tmp_path / "local").iterdir()) == []


async def test_session_create_is_still_a_data_plane_call(made):
    clock, runtime = Clock(), FakeRuntime()
    worker = await _worker(made, runtime, clock)
    record = await worker.create("sb-w1-hhhhhhhh", CreateSandboxRequest(), ttl=3600)
    await worker.op(record.id, SessionCreateOp.of(SessionCreateRequest(session="s2")))
    assert (await worker.get(record.id)).state == SandboxState.RUNNING


async def test_a_command_runs_once_per_idempotency_key(made, tmp_path):
    from rock_serve.config import LocalRuntimeConfig

    runtime = LocalRuntimeConfig(state_dir=str(tmp_path / "local")).build()
    worker = await _worker(made, runtime, Clock())
    record = await worker.create("sb-w1-iiiiiiii", CreateSandboxRequest(), ttl=3600)
    await worker.op(record.id, SessionCreateOp.of(SessionCreateRequest(session="default")))
    run = SessionRunRequest(session="default", command="echo x >> count; wc -l < count")
    first, again = await asyncio.gather(
        worker.op(record.id, SessionRunOp.of(run, "key-1")),
        worker.op(record.id, SessionRunOp.of(run, "key-1")),  # a resend racing the first
    )
    later = await worker.op(record.id, SessionRunOp.of(run, "key-1"))
    assert first == again == later and first.output == "1\n"
    assert (await worker.op(record.id, SessionRunOp.of(run, "key-2"))).output == "2\n"
    once = ExecRequest(command="echo y >> other; wc -l < other")
    assert (await worker.op(record.id, ExecOp.of(once, "key-3"))).stdout == "1\n"
    assert (await worker.op(record.id, ExecOp.of(once, "key-3"))).stdout == "1\n"
    assert (await worker.op(record.id, ExecOp.of(once))).stdout == "2\n"
    assert len(worker._keys) == 3


async def _pool(worker: Worker, size: int) -> None:
    for _ in range(2000):
        if len(worker._warm) == size:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"the pool never reached {size}: {len(worker._warm)}")


async def test_the_warm_pool_serves_default_creates_and_refills(made):
    clock, runtime = Clock(), FakeRuntime()
    worker = await _worker(made, runtime, clock, warm_pool_size=2, max_sandboxes_per_node=3)
    await _pool(worker, 2)
    warm_ids = {box.record.id for box in worker._warm}
    record = await worker.create("sb-w1-jjjjjjjj", CreateSandboxRequest(owner="o"), ttl=60)
    assert record.id in warm_ids and record.owner == "o" and record.expires_at == 1060.0
    assert [h.reason for h in record.history] == [None, "warm_pool", "warm_pool"]
    assert (await worker.op(record.id, ExecOp.of(ExecRequest(command="echo hi")))).stdout == "hi\n"
    await _pool(worker, 2)  # refilled (3 places: 1 used, 2 warm)
    custom = await worker.create("sb-w1-kkkkkkkk", CreateSandboxRequest(image="img"), ttl=60)
    assert custom.id == "sb-w1-kkkkkkkk"  # not the default spec: made afresh
    await _pool(worker, 1)  # the pool shrinks to the room left
    assert (await worker.status()).warm == 1
    made.remove(worker)
    # A restart removes what came from the pool (runtimes with a pool cannot reattach anyway:
    # bwrap and local sandboxes die with their Worker) and adopts the rest.
    second = await _worker(made, runtime, clock)
    assert {r.id for r in await second.list()} == {custom.id}
    assert [i.id for i in await runtime.list()] == [custom.id]


async def test_per_image_warm_pools_serve_matching_creates(made):
    clock, runtime = Clock(), FakeRuntime()
    pools = [
        {"image": "task/a:v1", "size": 2},
        {"image": "task/b:v1", "size": 1, "resources": {"memory_mb": 512}},
    ]
    worker = await _worker(
        made, runtime, clock, warm_pool_size=1, warm_pools=pools, max_sandboxes_per_node=5
    )
    await _pool(worker, 4)
    by_pool = sorted(box.record.image or "-" for box in worker._warm)
    assert by_pool == ["-", "task/a:v1", "task/a:v1", "task/b:v1"]
    warm_ids = {box.record.image: box.record.id for box in worker._warm}
    a = await worker.create("sb-w1-aaaaaaaa", CreateSandboxRequest(image="task/a:v1"), ttl=60)
    assert a.id != "sb-w1-aaaaaaaa" and a.history[-1].reason == "warm_pool"
    # same image, other resources: not the pool's spec, so made afresh
    b_other = await worker.create("sb-w1-bbbbbbbb", CreateSandboxRequest(image="task/b:v1"), ttl=60)
    assert b_other.id == "sb-w1-bbbbbbbb"
    b = await worker.create(
        "sb-w1-cccccccc",
        CreateSandboxRequest(image="task/b:v1", resources={"memory_mb": 512}),
        ttl=60,
    )
    assert b.id == warm_ids["task/b:v1"] and b.image == "task/b:v1"
    info = await runtime.inspect(b.id)
    assert info.image == "task/b:v1"
    # room left: 5 - 3 used = 2 -> the default pool (1) first, then task/a (1)
    await _pool(worker, 2)
    assert sorted(box.record.image or "-" for box in worker._warm) == ["-", "task/a:v1"]
