"""The fake runtime: a real RockletHandle against an in-memory agent."""

import asyncio

import pytest

from rock_serve import errors
from rock_serve.protocol import (
    ExecRequest,
    FailureReason,
    SandboxSpec,
    SandboxState,
    SessionCreateRequest,
    SessionRunRequest,
)
from rock_serve.runtime import LABEL_OWNER, build_runtime
from rock_serve.runtime.fake import FakeRuntime


@pytest.fixture
async def fake():
    rt = FakeRuntime()
    yield rt
    await rt.close()


@pytest.fixture
async def handle(fake):
    await fake.create("sb", SandboxSpec(owner="me", labels={"k": "v"}))
    return await fake.start("sb")


async def test_lifecycle(fake):
    info = await fake.create("a", SandboxSpec(owner="me"))
    assert info.state == SandboxState.PENDING and info.labels[LABEL_OWNER] == "me"
    with pytest.raises(errors.Conflict):
        await fake.create("a", SandboxSpec())
    h = await fake.start("a")
    assert (await fake.inspect("a")).state == SandboxState.RUNNING
    assert (await h.ping())["version"] == "fake"
    assert [i.id for i in await fake.list({LABEL_OWNER: "me"})] == ["a"]
    assert await fake.list({LABEL_OWNER: "you"}) == []
    await fake.stop("a")
    assert (await fake.inspect("a")).state == SandboxState.STOPPED
    with pytest.raises(errors.RockletUnavailable):
        await h.ping()
    await fake.remove("a")
    await fake.remove("a")
    with pytest.raises(errors.SandboxNotFound):
        await fake.inspect("a")


async def test_commands(handle):
    await handle.create_session(SessionCreateRequest())

    async def run(cmd, **kw):
        return await handle.run_in_session(SessionRunRequest(command=cmd, **kw))

    assert (await run("echo hi there")).output == "hi there\n"
    assert (await run("true")).exit_code == 0
    assert (await run("false")).exit_code == 1
    missing = await run("frobnicate")
    assert missing.exit_code == 127 and "command not found" in missing.output
    slow = await run("sleep 5", timeout=0.05)
    assert slow.timed_out
    assert (await run("sleep 0.01")).exit_code == 0
    ended = await run("exit 3")
    assert ended.exit_code == 3 and ended.session_ended
    with pytest.raises(errors.SessionNotFound):
        await run("echo gone")
    result = await handle.exec(ExecRequest(command="echo out"))
    assert (result.exit_code, result.stdout, result.stderr) == (0, "out\n", "")
    result = await handle.exec(ExecRequest(command=["cat", "/nope"]))
    assert result.exit_code == 1 and "No such file" in result.stderr
    assert (await handle.exec(ExecRequest(command="sleep 9", timeout=0.05))).timed_out


async def test_sessions(handle):
    await handle.create_session(SessionCreateRequest(session="a"))
    with pytest.raises(errors.SessionExists):
        await handle.create_session(SessionCreateRequest(session="a"))
    assert await handle.list_sessions() == ["a"]
    await handle.close_session("a")
    assert await handle.list_sessions() == []


async def test_files(handle):
    await handle.write_file("/root/x/y.txt", b"\x00\xffdata")
    assert await handle.read_file("/root/x/y.txt") == b"\x00\xffdata"
    big = bytes(range(256)) * 5000  # over one chunk: sent as an upload stream
    await handle.write_file("/big", big)
    assert await handle.read_file("/big") == big
    assert (await handle.stat("/root/x")).type == "dir"
    names = [e.name for e in (await handle.list_dir("/root/x")).entries]
    assert names == ["y.txt"]
    result = await handle.exec(ExecRequest(command="cat /root/x/y.txt"))
    assert result.stdout_bytes() == b"\x00\xffdata"
    with pytest.raises(errors.IsADirectory):
        await handle.remove("/root/x")
    await handle.remove("/root/x", recursive=True)
    with pytest.raises(errors.FileNotFound):
        await handle.read_file("/root/x/y.txt")
    await handle.mkdir("/a/b/c")
    assert (await handle.stat("/a/b")).type == "dir"
    with pytest.raises(errors.UnknownOperation):
        await handle.request("no.such.op")
    assert (await handle.stats()).cpu_count == 1


async def test_files_survive_restart(fake, handle):
    await handle.write_file("/keep", b"1")
    await fake.stop("sb")
    h2 = await fake.start("sb")
    assert await h2.read_file("/keep") == b"1"


async def test_kill_agent_fails_waiting_calls(fake, handle):
    await handle.create_session(SessionCreateRequest())
    pending = asyncio.ensure_future(handle.run_in_session(SessionRunRequest(command="sleep 10")))
    await asyncio.sleep(0.01)
    await fake.kill_agent("sb", FailureReason.OOM_KILLED)
    with pytest.raises(errors.RockletUnavailable):
        await pending
    info = await fake.inspect("sb")
    assert (info.state, info.reason) == (SandboxState.FAILED, FailureReason.OOM_KILLED)


async def test_failure_injection(fake):
    fake.fail_next_create(errors.RuntimeUnavailable("disk full"))
    with pytest.raises(errors.RuntimeUnavailable, match="disk full"):
        await fake.create("x", SandboxSpec())
    await fake.create("x", SandboxSpec())
    fake.fail_next("start", errors.RockletUnavailable("boom"))
    with pytest.raises(errors.RockletUnavailable):
        await fake.start("x")
    assert (await fake.start("x")).alive


def test_build_fake():
    assert isinstance(build_runtime({"type": "fake"}), FakeRuntime)
