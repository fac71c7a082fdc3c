"""Fork, pause and resume (issue 16) on a real Worker and Scheduler over the bwrap runtime.

No Ray: the Scheduler gets a directory of one real Worker (the seam the unit tests use), so
namespaces and quotas are the Scheduler's own code. Each test checks what a user relies on:
children see the parent's files at the fork point and then diverge, a deleted parent leaves
its children intact, a child costs only its own writes, the fork point is atomic, and bad
input gets a typed error.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator

import pytest

from rock_serve.config import Quota, ServerArgs
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.deployments.worker import Worker
from rock_serve.errors import (
    NotSupported,
    RateLimited,
    SandboxNotFound,
    SandboxNotRunning,
    SessionExists,
    http_status,
)
from rock_serve.protocol import (
    CreateSandboxRequest,
    ExecRequest,
    SandboxRecord,
    SandboxState,
    SessionCreateRequest,
    SessionRunRequest,
)
from rock_serve.protocol.fork import ForkRequest
from rock_serve.protocol.ops import ExecOp, SessionCreateOp, SessionRunOp
from rock_serve.runtime._fork import FROZEN_DIR
from rock_serve.runtime.bwrap import mounts_under
from tests._wait import async_wait_until
from tests.contract.conftest import RUNTIMES, make_config

pytestmark = [pytest.mark.bwrap, *RUNTIMES[1].marks]


class _Directory:
    """One node whose Worker is a real Worker on the bwrap runtime."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def alive_nodes(self) -> list[str]:
        return [self.worker.node_id]

    async def ensure(self, node_id: str) -> Worker:
        return self.worker

    async def dead_jobs(self, job_ids: set[str]) -> set[str]:
        return set()


class _Platform:
    def __init__(self, scheduler: Scheduler, worker: Worker, state_dir: str) -> None:
        self.scheduler, self.worker, self.state_dir = scheduler, worker, state_dir

    async def create(self, namespace: str = "default", **fields: object) -> SandboxRecord:
        return await self.scheduler.create(CreateSandboxRequest(**fields), namespace)  # type: ignore[arg-type]

    async def sh(self, sandbox_id: str, command: str) -> str:
        result = await self.worker.op(
            sandbox_id, ExecOp.of(ExecRequest(command=command, timeout=60))
        )
        assert result.exit_code == 0, (command, result)
        return result.stdout

    async def run(self, sandbox_id: str, command: str) -> str:
        with contextlib.suppress(SessionExists):
            await self.worker.op(sandbox_id, SessionCreateOp.of(SessionCreateRequest()))
        req = SessionRunRequest(command=command, timeout=60)
        result = await self.worker.op(sandbox_id, SessionRunOp.of(req))
        assert result.exit_code == 0, (command, result)
        return result.output

    def frozen_layers(self) -> list[str]:
        base = os.path.join(self.state_dir, FROZEN_DIR)
        return sorted(os.listdir(base)) if os.path.isdir(base) else []


@pytest.fixture
async def platform(tmp_path) -> AsyncIterator[_Platform]:
    state_dir = str(tmp_path / "state")
    args = ServerArgs(
        runtime=make_config("bwrap", state_dir),  # type: ignore[arg-type]
        quotas={"small": Quota(max_sandboxes=3)},
        rocklet_ping_interval_seconds=0.5,
        rocklet_ping_timeout_seconds=5.0,  # 2 s failed idle sandboxes on a busy CPU
    )
    worker = Worker(args, "forkw", "node-fork")
    await worker.ready()
    scheduler = Scheduler(args, directory=_Directory(worker))  # type: ignore[arg-type]
    try:
        yield _Platform(scheduler, worker, os.path.realpath(state_dir))
    finally:
        await scheduler.close()
        await worker.shutdown()


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _allocated(path: str) -> int:
    """Bytes of disk that the files under ``path`` take (sparse files count what they hold),
    not crossing into mounts (a sandbox's merged root and idmapped lowers show its layers);
    a sandbox's disk (a loop-mounted sparse file) counts as the blocks of that file."""
    total = 0
    mounts = set(mounts_under(path))
    for parent, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if os.path.join(parent, d) not in mounts]
        for name in files:
            total += os.lstat(os.path.join(parent, name)).st_blocks * 512
    return total


async def test_fork_then_diverge(platform: _Platform) -> None:
    parent = await platform.create(labels={"task": "t1"})
    await platform.sh(parent.id, "mkdir -p /work && echo base > /work/shared")
    await platform.run(parent.id, "cd /work && export GOAL=win")

    result = await platform.scheduler.fork(parent.id, ForkRequest(count=3))

    kids = [r.id for r in result.items]
    assert len(set(kids)) == 3 and parent.id not in kids
    for record in result.items:
        assert record.state == SandboxState.RUNNING
        assert record.labels == {"task": "t1"} and record.namespace == "default"
        assert record.worker == parent.worker
        # the default session starts where the parent's was, with what it exported
        assert await platform.run(record.id, 'pwd; echo "$GOAL"') == "/work\nwin\n"
        assert await platform.sh(record.id, "cat /work/shared") == "base\n"
    for i, kid in enumerate(kids):
        await platform.sh(kid, f"echo child{i} > /work/shared && touch /work/only{i}")
    await platform.sh(parent.id, "echo parent-later > /work/shared")
    for i, kid in enumerate(kids):
        assert await platform.sh(kid, "cat /work/shared; ls /work") == (
            f"child{i}\nonly{i}\nshared\n"
        )
    assert await platform.sh(parent.id, "cat /work/shared; ls /work") == "parent-later\nshared\n"
    listed = {r.id for r in (await platform.scheduler.list()).items}
    assert set(kids) <= listed


async def test_delete_parent_with_live_children_and_layer_refcount(platform: _Platform) -> None:
    parent = await platform.create()
    await platform.sh(parent.id, "head -c 1000000 /dev/urandom > /root/blob && md5sum /root/blob")
    digest = (await platform.sh(parent.id, "md5sum < /root/blob")).split()[0]
    kids = (await platform.scheduler.fork(parent.id, ForkRequest(count=2))).items
    assert len(platform.frozen_layers()) == 1

    await platform.scheduler.delete(parent.id)
    for kid in kids:
        assert (await platform.sh(kid.id, "md5sum < /root/blob")).split()[0] == digest
    # a grandchild stacks a second frozen layer over the first
    grand = (await platform.scheduler.fork(kids[0].id, ForkRequest(count=1))).items[0]
    assert (await platform.sh(grand.id, "md5sum < /root/blob")).split()[0] == digest
    assert len(platform.frozen_layers()) == 2

    await platform.scheduler.delete(kids[0].id)
    assert len(platform.frozen_layers()) == 2  # kids[1] and the grandchild still use them
    await platform.scheduler.delete(kids[1].id)
    await platform.scheduler.delete(grand.id)
    assert platform.frozen_layers() == []


async def test_children_cost_only_their_writes(platform: _Platform) -> None:
    size = 32 << 20
    parent = await platform.create()
    await platform.sh(parent.id, f"head -c {size} /dev/urandom > /root/data")
    kids = (await platform.scheduler.fork(parent.id, ForkRequest(count=4))).items
    layer = os.path.join(platform.state_dir, FROZEN_DIR, platform.frozen_layers()[0])
    assert _allocated(layer) >= size  # the one copy
    for kid in kids:
        assert _allocated(os.path.join(platform.state_dir, kid.id)) < size // 4
    await platform.sh(kids[0].id, f"head -c {size // 2} /dev/zero > /root/mine && sync")
    grown = _allocated(os.path.join(platform.state_dir, kids[0].id))
    assert grown >= size // 2
    assert _allocated(os.path.join(platform.state_dir, kids[1].id)) < size // 4


async def test_the_fork_point_is_atomic(platform: _Platform) -> None:
    parent = await platform.create()
    # A writer that replaces /root/f (500 kB of one repeated line) as fast as it can; any copy
    # taken mid-write would show a short file or two different lines.
    writer = (
        "i=0; while :; do i=$((i+1)); yes $i | head -c 500000 > /root/t; mv /root/t /root/f; done"
    )
    await platform.run(parent.id, f"nohup sh -c '{writer}' >/dev/null 2>&1 &")
    await async_wait_until(
        lambda: platform.sh(parent.id, "test -f /root/f && echo y || true"), what="first file"
    )
    for _ in range(2):
        kid = await platform.scheduler.fork(parent.id, ForkRequest(count=1, session=False))
        out = await platform.sh(kid.items[0].id, "wc -c < /root/f; sort -u /root/f | wc -l")
        assert out.split() == ["500000", "1"]


async def test_bad_input_is_typed(platform: _Platform) -> None:
    parent = await platform.create(namespace="small")
    with pytest.raises(RateLimited) as over:
        await platform.scheduler.fork(parent.id, ForkRequest(count=3), "small")
    assert over.value.details["quota"] == "sandboxes" and http_status(over.value.code) == 429
    kids = (await platform.scheduler.fork(parent.id, ForkRequest(count=2), "small")).items
    assert len(kids) == 2

    with pytest.raises(SandboxNotFound):  # another namespace's sandbox is unknown there
        await platform.scheduler.fork(parent.id, ForkRequest(count=1), "default")
    with pytest.raises(SandboxNotFound):
        await platform.scheduler.fork("sb-forkw-0000000000000000", ForkRequest(), "small")
    with pytest.raises(ValueError, match="count"):
        ForkRequest(count=0)

    await platform.scheduler.delete(kids[0].id)  # room for one more under the quota
    paused = await platform.scheduler.pause(parent.id, "small")
    assert paused.state == SandboxState.PAUSED
    with pytest.raises(SandboxNotRunning) as not_running:
        await platform.scheduler.fork(parent.id, ForkRequest(count=1), "small")
    assert http_status(not_running.value.code) == 409
    await platform.scheduler.resume(parent.id, "small")


async def test_pause_freezes_and_resume_continues(platform: _Platform) -> None:
    parent = await platform.create()
    await platform.run(
        parent.id, "nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /root/n; done' &"
    )
    await async_wait_until(lambda: platform.sh(parent.id, "cat /root/n 2>/dev/null || true"))
    await platform.scheduler.pause(parent.id)
    with pytest.raises(SandboxNotRunning, match="paused"):
        await platform.worker.op(parent.id, ExecOp.of(ExecRequest(command="true")))
    rt = platform.worker._runtime
    assert rt is not None and rt.paused(parent.id)  # type: ignore[attr-defined]
    upper = os.path.join(platform.state_dir, parent.id, "disk", "upper", "root", "n")
    cpu = rt._cgroup(parent.id).dirs["cpuacct"] + "/cpuacct.usage"  # type: ignore[attr-defined]
    frozen_at, used = _read(upper), _read(cpu)
    other = await platform.create()  # real time passes (a create) while it is paused
    await platform.sh(other.id, "true")
    assert _read(upper) == frozen_at and _read(cpu) == used  # no CPU at all
    # a paused sandbox is not failed by the liveness pings
    assert (await platform.worker.get(parent.id)).state == SandboxState.PAUSED
    record = await platform.scheduler.resume(parent.id)
    assert record.state == SandboxState.RUNNING
    await async_wait_until(lambda: _read(upper) != frozen_at, what="the counter to move again")
    assert (await platform.sh(parent.id, "echo back")) == "back\n"


async def test_runtimes_without_fork_say_not_supported(tmp_path) -> None:
    args = ServerArgs(runtime=make_config("local", str(tmp_path / "state")))  # type: ignore[arg-type]
    worker = Worker(args, "loc", "node-loc")
    await worker.ready()
    try:
        sid = f"sb-loc-{uuid.uuid4().hex[:16]}"
        await worker.create(sid, CreateSandboxRequest(), ttl=60)
        with pytest.raises(NotSupported) as refused:
            await worker.fork(sid, [f"sb-loc-{uuid.uuid4().hex[:16]}"], ForkRequest(), 60)
        assert http_status(refused.value.code) == 501
        assert [r.id for r in await worker.list()] == [sid]  # nothing half-made
    finally:
        await worker.shutdown()


async def test_fork_of_a_host_tools_sandbox_is_not_supported(tmp_path) -> None:
    # The host-tools root has the host's / as a lower layer, and the frozen copy would sit
    # inside it: overlayfs refuses that (ELOOP). A typed 501 up front, and nothing made.
    config = make_config("bwrap", str(tmp_path / "state")).model_copy(update={"images": None})
    worker = Worker(ServerArgs(runtime=config), "host", "node-host")  # type: ignore[arg-type]
    await worker.ready()
    try:
        sid = f"sb-host-{uuid.uuid4().hex[:16]}"
        await worker.create(sid, CreateSandboxRequest(), ttl=60)
        with pytest.raises(NotSupported, match="host-tools"):
            await worker.fork(sid, [f"sb-host-{uuid.uuid4().hex[:16]}"], ForkRequest(), 60)
        assert [r.id for r in await worker.list()] == [sid]
        frozen = os.path.join(str(tmp_path / "state"), FROZEN_DIR)
        assert not os.path.isdir(frozen) or not os.listdir(frozen)
    finally:
        await worker.shutdown()
