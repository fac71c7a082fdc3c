"""Fork, pause and resume through the real platform (issue 16): HTTP routes, SDK, GRPO groups.

The bwrap app of the session's Ray (``bwrap_platform``). The Worker/Scheduler-level behaviour
(divergence, refcounts, disk, quotas, namespaces, atomicity) is in
``tests/integration/test_fork.py``; here: the wire (statuses, bodies), ``sb.fork(n)``, and a
GRPO group of 16 started from one prepared sandbox by ``make_group(..., fork_after_reset=True)``.
"""

from __future__ import annotations

import httpx
import pytest

import rock_serve.envs as envs
from rock_serve.errors import SandboxNotRunning
from rock_serve.protocol import SandboxState
from rock_serve.sdk import AsyncClient

pytestmark = [pytest.mark.ray, pytest.mark.bwrap]


async def test_fork_pause_resume_over_http_and_sdk(bwrap_platform):
    async with AsyncClient(bwrap_platform.url) as client, client.sandbox() as parent:
        await parent.exec("mkdir -p /work && echo prepared > /work/state")
        await parent.run("cd /work && export STAGE=two")
        kids = await parent.fork(2, labels={"role": "member"})
        try:
            assert len({k.id for k in kids}) == 2
            for kid in kids:
                assert kid.record.labels == {"role": "member"}
                assert kid.record.state == SandboxState.RUNNING
                out = await kid.run('pwd; echo "$STAGE"; cat state')
                assert out.output == "/work\ntwo\nprepared\n"
            await kids[0].exec("echo mine > /work/state")
            assert (await kids[1].exec("cat /work/state")).stdout == "prepared\n"

            paused = await parent.pause()
            assert paused.state == SandboxState.PAUSED
            with pytest.raises(SandboxNotRunning):
                await parent.fork(1)
            with pytest.raises(SandboxNotRunning):
                await parent.exec("true")
            assert (await parent.resume()).state == SandboxState.RUNNING
            assert (await parent.exec("cat /work/state")).stdout == "prepared\n"
        finally:
            for kid in kids:
                await kid.delete()

    with httpx.Client(base_url=bwrap_platform.url, timeout=60) as api:
        gone = api.post("/v1/sandboxes/sb-abcdef123456-0000000000000000/fork", json={"count": 1})
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "sandbox_not_found"
        bad = api.post("/v1/sandboxes/sb-abcdef123456-0000000000000000/fork", json={"count": 0})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"


async def test_grpo_group_of_16_from_one_prepared_sandbox(bwrap_platform):
    async with AsyncClient(bwrap_platform.url) as client:
        group = envs.make_group(
            "rock/Terminal-v0", seed=11, size=16, client=client, fork_after_reset=True
        )
        async with group:
            obs, infos = await group.reset()
            assert len(set(obs)) == 1
            ids = [i["sandbox_id"] for i in infos]
            assert len(set(ids)) == 16
            assert all(i["forked_from"] == ids[0] for i in infos[1:])
            assert len({i["task_id"] for i in infos}) == 1
            listed = {r.id for r in await client.list_sandboxes()}
            assert set(ids) <= listed
            # every member has the prepared task directory and acts in its own sandbox
            out, *_ = await group.step([f"echo m{i} > mine.txt; cat mine.txt" for i in range(16)])
            for i, text in enumerate(out):
                assert f"m{i}" in text.splitlines()
            out, *_ = await group.step(["cat mine.txt; pwd"] * 16)
            assert [t.splitlines()[0] for t in out] == [f"m{i}" for i in range(16)]
            assert all(t.splitlines()[1].endswith("/task") for t in out)  # the prepared dir
        assert not set(ids) & {r.id for r in await client.list_sandboxes()}
