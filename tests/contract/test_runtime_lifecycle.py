"""Runtime lifecycle, run unchanged against every runtime the machine has."""

import uuid

import pytest

from rock_serve import errors
from rock_serve.config import BwrapRuntimeConfig, LocalRuntimeConfig, parse_runtime_config
from rock_serve.protocol import (
    ExecRequest,
    SandboxSpec,
    SandboxState,
    SessionCreateRequest,
    SessionRunRequest,
)
from rock_serve.runtime import LABEL_ID, LABEL_OWNER, LABEL_RUNTIME, build_runtime


def new_id():
    return f"t-{uuid.uuid4().hex[:16]}"


async def test_full_lifecycle(runtime):
    sid = new_id()
    spec = SandboxSpec(owner="alice", labels={"job": "j1"}, env={"FOO": "bar"})
    info = await runtime.create(sid, spec)
    assert info.id == sid
    assert info.state == SandboxState.PENDING
    assert info.runtime == runtime.name
    assert info.labels == {
        "job": "j1",
        LABEL_ID: sid,
        LABEL_OWNER: "alice",
        LABEL_RUNTIME: runtime.name,
    }

    handle = await runtime.start(sid)
    assert (await handle.ping())["version"]
    result = await handle.exec(ExecRequest(command="echo $FOO"))
    assert (result.exit_code, result.stdout) == (0, "bar\n")
    running = await runtime.inspect(sid)
    assert running.state == SandboxState.RUNNING
    assert running.pid is not None

    found = await runtime.list({"job": "j1"})
    assert [i.id for i in found] == [sid]
    assert await runtime.list({"job": "other"}) == []
    assert sid in [i.id for i in await runtime.list()]

    await runtime.stop(sid)
    assert (await runtime.inspect(sid)).state == SandboxState.STOPPED
    assert not handle.alive
    with pytest.raises(errors.RockletUnavailable):
        await handle.ping()
    await runtime.stop(sid)  # stopping twice is fine

    await runtime.remove(sid)
    with pytest.raises(errors.SandboxNotFound):
        await runtime.inspect(sid)
    assert await runtime.list({"job": "j1"}) == []
    await runtime.remove(sid)  # idempotent


async def test_restart_after_stop_keeps_files(runtime):
    sid = new_id()
    await runtime.create(sid, SandboxSpec())
    handle = await runtime.start(sid)
    await handle.write_file("keep.txt", b"kept")
    await runtime.stop(sid)
    handle = await runtime.start(sid)
    assert await handle.read_file("keep.txt") == b"kept"
    await runtime.remove(sid)


async def test_create_twice_conflicts(runtime):
    sid = new_id()
    await runtime.create(sid, SandboxSpec())
    with pytest.raises(errors.Conflict):
        await runtime.create(sid, SandboxSpec())
    await runtime.remove(sid)


async def test_start_twice_conflicts(sandbox):
    runtime, sid, _ = sandbox
    with pytest.raises(errors.Conflict):
        await runtime.start(sid)


async def test_unknown_sandbox(runtime):
    with pytest.raises(errors.SandboxNotFound):
        await runtime.inspect("nope")
    with pytest.raises(errors.SandboxNotFound):
        await runtime.start("nope")
    with pytest.raises(errors.SandboxNotFound):
        await runtime.stop("nope")
    await runtime.remove("nope")


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "-x", "x" * 200])
async def test_bad_ids_are_refused(runtime, bad):
    with pytest.raises(errors.InvalidRequest):
        await runtime.create(bad, SandboxSpec())


async def test_agent_death_is_reported(sandbox):
    runtime, sid, handle = sandbox
    await handle.create_session(SessionCreateRequest())
    pid = (await handle.ping())["pid"]
    with pytest.raises(errors.RockletUnavailable):
        await handle.exec(ExecRequest(command=f"kill -9 {pid}"))
    await handle.wait_closed()
    with pytest.raises(errors.RockletUnavailable):
        await handle.run_in_session(SessionRunRequest(command="echo hi"))
    info = await runtime.inspect(sid)
    assert info.state == SandboxState.FAILED
    assert info.reason is not None and info.reason.value == "agent_exited"


async def test_second_instance_adopts_sandboxes(runtime, runtime_config):
    sid = new_id()
    await runtime.create(sid, SandboxSpec(owner="worker-1", labels={"gen": "1"}))
    handle = await runtime.start(sid)
    await handle.ping()

    other = runtime_config.build()
    found = await other.list({LABEL_OWNER: "worker-1"})
    assert [(i.id, i.state) for i in found] == [(sid, SandboxState.RUNNING)]
    assert (await other.inspect(sid)).labels["gen"] == "1"
    await other.remove(sid)
    with pytest.raises(errors.SandboxNotFound):
        await runtime.inspect(sid)
    await handle.wait_closed()
    assert not handle.alive
    await other.close()


async def test_dead_owner_leaves_a_failed_sandbox(runtime, runtime_config):
    sid = new_id()
    await runtime.create(sid, SandboxSpec(owner="w"))
    handle = await runtime.start(sid)
    await handle.close()  # the rocklet exits on EOF, as when its owner dies
    other = runtime_config.build()
    info = await other.inspect(sid)
    assert info.state == SandboxState.FAILED
    await other.remove(sid)
    assert await other.list() == []


def test_bad_configs_raise_invalid_config(tmp_path):
    with pytest.raises(errors.InvalidConfig, match="type"):
        parse_runtime_config({"type": "nope"})
    with pytest.raises(errors.InvalidConfig, match="bogus"):
        parse_runtime_config({"type": "local", "bogus": 1})
    with pytest.raises(errors.InvalidConfig, match="rootfs"):
        build_runtime({"type": "bwrap", "rootfs": str(tmp_path / "missing")})
    with pytest.raises(errors.InvalidConfig, match="not found"):
        build_runtime({"type": "bwrap", "bwrap_path": "/nonexistent/bwrap"})
    with pytest.raises(errors.InvalidConfig, match="not found"):
        LocalRuntimeConfig(python="/nonexistent/python3").build()
    with pytest.raises(errors.InvalidConfig):
        BwrapRuntimeConfig(cgroup_parent="../escape", state_dir=str(tmp_path)).build()
    assert build_runtime({"type": "fake"}).name == "fake"
    assert build_runtime(LocalRuntimeConfig(state_dir=str(tmp_path / "l"))).name == "local"


async def test_network_requires_permission(runtime):
    if runtime.name == "local":
        pytest.skip("the local runtime has no network isolation to relax")
    with pytest.raises(errors.InvalidConfig, match="network"):
        await runtime.create(new_id(), SandboxSpec(network="host"))
