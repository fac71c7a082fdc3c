"""Limits that hold (issue 11, item 4, and the rocklet's liveness deadline of item 1).

Each test is an attack on a real Worker with a real runtime (local, and bwrap where this
machine has it): the sandbox's code or a tenant's request tries to get more than it may, gets
a typed error, and the sandbox still works afterwards. The Admin's own checks (body size, the
HTTP status of each code) are in ``tests/e2e/test_limits_api.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError

from rock_serve.config import ServerArgs
from rock_serve.deployments._node import NodeCapacity
from rock_serve.deployments.scheduler import Scheduler
from rock_serve.deployments.worker import Worker
from rock_serve.errors import (
    OverCapacity,
    RateLimited,
    ResourceExhausted,
    RockletUnavailable,
    SandboxFailed,
    TooLarge,
    http_status,
)
from rock_serve.protocol import (
    CreateSandboxRequest,
    ExecRequest,
    FailureReason,
    Resources,
    SandboxRecord,
    SandboxState,
    SessionCreateRequest,
    SessionRunRequest,
)
from rock_serve.protocol.ops import (
    ExecOp,
    FileReadOp,
    SessionCloseOp,
    SessionCreateOp,
    SessionRunOp,
    TarDownloadOp,
)
from rock_serve.rocklet.agent import MAX_HEADER, MAX_PAYLOAD
from tests._wait import async_wait_until
from tests.contract.conftest import RUNTIMES, make_config

#: The read cap of these tests (the default is 256 MiB: same code, slower tests).
READ_CAP = 1 << 20

RUNTIME_PARAMS = [p for p in RUNTIMES if p.id in ("local", "bwrap")]
BWRAP = [p for p in RUNTIMES if p.id == "bwrap"]


def _args(kind: str, state_dir: str, **extra: object) -> ServerArgs:
    fields: dict[str, object] = {
        "max_read_bytes": READ_CAP,
        "max_output_bytes": 64 << 10,
        "max_sessions_per_sandbox": 4,
        "rocklet_ping_interval_seconds": 0.5,
        "rocklet_ping_timeout_seconds": 8.0,  # 2 s failed idle sandboxes on a busy CPU
        **extra,
    }
    return ServerArgs(runtime=make_config(kind, state_dir), **fields)  # type: ignore[arg-type]


@pytest.fixture
async def worker(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[Worker]:
    w = Worker(_args(request.param, str(tmp_path / "state")), "lim", "node-lim")
    await w.ready()
    try:
        yield w
    finally:
        await w.shutdown()


def _id() -> str:
    return f"sb-lim-{uuid.uuid4().hex[:16]}"


async def _sandbox(worker: Worker, **resources: int | float) -> SandboxRecord:
    req = CreateSandboxRequest(resources=Resources(**resources))  # type: ignore[arg-type]
    return await worker.create(_id(), req, ttl=600)


async def _sh(worker: Worker, sandbox_id: str, command: str) -> str:
    result = await worker.op(sandbox_id, ExecOp.of(ExecRequest(command=command, timeout=60)))
    assert result.exit_code == 0, (command, result)
    return result.stdout


async def _still_works(worker: Worker, sandbox_id: str) -> None:
    assert await _sh(worker, sandbox_id, "echo alive") == "alive\n"
    assert (await worker.get(sandbox_id)).state == SandboxState.RUNNING


# ----------------------------------------------------------------------------- resources


def test_the_schema_refuses_absurd_resources():
    for field, value in (
        ("memory_mb", 4 * 1024 * 1024),  # 4 TiB
        ("pids", 1_000_000),
        ("cpus", 100_000),
        ("disk_mb", 1 << 40),
    ):
        with pytest.raises(ValidationError, match=field):
            CreateSandboxRequest.model_validate({"resources": {field: value}})


@pytest.mark.parametrize("worker", RUNTIME_PARAMS, indirect=True)
async def test_resources_beyond_the_node_are_refused_and_nothing_is_made(worker: Worker):
    node = NodeCapacity.measure(worker.args.runtime)
    assert node.memory_mb is not None and node.disk_mb is not None
    over = {
        "cpus": node.cpus + 1,
        "memory_mb": node.memory_mb + 1,
        "pids": worker.args.max_pids_per_sandbox + 1,
        "disk_mb": node.disk_mb + 1,
    }
    for field, value in over.items():
        with pytest.raises(OverCapacity, match=field) as info:
            await _sandbox(worker, **{field: value})
        assert info.value.details["fields"] == [field]
        assert http_status(info.value.code) == 400
    assert await worker.list() == []
    record = await _sandbox(worker, cpus=1, memory_mb=256, pids=256)
    # What a record shows is what the sandbox gets: the runtime's defaults fill the rest.
    assert record.resources.cpus == 1 and record.resources.pids == 256
    await _still_works(worker, record.id)


# ----------------------------------------------------------------------------- read caps


@pytest.mark.parametrize("worker", RUNTIME_PARAMS, indirect=True)
async def test_file_reads_over_the_cap_are_refused_before_any_byte(worker: Worker):
    sid = (await _sandbox(worker)).id
    await _sh(
        worker, sid, f"head -c {READ_CAP + 1} /dev/zero > big; head -c {READ_CAP} /dev/zero > fits"
    )
    with pytest.raises(TooLarge) as info:
        await worker.op(sid, FileReadOp(path="big"))
    assert http_status(info.value.code) == 413
    chunks = worker.op_stream(sid, FileReadOp(path="big"))
    with pytest.raises(TooLarge):
        await chunks.__anext__()  # refused before the first chunk: the REST reply is a 413
    assert len(await worker.op(sid, FileReadOp(path="fits"))) == READ_CAP
    handle = worker._box(sid).handle  # a length past the end is no reason to refuse
    assert len(await handle.read_file("fits", length=4 * READ_CAP, max_bytes=READ_CAP)) == READ_CAP
    await _still_works(worker, sid)


@pytest.mark.parametrize("worker", RUNTIME_PARAMS, indirect=True)
async def test_an_endless_stream_is_cut_at_the_cap(worker: Worker):
    sid = (await _sandbox(worker)).id
    # A FIFO fed without end: a file of unknown size (no st_size to check up front). Its
    # feeder dies of SIGPIPE when the reader gives up, so each read gets a feeder of its own.
    feed = "(cat /dev/zero > endless) >/dev/null 2>&1 </dev/null &"
    await _sh(worker, sid, "mkfifo endless")
    await _sh(worker, sid, feed)
    received = 0
    with pytest.raises(TooLarge):
        async for chunk in worker.op_stream(sid, FileReadOp(path="endless")):
            received += len(chunk)
    assert 0 < received <= READ_CAP
    await _sh(worker, sid, feed)
    with pytest.raises(TooLarge):
        await worker.op(sid, FileReadOp(path="endless"))
    await _still_works(worker, sid)


@pytest.mark.parametrize("worker", BWRAP, indirect=True)
async def test_reading_dev_zero_stops_at_the_cap(worker: Worker):
    sid = (await _sandbox(worker)).id
    received = 0
    with pytest.raises(TooLarge):
        async for chunk in worker.op_stream(sid, FileReadOp(path="/dev/zero")):
            received += len(chunk)
    assert received <= READ_CAP
    await _still_works(worker, sid)


@pytest.mark.parametrize("worker", RUNTIME_PARAMS, indirect=True)
async def test_archives_over_the_cap_are_cut_with_too_large(worker: Worker):
    sid = (await _sandbox(worker)).id
    await _sh(
        worker,
        sid,
        "mkdir -p big small && head -c 600000 /dev/urandom > big/a && "
        "head -c 600000 /dev/urandom > big/b && echo hi > small/x",
    )
    with pytest.raises(TooLarge):
        await worker.op(sid, TarDownloadOp(path="big"))
    received = 0
    with pytest.raises(TooLarge):
        async for chunk in worker.op_stream(sid, TarDownloadOp(path="big")):
            received += len(chunk)
    assert received <= READ_CAP
    assert len(await worker.op(sid, TarDownloadOp(path="small"))) > 0
    await _still_works(worker, sid)


@pytest.mark.parametrize("worker", RUNTIME_PARAMS, indirect=True)
async def test_command_output_is_capped_and_marked(worker: Worker):
    sid = (await _sandbox(worker)).id
    req = ExecRequest(command="head -c 5000000 /dev/zero", max_output_bytes=1000)
    result = await worker.op(sid, ExecOp.of(req))
    assert result.truncated and len(result.stdout_bytes()) == 1000
    # Asking for more than the server's cap gets the cap, marked truncated.
    cap = worker.args.max_output_bytes
    req = ExecRequest(command=f"head -c {cap + 10} /dev/zero", max_output_bytes=cap * 2)
    result = await worker.op(sid, ExecOp.of(req))
    assert result.truncated and len(result.stdout_bytes()) == cap
    run = SessionRunRequest(command=f"head -c {cap + 10} /dev/zero", max_output_bytes=cap * 2)
    await worker.op(sid, SessionCreateOp.of(SessionCreateRequest()))
    out = await worker.op(sid, SessionRunOp.of(run))
    assert out.truncated and len(out.output_bytes()) == cap
    await _still_works(worker, sid)


# ----------------------------------------------------------------------------- frames


@pytest.mark.parametrize("worker", RUNTIME_PARAMS, indirect=True)
async def test_requests_over_the_frame_limit_never_reach_the_rocklet(worker: Worker):
    sid = (await _sandbox(worker)).id
    pid = (await worker._box(sid).handle.ping())["pid"]
    big_command = ExecRequest(command="echo " + "x" * (60 << 20))  # the 60 MB exec body
    with pytest.raises(TooLarge, match="frame limit") as info:
        await worker.op(sid, ExecOp.of(big_command))
    assert info.value.details["limit"] == MAX_HEADER
    big_stdin = ExecRequest(command="wc -c", stdin="y" * (MAX_PAYLOAD + 1))
    with pytest.raises(TooLarge):
        await worker.op(sid, ExecOp.of(big_stdin))
    with pytest.raises(TooLarge):
        await worker.op(sid, SessionRunOp.of(SessionRunRequest(command="x" * (MAX_HEADER + 1))))
    # The same rocklet answers: it was never sent the frame.
    assert (await worker._box(sid).handle.ping())["pid"] == pid
    await _still_works(worker, sid)


# ----------------------------------------------------------------------------- sessions


@pytest.mark.parametrize("worker", RUNTIME_PARAMS, indirect=True)
async def test_sessions_per_sandbox_are_bounded(worker: Worker):
    sid = (await _sandbox(worker)).id
    cap = worker.args.max_sessions_per_sandbox
    for i in range(cap):
        await worker.op(sid, SessionCreateOp.of(SessionCreateRequest(session=f"s{i}")))
    with pytest.raises(ResourceExhausted) as info:
        await worker.op(sid, SessionCreateOp.of(SessionCreateRequest(session="one-more")))
    assert info.value.details == {"resource": "sessions", "limit": cap}
    assert http_status(info.value.code) == 409
    await worker.op(sid, SessionCloseOp(session="s0"))
    await worker.op(sid, SessionCreateOp.of(SessionCreateRequest(session="one-more")))
    await _still_works(worker, sid)


@pytest.mark.parametrize("worker", BWRAP, indirect=True)
async def test_a_fork_failure_under_the_pids_limit_is_a_typed_409(worker: Worker):
    worker.args = worker.args.model_copy(update={"max_sessions_per_sandbox": 200})
    sid = (await _sandbox(worker, pids=24)).id
    made = []
    with pytest.raises(ResourceExhausted) as info:
        for i in range(100):
            await worker.op(sid, SessionCreateOp.of(SessionCreateRequest(session=f"s{i}")))
            made.append(f"s{i}")
    assert info.value.details["resource"] == "pids"
    assert http_status(info.value.code) == 409
    assert len(made) >= 8, "a session costs one pid (no waiter thread per child)"
    for name in made[:4]:
        await worker.op(sid, SessionCloseOp(session=name))
    await _still_works(worker, sid)


# ----------------------------------------------------------------------------- liveness


def _rocklet_pid(worker: Worker, sandbox_id: str) -> int:
    """The host pid of the sandbox's rocklet (the process running the agent)."""
    handle = worker._box(sandbox_id).handle
    assert handle.process is not None
    todo = [handle.process.pid]
    while todo:
        pid = todo.pop(0)
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            # bwrap's own command line holds the agent's too: the rocklet is the python.
            if b"python" in os.path.basename(argv[0]) and b"import agent" in b" ".join(argv):
                return pid
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                todo += [int(p) for p in f.read().split()]
    raise AssertionError("no rocklet process under the sandbox")


async def _failed(worker: Worker, sandbox_id: str) -> SandboxRecord | None:
    record = await worker.get(sandbox_id)
    return record if record.state == SandboxState.FAILED else None


@pytest.mark.parametrize("worker", RUNTIME_PARAMS, indirect=True)
async def test_a_stopped_rocklet_marks_its_sandbox_failed_not_running(worker: Worker):
    sid = (await _sandbox(worker)).id
    other = (await _sandbox(worker)).id
    pid = _rocklet_pid(worker, sid)
    os.kill(pid, signal.SIGSTOP)
    try:
        waiting = asyncio.ensure_future(
            worker.op(sid, ExecOp.of(ExecRequest(command="echo never")))
        )
        record = await async_wait_until(lambda: _failed(worker, sid), what="failed state")
        assert record.reason == FailureReason.AGENT_UNRESPONSIVE
        assert record.history[-1].reason == "agent_unresponsive"
        with pytest.raises(RockletUnavailable) as info:
            await waiting  # the call in flight is not left hanging
        assert info.value.details["reason"] == "agent_unresponsive"
        with pytest.raises(SandboxFailed) as failed:
            await worker.op(sid, ExecOp.of(ExecRequest(command="echo again")))
        assert failed.value.details["reason"] == "agent_unresponsive"
        await _still_works(worker, other)  # the neighbour is untouched
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    await worker.remove(sid)
    assert sid not in {r.id for r in await worker.list()}


@pytest.mark.parametrize("worker", RUNTIME_PARAMS, indirect=True)
async def test_a_killed_rocklet_marks_its_sandbox_failed_at_once(worker: Worker):
    sid = (await _sandbox(worker)).id
    os.kill(_rocklet_pid(worker, sid), signal.SIGKILL)
    record = await async_wait_until(lambda: _failed(worker, sid), what="failed state")
    assert record.reason in (FailureReason.AGENT_EXITED, FailureReason.OOM_KILLED)
    with pytest.raises(SandboxFailed):
        await worker.op(sid, ExecOp.of(ExecRequest(command="echo again")))
    await worker.remove(sid)
    await _still_works(worker, (await _sandbox(worker)).id)


# ----------------------------------------------------------------------------- quotas


class _Directory:
    """The Scheduler's seam, with one real Worker on a real runtime."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def alive_nodes(self) -> list[str]:
        return [self.worker.node_id]

    async def ensure(self, node_id: str) -> Worker:
        return self.worker

    async def dead_jobs(self, job_ids: set[str]) -> set[str]:
        return set()


@pytest.mark.parametrize("worker", RUNTIME_PARAMS, indirect=True)
async def test_namespace_quotas_hold_on_cpus_memory_disk_and_sandboxes(worker: Worker):
    quotas = {
        "cpu": {"max_cpus": 1.5},
        "mem": {"max_memory_mb": 1000},
        "disk": {"max_disk_mb": 300},
        "count": {"max_sandboxes": 2},
    }
    limits = ServerArgs.model_validate({"quotas": quotas}).quotas
    args = worker.args.model_copy(update={"quotas": limits})
    worker.args = args
    scheduler = Scheduler(args, _Directory(worker))  # type: ignore[arg-type]
    try:
        await scheduler.ready()

        async def create(namespace: str, **resources: int | float) -> SandboxRecord:
            req = CreateSandboxRequest(resources=Resources(**resources))  # type: ignore[arg-type]
            return await scheduler.create(req, namespace)

        cases = [
            ("cpu", "cpus", {"cpus": 1}),
            ("mem", "memory_mb", {"memory_mb": 600}),
            ("disk", "disk_mb", {"disk_mb": 200}),
        ]
        for namespace, field, resources in cases:
            first = await create(namespace, **resources)
            with pytest.raises(RateLimited) as info:
                await create(namespace, **resources)
            assert info.value.details["quota"] == field
            assert http_status(info.value.code) == 429
            await _still_works(worker, first.id)
        await create("count")
        await create("count")
        with pytest.raises(RateLimited) as info:
            await create("count")
        assert info.value.details["quota"] == "sandboxes"
        other = await create("elsewhere", memory_mb=2000)  # no quota there
        await _still_works(worker, other.id)
    finally:
        await scheduler.close()
