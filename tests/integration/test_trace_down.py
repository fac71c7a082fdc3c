"""The trace id below the Worker (issue 17.5): into the rocklet's op frames, log lines and
errors; on the direct data plane and its streams; never kept by long-lived tasks; and as
OpenTelemetry spans, children of the Admin's.

A real Worker on the local runtime (a real rocklet process, whose stderr is its
``agent.log``), called as the Admin calls it: through ``_ray.call`` with the test's stand-in
actor handle, which runs each call in an empty context as another process would.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rock_serve import dataplane_token
from rock_serve.config import ServerArgs
from rock_serve.deployments._console import RequestContext
from rock_serve.deployments._dataplane import make_app
from rock_serve.deployments._ray import call, stream
from rock_serve.deployments._trace import SPANS, TRACE_ID, install_logging
from rock_serve.deployments.worker import Worker
from rock_serve.errors import RockError
from rock_serve.protocol import CreateSandboxRequest
from rock_serve.protocol.ops import ExecOp, FileReadOp
from rock_serve.rocklet import AGENT_PATH
from rock_serve.rocklet.agent import encode_frame, read_frame
from tests._wait import async_wait_until
from tests.unit.test_trace import Handle

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SECRET = "trace-test-secret"


def _agent_lines(state_dir: Path, sandbox_id: str) -> list[dict[str, Any]]:
    """The rocklet's structured stderr lines (its agent.log on the local runtime)."""
    lines = []
    for line in (state_dir / sandbox_id / "agent.log").read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def _traced_records(caplog: pytest.LogCaptureFixture, trace_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if getattr(r, "trace_id", None) == trace_id]


@pytest.fixture
async def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Worker]:
    monkeypatch.setenv("ROCK_DATAPLANE_SECRET", SECRET)
    args = ServerArgs.model_validate(
        {
            "runtime": {"type": "local", "state_dir": str(tmp_path / "state")},
            "rocklet_ping_interval_seconds": 0.05,
            "reap_interval_seconds": 0.05,
        }
    )
    w = Worker(args, "w1", "node-1", runtime=args.runtime.build())
    await w.ready()
    try:
        yield w
    finally:
        await w.shutdown()


async def _create(worker: Worker, name: str, ttl: float = 600) -> str:
    record = await call(Handle(worker), "create", f"sb-w1-{name}", CreateSandboxRequest(), ttl)
    return str(record.id)


async def test_an_op_carries_the_callers_trace_id_into_the_rocklet_its_log_and_errors(
    worker: Worker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rock_serve")
    install_logging()
    sid = await _create(worker, "aaaaaaaa")
    handle = Handle(worker)
    token = TRACE_ID.set(TRACE)
    try:
        result = await call(handle, "op", sid, ExecOp(command="echo hi"))
        with pytest.raises(RockError) as failed:
            await call(handle, "op", sid, FileReadOp(path="/no/such/file"))
    finally:
        TRACE_ID.reset(token)
    assert result.stdout == "hi\n"
    ops = [
        (line["event"], line["op"], line.get("outcome"))
        for line in _agent_lines(tmp_path / "state", sid)
        if line.get("trace") == TRACE
    ]
    code = failed.value.code.value
    assert ops == [
        ("op.start", "exec", None),
        ("op.end", "exec", "ok"),
        ("op.start", "file.read", None),
        ("op.end", "file.read", code),
    ]
    # Untraced ops (the create's own ping, the watchdog's pings) are not logged.
    assert all(line.get("trace") == TRACE for line in _agent_lines(tmp_path / "state", sid))
    # The Worker's line for the failed call has the same id.
    assert f"call op failed: {code}: {failed.value.message}" in _traced_records(caplog, TRACE)


async def test_the_rocklet_puts_the_trace_id_in_its_errors_and_ignores_a_bad_one(
    tmp_path: Path,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        "python3",
        "-I",
        AGENT_PATH,
        "--root",
        str(tmp_path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    frames = [
        {"id": 1, "op": "no_such_op", "trace": TRACE},
        {"id": 2, "op": "file.read", "args": {"path": "/missing"}, "trace": TRACE},
        {"id": 3, "op": "file.read", "args": {"path": "/missing"}, "trace": "not-hex; rm"},
        {"id": 4, "op": "file.read", "args": {"path": "/missing"}},
    ]
    replies = {}
    for frame in frames:
        proc.stdin.write(encode_frame(frame))
        reply = await asyncio.wait_for(read_frame(proc.stdout), 10)
        assert reply is not None
        replies[reply[0]["id"]] = reply[0]["error"]
    proc.stdin.close()
    stderr = await asyncio.wait_for(proc.stderr.read(), 10)
    assert await proc.wait() == 0
    assert replies[1]["code"] == "unknown_operation" and replies[1]["trace"] == TRACE
    assert replies[2]["code"] == replies[3]["code"] == replies[4]["code"] != "internal"
    assert replies[2]["trace"] == TRACE
    assert "trace" not in replies[3] and "trace" not in replies[4]
    logged = [json.loads(line) for line in stderr.decode().splitlines()]
    assert [(x["event"], x["id"], x["trace"]) for x in logged] == [
        ("op.start", 2, TRACE),
        ("op.end", 2, TRACE),
    ]
    assert logged[1]["outcome"] == replies[2]["code"] and logged[1]["logger"] == "rocklet"


async def test_the_direct_data_plane_gives_each_request_one_id_down_to_the_rocklet(
    worker: Worker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One id per request whatever the transport; the NDJSON stream carries it in its reply
    headers, and the Worker logs the stream's start and end with it.
    """
    caplog.set_level(logging.INFO, logger="rock_serve")
    install_logging()
    sid = await _create(worker, "bbbbbbbb")
    token, _ = dataplane_token.sign(
        SECRET.encode(), sid, namespace="default", token_name="t", ttl=60
    )
    transport = httpx.ASGITransport(app=make_app(worker))
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
        streamed = await client.post(
            f"/v1/sandboxes/{sid}/exec",
            params={"stream": "true"},
            json={"command": "echo one; echo two"},
            headers={
                **headers,
                "traceparent": f"00-{TRACE}-{PARENT}-01",
                "x-request-id": "req-17",
            },
        )
        plain = await client.post(
            f"/v1/sandboxes/{sid}/exec", json={"command": "true"}, headers=headers
        )
        refused = await client.get(f"/v1/sandboxes/{sid}/stats")  # no token: a failed call
    assert streamed.status_code == 200, streamed.text
    assert streamed.headers["content-type"].startswith("application/x-ndjson")
    assert streamed.headers["x-trace-id"] == TRACE
    assert streamed.headers["x-request-id"] == "req-17"
    items = [json.loads(line) for line in streamed.text.splitlines()]
    assert items[-1]["exit_code"] == 0
    assert "".join(i.get("data", "") for i in items[:-1]) == "one\ntwo\n"
    # A request without traceparent gets its own id, echoed with a new request id.
    new_id = plain.headers["x-trace-id"]
    assert plain.status_code == 200 and len(new_id) == 32 and new_id != TRACE
    assert len(plain.headers["x-request-id"]) == 32
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    ops = {
        (line["trace"], line["op"], line["event"])
        for line in _agent_lines(tmp_path / "state", sid)
        if line["trace"] in (TRACE, new_id)
    }
    assert ops == {(t, "exec", event) for t in (TRACE, new_id) for event in ("op.start", "op.end")}
    worker_lines = _traced_records(caplog, TRACE)
    assert f"stream exec of {sid} started" in worker_lines
    ended = [m for m in worker_lines if m.startswith(f"stream exec of {sid} ended: ")]
    assert len(ended) == 1 and ended[0].endswith("(ok)")  # "<n> items in <s> s (ok)"
    failed = [
        json.loads(m)
        for m in _traced_records(caplog, refused.headers["x-trace-id"])
        if m.startswith("{")
    ]
    assert [(f["event"], f["status"]) for f in failed] == [("request", 401)]


async def test_a_stream_over_ray_runs_under_the_callers_trace_id(
    worker: Worker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``_ray.stream`` carries the trace id as ``_ray.call`` does (``rock_traced_stream``)."""

    class StreamHandle(Handle):
        """The stand-in handle, with Ray's ``.options(num_returns="streaming")``."""

        def __getattr__(self, name: str) -> Any:
            getattr(self._actor, name)
            handle = self

            class Method:
                @staticmethod
                def options(**_: Any) -> Any:
                    return Method

                @staticmethod
                def remote(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
                    handle.calls.append(name)

                    async def refs() -> AsyncIterator[Any]:
                        async for item in getattr(handle._actor, name)(*args, **kwargs):
                            done: asyncio.Future[Any] = asyncio.Future()
                            done.set_result(item)
                            yield done

                    return refs()

            return Method

    caplog.set_level(logging.INFO, logger="rock_serve")
    install_logging()
    sid = await _create(worker, "cccccccc")
    handle = StreamHandle(worker)
    token = TRACE_ID.set(TRACE)
    try:
        items = [x async for x in stream(handle, "op_stream", sid, ExecOp(command="echo a"))]
    finally:
        TRACE_ID.reset(token)
    assert handle.calls == ["rock_traced_stream"]
    assert items[-1].exit_code == 0
    assert f"stream exec of {sid} started" in _traced_records(caplog, TRACE)
    assert [
        (line["op"], line["event"])
        for line in _agent_lines(tmp_path / "state", sid)
        if line["trace"] == TRACE
    ] == [("exec", "op.start"), ("exec", "op.end")]


async def test_tasks_started_by_a_traced_call_do_not_keep_its_trace_id(
    worker: Worker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The create runs under the caller's id and starts long-lived work (the rocklet watchdog
    and its pings, the failure watcher, the reaper's removal): none of it logs that id.
    """
    caplog.set_level(logging.INFO, logger="rock_serve")
    install_logging()
    token = TRACE_ID.set(TRACE)
    try:
        watched = await _create(worker, "dddddddd")
        expiring = await _create(worker, "eeeeeeee", ttl=0.3)
    finally:
        TRACE_ID.reset(token)
    box = worker._boxes[watched]
    # The watchdog pings the idle rocklet: wait for two answered pings.
    seen = [box.handle._last_seen]

    def pinged() -> bool:
        if box.handle._last_seen != seen[-1]:
            seen.append(box.handle._last_seen)
        return len(seen) >= 3

    await async_wait_until(pinged, what="two watchdog pings")
    # The reaper removes the expired one; the watcher marks the killed one failed.
    assert box.handle.process is not None
    box.handle.process.kill()

    def logged(text: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if text in r.getMessage()]

    await async_wait_until(lambda: logged(f"sandbox {watched} failed"), what="failed line")
    await async_wait_until(lambda: logged(f"removed sandbox {expiring}"), what="reaped line")
    created = logged("created sandbox")
    assert created and {r.trace_id for r in created} == {TRACE}  # type: ignore[attr-defined]
    background = logged(f"sandbox {watched} failed") + logged(f"removed sandbox {expiring}")
    assert {r.trace_id for r in background} == {"-"}  # type: ignore[attr-defined]
    # The rocklet logged the create's own start-up ping under its id, and none of the
    # watchdog's (at least two) pings.
    pings = [line for line in _agent_lines(tmp_path / "state", watched) if line["op"] == "ping"]
    assert [(line["event"], line["trace"]) for line in pings] == [
        ("op.start", TRACE),
        ("op.end", TRACE),
    ]


async def test_spans_of_the_worker_and_the_rocklet_call_are_children_of_the_admins(
    worker: Worker,
) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    sid = await _create(worker, "ffffffff")
    handle = Handle(worker)

    async def exec_route(request: Request) -> JSONResponse:  # the Admin's exec, in short
        result = await call(handle, "op", sid, ExecOp(command="echo span"))
        return JSONResponse({"stdout": result.stdout})

    app = RequestContext(Starlette(routes=[Route("/exec", exec_route, methods=["POST"])]))
    exporter = InMemorySpanExporter()
    SPANS.configure(None, "rock-test", exporter=exporter)
    try:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
            resp = await client.post("/exec", headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
    finally:
        SPANS.shutdown()
    assert resp.status_code == 200 and resp.json() == {"stdout": "span\n"}
    assert resp.headers["x-trace-id"] == TRACE
    spans = {span.name: span for span in exporter.get_finished_spans()}
    admin, worker_span, rocklet = spans["POST /exec"], spans["Worker.op"], spans["rocklet exec"]
    assert {s.context.trace_id for s in spans.values()} == {int(TRACE, 16)}
    assert admin.parent is not None and admin.parent.span_id == int(PARENT, 16)
    assert worker_span.parent is not None
    assert worker_span.parent.span_id == admin.context.span_id
    assert rocklet.parent is not None and rocklet.parent.span_id == worker_span.context.span_id
    assert rocklet.attributes is not None and rocklet.attributes["rock.sandbox_id"] == sid


async def test_the_ray_gate_keeps_the_clients_id_or_gives_the_call_one(
    worker: Worker, tmp_path: Path
) -> None:
    """The Ray transport (``Worker.ray_op``): one id per call there too."""
    sid = await _create(worker, "gggggggg")
    handle = Handle(worker)
    token = TRACE_ID.set(TRACE)  # a client under a trace sends it (through rock_traced)
    try:
        await call(handle, "ray_op", None, sid, ExecOp(command="true"))
    finally:
        TRACE_ID.reset(token)
    await call(handle, "ray_op", None, sid, ExecOp(command="true"))  # none sent
    assert handle.calls == ["rock_traced", "ray_op"]
    ends = [x for x in _agent_lines(tmp_path / "state", sid) if x["event"] == "op.end"]
    assert [x["op"] for x in ends] == ["exec", "exec"]
    assert ends[0]["trace"] == TRACE
    assert len(ends[1]["trace"]) == 32 and ends[1]["trace"] != TRACE


def test_the_rocklets_trace_lines_are_bounded(capfd, monkeypatch):
    """agent.log is never rotated: past TRACE_LOG_BYTES one ``trace.capped`` line, then none."""
    from rock_serve.rocklet import agent

    monkeypatch.setattr(agent, "TRACE_LOG_BYTES", 1000)
    monkeypatch.setattr(agent, "_trace_written", [0])
    for i in range(100):
        agent._trace_log({"event": "op.start", "trace": "0" * 32, "op": "ping", "id": i})
    lines = capfd.readouterr().err.splitlines()
    assert lines[-1] == '{"level":"warning","logger":"rocklet","event":"trace.capped"}'
    assert sum(len(x) + 1 for x in lines) <= 1000 + len(lines[-1]) + 1
    assert 3 < len(lines) < 100
