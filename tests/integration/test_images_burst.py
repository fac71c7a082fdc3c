"""A burst of creates of one uncached image at the Worker (bwrap, real registry on loopback).

N concurrent ``Worker.create`` calls (24 here, to stay within the suite's time: each costs a
rocklet start; ``bench/images.py`` runs 100) of an image no store has: one pull, every create
running, none failed; while the pull runs, anyone joining it (``store.events``) and the
Worker's list of pulls in flight (what ``GET /v1/images`` shows while the creates wait) see
the leader's progress. Starts queue behind the runtime's
start gate (``max_concurrent_starts``) so their start timeout measures one start each.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from rock_serve.config import BwrapRuntimeConfig, ImageStoreConfig, ServerArgs
from rock_serve.protocol import CreateSandboxRequest, ExecRequest, SandboxState, parse_image_ref
from rock_serve.protocol.ops import ExecOp
from tests._registry import Registry, oci, registry_skip_reason
from tests.contract.conftest import _BWRAP_SKIP, TEST_CGROUP_PARENT

_SKIP = registry_skip_reason() or _BWRAP_SKIP
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))

N = 24


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    try:
        yield reg
    finally:
        reg.stop()


async def test_concurrent_creates_of_an_uncached_image_pull_once(tmp_path, registry):
    from rock_serve.deployments.worker import Worker

    ref = registry.push(oci("nopython"), f"burst/np-{uuid.uuid4().hex[:8]}:v1")
    runtime = BwrapRuntimeConfig(
        state_dir=str(tmp_path / "state"),
        cgroup_parent=TEST_CGROUP_PARENT,
        images=ImageStoreConfig(root=str(tmp_path / "store")),
        default_resources={"cpus": 0.1, "memory_mb": 64, "pids": 64, "disk_mb": None},
    ).build()
    args = ServerArgs.model_validate({"runtime": {"type": "fake"}, "max_sandboxes_per_node": N + 4})
    worker = Worker(args, "burst", "node-burst", runtime=runtime)
    await worker.ready()
    store = runtime.images
    assert store is not None
    phases: list[str] = []
    inflight = []

    async def follow() -> None:
        # what GET /v1/images shows while the creates wait (the Worker's images_list, which
        # the Admin lists per node): the creates' pull in flight, with its progress; then a
        # follower that joins it
        while not (listed := (await worker.images_list())[2]):
            await asyncio.sleep(0.01)
        inflight.extend(listed)
        async for ev in store.events(ref):
            phases.append(ev.phase)

    try:
        watcher = asyncio.ensure_future(follow())
        results = await asyncio.gather(
            *(
                worker.create(
                    f"sb-burst-{i:03d}-{uuid.uuid4().hex[:8]}",
                    CreateSandboxRequest(image=ref),
                    ttl=600,
                )
                for i in range(N)
            ),
            return_exceptions=True,
        )
        await asyncio.wait_for(watcher, 60)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == [], errors[:3]
        assert store.pull_count == 1
        assert all(r.state == SandboxState.RUNNING for r in results)  # type: ignore[union-attr]
        assert len({r.id for r in results}) == N  # type: ignore[union-attr]
        # the follower saw the leader's pull: the same reference, its phases, then done
        assert inflight and inflight[0].image == str(parse_image_ref(ref))
        assert inflight[0].phase in ("queued", "pulling", "unpacking"), inflight
        assert phases[-1] == "done" and ("unpacking" in phases or "pulling" in phases), phases
        img = store.lookup(ref)
        assert img is not None and store.in_use(img.id) == N
        # every sandbox answers (a few sampled: they all passed the same start)
        for r in results[:: N // 4]:
            out = await worker.op(r.id, ExecOp.of(ExecRequest(command="cat /etc/os-release")))  # type: ignore[union-attr]
            assert "rock-nopython" in out.stdout
    finally:
        await worker.shutdown()
        for info in await runtime.list():
            await runtime.remove(info.id)
        await runtime.close()
